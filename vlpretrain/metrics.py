"""Training metrics on rank 0: JSON lines, TensorBoard events, a progress bar, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Writes `metrics.jsonl` and TensorBoard events in the run folder; silent on ranks other than 0."""

    def __init__(self, out_dir: Path, active: bool, total: int, initial: int = 0, progress: bool = True):
        self.active, self.out_dir, self.last_loss = active, Path(out_dir), None
        self._file = self._tb = self._bar = None
        if not active:
            return
        path = self.out_dir / "metrics.jsonl"
        # a resumed run redoes the steps after its checkpoint: drop their old rows so each step has one
        truncate_after(path, initial)
        self._file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the TensorBoard events of redone steps in the same way
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=initial or None)
        except ImportError:  # TensorBoard is optional at run time
            self._tb = None
        if progress:
            import sys

            from tqdm import tqdm

            # a log file gets a line every 30 s instead of every step
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             mininterval=0.1 if sys.stderr.isatty() else 30)

    def log(self, row: dict[str, Any]) -> None:
        """One training metrics line, stamped with the wall-clock time (seconds since the epoch) it was written."""
        if not self.active:
            return
        self.last_loss = row.get("loss", self.last_loss)
        self._file.write(json.dumps({**row, "time": time.time()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(f"train/{k}", v, row["step"])
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.0f}")

    def log_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        """Evaluation results at a step, one line per benchmark."""
        if not self.active or not results:
            return
        for bench, values in results.items():
            self._file.write(json.dumps({"step": step, "eval": bench, **values, "time": time.time()}) + "\n")
            if self._tb is not None:
                for k, v in values.items():
                    if isinstance(v, int | float):
                        self._tb.add_scalar(f"eval/{bench}/{k}", v, step)
        self._file.flush()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
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
