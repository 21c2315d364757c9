"""The training loop: build, then for each micro-batch: forward, loss, backward, step, log, maybe checkpoint, maybe
evaluate. Launch it as one process, under torchrun, or under the deepspeed launcher; it reads its place from the
environment.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vlpretrain.config import RunConfig, dump_yaml
from vlpretrain.engine import (
    DistEnv,
    build_engine,
    consolidated_state_dict,
    init_distributed,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    shutdown_distributed,
)
from vlpretrain.errors import CheckpointError, ConfigError, TrainingError
from vlpretrain.loss import build_loss, reduce_mean
from vlpretrain.metrics import MetricsLogger
from vlpretrain.models import build_model, export_model, get_tokenizer, image_transform

log = logging.getLogger("vlpretrain")

# A data source: (epoch, batches already consumed in that epoch) -> iterable of (images, token ids).
DataFn = Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class TrainState:
    """What a checkpoint needs beyond DeepSpeed's own state to continue exactly where it stopped."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch of the next batch
    batch_in_epoch: int = 0  # batches of that epoch already consumed
    samples: int = 0  # samples seen, all ranks
    nonfinite_total: int = 0


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next optimizer step and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class _ShardData:
    """The configured webdataset shards for this rank, as a DataFn that also reports skip counters."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, env: DistEnv):
        from vlpretrain.data import build_loader

        transform = image_transform(model, train=True, size=cfg.data.image_size,
                                    crop_scale=tuple(cfg.data.crop_scale), augment=cfg.data.augment)
        self.loader = build_loader(cfg.data, transform, get_tokenizer(cfg.model), rank=env.rank,
                                   world_size=env.world_size)

    def __call__(self, epoch: int, start_batch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.set_epoch(epoch, start_batch)
        return self.loader

    def stats(self) -> dict[str, float]:
        return {f"data/{k}": v for k, v in self.loader.log_stats().items()}


def _stream(data: DataFn, state: TrainState) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches across epochs; keeps state.epoch / state.batch_in_epoch pointing at the next batch."""
    empty_epochs = 0
    while True:
        got = False
        for batch in data(state.epoch, state.batch_in_epoch):
            got = True
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0
        empty_epochs = 0 if got else empty_epochs + 1
        if empty_epochs >= 2:
            raise TrainingError("the data source produced no batches for two epochs in a row")


def _forward(engine, images, texts, cfg: RunConfig, loss_fn) -> tuple[torch.Tensor, dict[str, float]]:
    """Features from both towers, the contrastive loss and (for MoE towers) the weighted auxiliary losses."""
    out = engine(images, texts)
    image_f, text_f, scale = out[0].float(), out[1].float(), out[2].float()
    bias = out[3].float() if len(out) > 3 else None
    loss = loss_fn(image_f, text_f, scale, bias)
    extra = {"logit_scale": scale.detach().reshape(-1)[0].item()}
    if cfg.model.moe.num_experts > 0:
        from vlpretrain.models.moe import moe_losses

        aux, stats = moe_losses(engine.module)
        loss = loss + aux
        extra.update(stats)
    return loss, extra


def _agree(env: DistEnv, *flags: bool) -> list[bool]:
    """Every rank learns whether any rank raised each flag (ranks must skip or stop together)."""
    t = torch.tensor([float(f) for f in flags])
    if env.world_size > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class Evaluator:
    """Zero-shot evaluation on rank 0 from the consolidated weights (works under every ZeRO stage).

    Benchmark names and the data root are checked when it is built, so a typo fails before training starts.
    """

    def __init__(self, cfg: RunConfig, env: DistEnv):
        self.cfg, self.env, self.model = cfg, env, None
        if cfg.eval.benchmarks:
            from zeroshot import get_benchmark

            if not cfg.eval.root:
                raise ConfigError("eval.root: required when eval.benchmarks is set")
            for name in cfg.eval.benchmarks:
                get_benchmark(name)

    def __call__(self, weights: dict[str, torch.Tensor] | None,
                 results_file: Path | None = None) -> dict[str, dict[str, float]]:
        if not self.env.is_main or not self.cfg.eval.benchmarks:
            return {}
        import zeroshot

        if self.model is None:
            # the native MoE layer reads every backend's export and needs no expert-parallel group
            moe = replace(self.cfg.model.moe, backend="native", ep_size=1)
            self.model = build_model(replace(self.cfg.model, pretrained=None, moe=moe), loss=self.cfg.train.loss)
        own = self.model.state_dict()
        self.model.load_state_dict({k: v.reshape(own[k].shape) for k, v in weights.items()})
        e = self.cfg.eval
        entries = zeroshot.evaluate_suite(self.model, e.benchmarks, e.root, tokenizer=get_tokenizer(self.cfg.model),
                                          batch_size=e.batch_size, workers=e.workers, max_images=e.max_images,
                                          progress=False)
        out = {entry.benchmark: entry.metrics for entry in entries}
        if results_file is not None:  # the end of the run: linear probes too, when configured
            if e.linear_probe:
                for name in e.benchmarks:
                    bench = zeroshot.get_benchmark(name)
                    m = zeroshot.linear_probe(self.model, name, e.root, batch_size=e.batch_size, workers=e.workers,
                                              max_images=e.max_images)
                    entries.append(zeroshot.ResultEntry("linear_probe", name, bench.metric, m, str(e.root)))
                    out[f"{name}/linear_probe"] = m
            zeroshot.update_results(results_file, str(results_file.parent / "model.safetensors"), None, entries)
        return out


def train(cfg: RunConfig, resume: str | None = None, data: DataFn | None = None) -> dict[str, Any]:
    """Train the configured model; returns a summary (steps, last loss, checkpoint, evaluation results).

    `resume` is "latest" or a checkpoint folder; `data` replaces the shard loader (synthetic benchmarks, tests).
    """
    # ---- build ------------------------------------------------------------------------------------------------
    env = init_distributed()
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, loss=tc.loss)
    data = data or _ShardData(cfg, model, env)
    evaluator = Evaluator(cfg, env)
    engine = build_engine(model, cfg, env)
    if cfg.model.compile:
        engine.compile()
    loss_fn = build_loss(tc.loss, env.rank, env.world_size, tc.local_loss, tc.loss_chunk)
    out_dir = Path(tc.output_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
    state = TrainState()
    if resume:
        path = latest_checkpoint(out_dir) if resume == "latest" else Path(resume)
        if path is None:
            raise CheckpointError(f"{out_dir}/checkpoints: no checkpoint to resume from")
        state = TrainState(**load_checkpoint(engine, path)["train_state"])
        log.info("resumed from %s at step %d", path, state.step)
    metrics = MetricsLogger(out_dir, env.is_main, total=tc.steps, initial=state.step, progress=tc.progress)
    stop = StopRequest()
    batches = _stream(data, state)
    dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
    nonfinite_run, micro, last_ckpt, eval_results, start_step = 0, 0, None, {}, state.step
    final_weights, have_final = None, False  # final_weights is None on ranks other than 0
    window_t, window_samples = time.perf_counter(), 0

    def weights() -> dict[str, torch.Tensor] | None:
        return consolidated_state_dict(engine, moe=cfg.model.moe.num_experts > 0)

    def checkpoint(w: dict[str, torch.Tensor] | None) -> Path:
        client = {"train_state": asdict(state), "config": _plain(cfg)}
        return save_checkpoint(engine, out_dir, state.step, client, w, cfg.model, tc.keep_last, env.is_main)

    # ---- loop -------------------------------------------------------------------------------------------------
    try:
        while state.step < tc.steps:
            images, texts = next(batches)
            torch.manual_seed(tc.seed * 1_000_003 + micro * 101 + env.rank)  # router jitter etc.: resumable
            micro += 1
            images, texts = images.to(env.device, dtype), texts.to(env.device)
            loss, extra = _forward(engine, images, texts, cfg, loss_fn)
            nonfinite, stopping = _agree(env, not math.isfinite(loss.item()), stop.requested)
            n = images.shape[0] * env.world_size
            state.samples += n
            window_samples += n
            if nonfinite:
                state.nonfinite_total += 1
                nonfinite_run += 1
                log.warning("non-finite loss at step %d: batch skipped (%d in a row)", state.step, nonfinite_run)
                if nonfinite_run >= tc.max_nonfinite:
                    raise TrainingError(f"{nonfinite_run} non-finite losses in a row at step {state.step}; "
                                        f"last good checkpoint: {last_ckpt or 'none'}")
                continue
            nonfinite_run = 0
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)
            engine.step()
            if not boundary:
                continue
            state.step += 1
            if state.step % tc.log_every == 0 or state.step == tc.steps:
                now = time.perf_counter()
                row = {"step": state.step, "epoch": state.epoch, "loss": reduce_mean(loss, env.world_size).item(),
                       "lr": engine.get_lr()[0], "samples": state.samples,
                       "samples_per_s": window_samples / max(now - window_t, 1e-9),
                       "nonfinite_skipped": state.nonfinite_total, **extra, **_data_stats(data)}
                window_t, window_samples = now, 0
                metrics.log(row)
            metrics.advance()
            due_eval = cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < tc.steps
            due_ckpt = tc.save_every and state.step % tc.save_every == 0
            if due_eval:
                eval_results = evaluator(weights())
                metrics.log_eval(state.step, eval_results)
            stopping = stopping or bool(tc.stop_after and state.step - start_step >= tc.stop_after)
            if due_ckpt or stopping or state.step == tc.steps:
                final_weights, have_final = weights(), True
                last_ckpt = checkpoint(final_weights)
            if stopping:
                log.warning("stop requested: checkpoint %s written, exiting", last_ckpt)
                break
        if state.step >= tc.steps:
            if not have_final:  # collective: every rank decides alike
                final_weights = weights()
            if env.is_main:  # the run's model, beside its results
                export_model(None, cfg.model, out_dir / "model.safetensors", state_dict=final_weights)
            if cfg.eval.at_end:
                eval_results = evaluator(final_weights, results_file=out_dir / "results.json")
                metrics.log_eval(state.step, eval_results)
    finally:
        stop.restore()
        metrics.close()
    summary = {"steps": state.step, "samples": state.samples, "nonfinite_skipped": state.nonfinite_total,
               "interrupted": state.step < tc.steps, "checkpoint": str(last_ckpt) if last_ckpt else None,
               "output_dir": str(out_dir), "eval": eval_results, "last_loss": metrics.last_loss}
    shutdown_distributed()
    return summary


def _data_stats(data: DataFn) -> dict[str, float]:
    """Skip counters of the shard loader, when the data source keeps them."""
    stats = getattr(data, "stats", None)
    return dict(stats()) if callable(stats) else {}


def _plain(cfg: RunConfig) -> dict[str, Any]:
    return asdict(cfg)
