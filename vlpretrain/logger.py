"""Training metrics on rank 0: JSON lines, TensorBoard events, a progress bar, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# Seconds between plain progress lines when there is no bar.
PLAIN_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{s:02d}s"


class TensorBoardSink:
    """Scalars as TensorBoard events in `out_dir/tensorboard`."""

    def __init__(self, out_dir: Path, initial: int, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the events of steps a resumed run redoes
        self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=initial or None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._tb.close()


class WandbSink:
    """The same scalars in a Weights & Biases run (offline by default: `wandb sync out_dir/wandb/...` later)."""

    def __init__(self, out_dir: Path, initial: int, config: dict[str, Any]):
        import os

        import wandb

        train = config.get("train", {})
        # the run id is the folder's, so a resumed run continues the same W&B run
        run_id = "".join(c if c.isalnum() else "-" for c in out_dir.resolve().as_posix()).strip("-")[-64:]
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(project=train.get("wandb_project", "vlpretrain"), dir=str(out_dir), config=config,
                               mode=train.get("wandb_mode", "offline"), id=run_id, resume="allow",
                               name=out_dir.name)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


class MetricsLogger:
    """Writes `metrics.jsonl` (and the trackers of `report_to`) in the run folder; silent on ranks other than 0."""

    def __init__(self, out_dir: Path, active: bool, total: int, initial: int = 0, progress: bool = True,
                 report_to: tuple[str, ...] | list[str] = ("tensorboard",), config: dict[str, Any] | None = None):
        self.active, self.out_dir, self.last_loss = active, Path(out_dir), None
        self._file = self._bar = None
        self._sinks: list[Any] = []
        if not active:
            return
        path = self.out_dir / "metrics.jsonl"
        # a resumed run redoes the steps after its checkpoint: drop their old rows so each step has one
        truncate_after(path, initial)
        self._file = open(path, "a")
        for name in report_to:
            try:
                self._sinks.append(SINKS[name](self.out_dir, initial, config or {}))
            except ImportError:  # TensorBoard is optional at run time; wandb is checked when the config loads
                if name != "tensorboard":
                    raise
        self.total, self._initial = total, initial
        self._t0 = self._last_line = time.perf_counter()
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.1)

    def log(self, row: dict[str, Any]) -> None:
        """One training metrics line, stamped with the wall-clock time (seconds since the epoch) it was written."""
        if not self.active:
            return
        self.last_loss = row.get("loss", self.last_loss)
        self._file.write(json.dumps({**row, "time": time.time()}) + "\n")
        self._file.flush()
        scalars = {f"train/{k}": v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        for sink in self._sinks:
            sink.scalars(scalars, row["step"])
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.0f}")
        elif self._file is not None:
            self._plain_line(row)

    def _plain_line(self, row: dict[str, Any]) -> None:
        """Without a bar (a log file, or train.progress false): a line every PLAIN_EVERY_S, and the last step."""
        now = time.perf_counter()
        if now - self._last_line < PLAIN_EVERY_S and row["step"] != self.total:
            return
        self._last_line = now
        done = row["step"] - self._initial
        eta = (self.total - row["step"]) * (now - self._t0) / done if done > 0 else float("nan")
        print(f"step {row['step']}/{self.total}  loss {row['loss']:.4f}  {row['samples_per_s']:.0f} samples/s  "
              f"ETA {_duration(eta)}", file=sys.stderr, flush=True)

    def log_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        """Evaluation results at a step, one line per benchmark."""
        if not self.active or not results:
            return
        for bench, values in results.items():
            self._file.write(json.dumps({"step": step, "eval": bench, **values, "time": time.time()}) + "\n")
            scalars = {f"eval/{bench}/{k}": v for k, v in values.items() if isinstance(v, int | float)}
            for sink in self._sinks:
                sink.scalars(scalars, step)
        self._file.flush()

    def log_values(self, step: int, values: dict[str, float]) -> None:
        """Scalars outside a training row (the last checkpoint upload's times, logged once it ends): a metrics
        line without a loss, and the trackers."""
        if not self.active or not values:
            return
        self._file.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        self._file.flush()
        for sink in self._sinks:
            sink.scalars(dict(values), step)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def finish_steps(self) -> None:
        """Close the step bar when the steps end, so export and evaluation do not count as step time."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        for sink in self._sinks:
            sink.close()
        self._file.close()
        plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")


def truncate_after(path: Path, step: int) -> None:
    """Keep only the rows of `path` (metrics.jsonl) up to `step`, rewriting it atomically; rows of a crashed
    writer's last, half-written line are dropped too."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The training rows of a metrics.jsonl file."""
    if not Path(path).is_file():
        return []
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if "loss" in r and "eval" not in r]


def plot_loss_curve(metrics_path: Path, out: Path) -> Path | None:
    """PNG of training loss against step (and evaluation top-1 where logged)."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.grid(alpha=0.3)
    evals = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if '"eval"' in line]
    val = [(e["step"], e["loss"]) for e in evals if e["eval"] == "val" and "loss" in e]
    if val:
        ax.plot(*zip(*val), "s-", label="validation loss")
    evals = [e for e in evals if e["eval"] != "val"]
    if evals:
        ax2 = ax.twinx()
        for bench in sorted({e["eval"] for e in evals}):
            pts = [(e["step"], e.get("top1")) for e in evals if e["eval"] == bench and e.get("top1") is not None]
            if pts:
                ax2.plot(*zip(*pts), "o--", label=f"{bench} top-1")
        ax2.set_ylabel("zero-shot top-1")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
