"""The training loop: build, then for each optimizer step: its micro-batches, loss, backward and step (exact or
independent accumulation, `vlpretrain.accumulate`), log, maybe checkpoint, maybe evaluate. Launch it as one
process, under torchrun, the deepspeed launcher, srun or mpirun; it reads its place from the environment. It talks to
DeepSpeed only through `vlpretrain.engine.Engine` and to data only through the `BatchStream` protocol
(`vlpretrain.data.stream`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vlpretrain import errors
from vlpretrain.accumulate import build_accumulation
from vlpretrain.config import RunConfig, dump_yaml
from vlpretrain.console import check_writable
from vlpretrain.data import ShardCounts, build_loader, count_shards_of
from vlpretrain.data.prefetch import DevicePrefetch
from vlpretrain.data.stream import BatchStream
from vlpretrain.energy import EnergyMeter, rank_reading, total_over_ranks
from vlpretrain.engine import (
    DistEnv,
    build_engine,
    init_distributed,
    load_checkpoint,
    read_client_state,
    save_checkpoint,
    shutdown_distributed,
)
from vlpretrain.engine.remote import (
    RemoteMirror,
    describe_error,
    remote_checkpoints,
    remote_root,
    resume_point,
    run_folder_shared,
)
from vlpretrain.errors import CheckpointError, ConfigError, DataError, TrainingError, VLPretrainError
from vlpretrain.evaluation import EvaluatorFactory, build_evaluators
from vlpretrain.guard import NonFiniteGuard, host_values
from vlpretrain.heldout import Validator
from vlpretrain.logger import MetricsLogger
from vlpretrain.models import build_model, export_model, get_tokenizer, image_size, image_transform
from vlpretrain.models.clip import is_conv_tower
from vlpretrain.models.patch_dropout import masked_fraction, set_patch_dropout
from vlpretrain.objectives import build_objective, check_objective, objective_class
from vlpretrain.planning import flops_per_sample
from vlpretrain.results import ResultEntry, update_results
from vlpretrain.resume import adapt_to_world_size, map_data_position, universal_copy
from vlpretrain.runlock import RunLock, lock_run_folder
from vlpretrain.stopping import Interrupted, StopCheck, StopRequest
from vlpretrain.storage import remove_tree

log = logging.getLogger("vlpretrain")


@dataclass
class TrainState:
    """What a checkpoint needs beyond DeepSpeed's own state to continue exactly where it stopped."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch of the next batch
    batch_in_epoch: int = 0  # batches of that epoch already consumed
    samples: int = 0  # samples seen, all ranks
    nonfinite_total: int = 0
    flops: int = 0  # model FLOPs (forward + backward) of those samples
    energy_j: float = 0.0  # joules of every rank's GPU up to the last logging step (0 on CPUs)


def shard_loader(cfg: RunConfig, model: torch.nn.Module, env: DistEnv, counts: ShardCounts) -> BatchStream:
    """The configured webdataset shards for this rank, with the model's training preprocessing."""
    transform = image_transform(model, train=True, size=cfg.data.image_size,
                                crop_scale=tuple(cfg.data.crop_scale), augment=cfg.data.augment)
    return build_loader(cfg.data, transform, get_tokenizer(cfg.model), rank=env.rank, world_size=env.world_size,
                        defer_normalize=True, counts=counts)


SHARD_COUNTS = "shard_counts.json"


def run_shard_counts(cfg: RunConfig, out_dir: Path, env: DistEnv, resume: str | None) -> ShardCounts:
    """What the shards hold, found once per run: rank 0 counts (or, on resume, reads what the run folder kept)
    and every rank gets its result, so the count costs the same at any world size and a resume costs nothing."""
    d = cfg.data
    spec = {"train": d.train, "mode": d.mode, "index": d.index, "missing_shards": d.missing_shards,
            "train_num_samples": d.train_num_samples}
    kept = out_dir / SHARD_COUNTS
    payload: dict[str, Any] | None = None
    if env.is_main:
        try:
            saved = json.loads(kept.read_text()) if resume and kept.is_file() else None
            if saved is not None and saved.get("spec") == spec:
                payload = {"counts": saved["counts"], "kept": True}
            else:
                counts = count_shards_of(d)
                payload = {"counts": counts.to_json(), "kept": False}
                kept.write_text(json.dumps({"spec": spec, "counts": payload["counts"]}) + "\n")
        except (VLPretrainError, ValueError, KeyError) as e:  # every rank must stop, not wait for rank 0
            payload = {"error": str(e)}
    payload = env.share(payload)
    if "error" in payload:
        raise DataError(payload["error"])
    counts = ShardCounts.from_json(payload["counts"])
    if env.is_main:
        where = f"kept in {kept}" if payload["kept"] else "counted"
        print(f"data: {counts.describe()} ({where})", flush=True)
    return counts


class RankZeroEvaluator:
    """The configured evaluators (`vlpretrain.evaluation`) run on rank 0 from the consolidated weights (works under
    every ZeRO stage), loaded into a plain model.

    The evaluators are built on every rank when this is, so a bad setting or a missing benchmark folder fails
    before training starts. `during` gives the periodic metrics; `final_report` the final ones, written to the
    run's results file (`vlpretrain.results`). Both run on rank 0 while the other ranks wait
    (`DistEnv.main_alone`), checking `stop_here` between batches on every rank: a stop cuts them short and every
    rank learns of it (the second value they return).
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, evaluators: Mapping[str, EvaluatorFactory] | None = None):
        self.cfg, self.env, self.model = cfg, env, None
        self.evaluators = build_evaluators(cfg, evaluators)

    def _load(self, weights: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        if self.model is None:
            # the native MoE layer reads every backend's export and needs no expert-parallel group
            moe = replace(self.cfg.model.moe, backend="native", ep_size=1)
            self.model = build_model(replace(self.cfg.model, pretrained=None, moe=moe),
                                     objective_class(self.cfg.train.objective).model_options(self.cfg))
        assert weights is not None, "rank 0 holds the consolidated weights"
        own = self.model.state_dict()
        self.model.load_state_dict({k: v.reshape(own[k].shape) for k, v in weights.items()})
        return self.model

    def _on_main(self, work: Callable[[StopCheck], dict[str, dict[str, float]]],
                 stop_here: StopCheck) -> tuple[dict[str, dict[str, float]], bool]:
        """`work` on rank 0, the other ranks waiting; (its metrics, {} elsewhere or when cut; whether to stop)."""
        if not self.evaluators:
            return {}, False
        try:
            out, stopped = self.env.main_alone(work, stop_here)
        except Interrupted:  # rank 0's; the other ranks learnt of the stop in main_alone's last round
            return {}, True
        return out or {}, stopped

    def during(self, weights: dict[str, torch.Tensor] | None,
               stop_here: StopCheck) -> tuple[dict[str, dict[str, float]], bool]:
        """Every evaluator's metrics (empty on other ranks, with none configured, or when a stop cut them short)
        and whether any rank asked to stop."""
        def work(should_stop: StopCheck) -> dict[str, dict[str, float]]:
            model = self._load(weights)
            return {name: m for ev in self.evaluators for name, m in ev.run(model, should_stop).items()}

        return self._on_main(work, stop_here)

    def final_report(self, weights: dict[str, torch.Tensor] | None, results_file: Path,
                     stop_here: StopCheck) -> tuple[dict[str, dict[str, float]], bool]:
        """Every evaluator's final report, written to `results_file`, and whether any rank asked to stop. A stop
        writes what finished and marks the file interrupted, listing the (task, benchmark[, language]) not
        evaluated."""
        def work(should_stop: StopCheck) -> dict[str, dict[str, float]]:
            model = self._load(weights)
            entries: list[ResultEntry] = []
            logged: dict[str, dict[str, float]] = {}
            try:
                for ev in self.evaluators:
                    for name, entry in ev.report(model, should_stop):
                        entries.append(entry)
                        logged[name] = entry.metrics
            except Interrupted:
                done = {entry.key for entry in entries}
                planned = [p for ev in self.evaluators for p in ev.planned()]
                self._write(results_file, entries,
                            not_evaluated=[p for p in planned if (*p, "en")[:3] not in done])
                raise
            self._write(results_file, entries)
            return logged

        return self._on_main(work, stop_here)

    @staticmethod
    def _write(results_file: Path, entries: list[ResultEntry], **kwargs: Any) -> None:
        update_results(results_file, str(results_file.parent / "model.safetensors"), None, entries, **kwargs)

    def record_training(self, results_file: Path, training: dict[str, float]) -> None:
        """The run's totals (steps, samples, FLOPs, energy) as the `training` block of `results_file` (rank 0)."""
        if self.env.is_main:
            self._write(results_file, [], training=training)


def train(cfg: RunConfig, resume: str | None = None, data: BatchStream | None = None,
          overwrite: bool = False, evaluators: Mapping[str, EvaluatorFactory] | None = None) -> dict[str, Any]:
    """Train the configured model; returns a summary (steps, last loss, checkpoint, evaluation results).

    `resume` is "latest" or a checkpoint folder; without it the run folder must hold no checkpoints, unless
    `overwrite` clears the earlier run's outputs first. `data` replaces the shard loader (any `BatchStream`, such
    as `vlpretrain.data.EpochBatches` over synthetic batches). `evaluators` hands in the evaluator factories by
    name (default: the registered and installed ones, `vlpretrain.evaluation`). The run folder is locked for this
    run until it returns: another run holding it raises RunFolderLocked.
    """
    env = init_distributed()
    if env.is_main and env.world_size > 1:
        print(f"{env.world_size} processes ({env.launcher}), master {env.master}", flush=True)
    cfg = resolve_auto(cfg, env.device)
    check_objective(cfg)  # its name and options, before the run folder is touched
    lock = prepare_run_folder(Path(cfg.train.output_dir), resume, overwrite, env, cfg.train.remote_dir)
    try:
        return _run(cfg, env, resume, data, evaluators)
    finally:
        if lock is not None:  # rank 0's; the OS lets it go too if this process dies first
            lock.release()


def _run(cfg: RunConfig, env: DistEnv, resume: str | None, data: BatchStream | None,
         evaluators: Mapping[str, EvaluatorFactory] | None = None) -> dict[str, Any]:
    """The body of `train`, in a run folder this run holds."""
    # ---- check what can be checked, then build -----------------------------------------------------------------
    out_dir = Path(cfg.train.output_dir)
    path, world, universal, changed = None, None, None, []
    remote_dir = cfg.train.remote_dir
    if resume:  # before anything is built: the checkpoint's world size may change train.grad_accum
        path = resume_point(out_dir, remote_dir, env) if resume == "latest" else Path(resume)
        if path is None:
            where = f" nor in {remote_root(remote_dir)}" if remote_dir else ""
            raise CheckpointError(f"{out_dir}/checkpoints: no checkpoint to resume from{where}")
        client = read_client_state(path)
        world = adapt_to_world_size(client, cfg, env.world_size, path)
        cfg, saved_cfg = world.cfg, {**client.get("config", {})}
        if world.note:  # the adjusted grad_accum is the checkpoint's global batch, not a change
            saved_cfg["train"] = {**saved_cfg["train"], "grad_accum": cfg.train.grad_accum}
        changed = check_resume_config(saved_cfg, cfg, path)
        universal = universal_copy(path, out_dir, env) if world.universal else None
    tc = cfg.train
    if tc.remote_dir and (tc.zero_stage > 0 or cfg.model.moe.ep_size > 1) and not run_folder_shared(out_dir, env):
        # every rank writes its part of such a checkpoint: rank 0 would save, and upload, its own node's only
        raise ConfigError(f"train.output_dir: {out_dir} is not one folder shared by every rank (node-local disks?); "
                          "ZeRO-1..3 and expert-parallel checkpoints need a shared file system (node-local folders "
                          "work with train.zero_stage 0)")
    evaluator = RankZeroEvaluator(cfg, env, evaluators)
    torch.manual_seed(tc.seed)
    objective = build_objective(cfg, env.rank, env.world_size)
    model = build_model(cfg.model, objective.model_options(cfg))
    objective.check_model(model)
    channels_last = env.device.type == "cuda" and is_conv_tower(model)  # NHWC images for cuDNN's fast kernels
    sample_flops = train_flops(model, cfg)
    from_shards = data is None
    data = data or shard_loader(cfg, model, env, run_shard_counts(cfg, out_dir, env, resume))
    engine = build_engine(model, cfg, env, load_universal=universal is not None)
    if cfg.model.compile:
        engine.compile()
    objective.to(env.device, torch.bfloat16 if tc.precision == "bf16" else torch.float32)
    validator = Validator(cfg, model, env, objective) if cfg.data.val else None
    accumulation = build_accumulation(engine, objective, cfg, env.device, data.normalize, channels_last)
    state = TrainState()
    if path is not None and world is not None:
        client = load_checkpoint(engine, path, universal)
        if universal is not None:  # loaded on every rank: the conversion has served
            torch.distributed.barrier()
            if env.is_main:
                shutil.rmtree(universal, ignore_errors=True)
        state = TrainState(**client["train_state"])
        if "flops" not in client["train_state"]:  # a checkpoint from before FLOPs were counted
            state.flops = state.samples * sample_flops[cfg.model.patch_dropout]
        notes = [world.note] if world.note else []
        if world.saved_world != env.world_size:
            state.batch_in_epoch, where = map_data_position(state.batch_in_epoch, world.saved_world, env.world_size,
                                                            cfg.data.batch_size)
            notes.append(f"data position in epoch {state.epoch}: {where}" + (
                "; the rest of this epoch is planned for the new world size, which deals shards to processes "
                "differently, so some of its samples may come twice and others not until the next epoch"
                if from_shards else ""))
        if env.is_main:
            note = "".join(f"; {n}" for n in notes + ([f"changed since: {', '.join(changed)}"] if changed else []))
            print(f"resumed from {path} at step {state.step}{note}", flush=True)
    if env.is_main:
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
    metrics = MetricsLogger(out_dir, env.is_main, total=tc.steps, initial=state.step, progress=tc.progress,
                            report_to=tc.report_to, config=asdict(cfg))
    # rank 0 mirrors every checkpoint to train.remote_dir in the background
    mirror = RemoteMirror(tc.remote_dir, out_dir / "checkpoints", tc.keep_last) if tc.remote_dir and env.is_main \
        else None
    stop = StopRequest()
    # one optimizer step's micro-batches at a time, the next step's already on their way to the device
    batches = DevicePrefetch(data.forever(state.epoch, state.batch_in_epoch), accumulation.micro_batches, env.device)
    guard = NonFiniteGuard(engine, env)
    micro, last_ckpt, eval_results, start_step, eval_cut = 0, None, {}, state.step, False
    final_weights, have_final = None, False  # final_weights is None on ranks other than 0
    window_t, window_samples = time.perf_counter(), 0
    energy, energy_before = EnergyMeter(env.device), state.energy_j  # joules of earlier segments of a resumed run

    def weights() -> dict[str, torch.Tensor] | None:
        return engine.consolidated_weights()

    def evaluate(zeroshot_part: Callable[[StopCheck], tuple[dict[str, dict[str, float]], bool]]
                 ) -> tuple[dict[str, dict[str, float]], bool]:
        """The evaluator's part (zero-shot on rank 0), then validation on every rank unless a stop came first;
        (metrics, whether a stop cut them short), alike on every rank."""
        out, cut = zeroshot_part(lambda: stop.requested)
        if validator and not cut:
            try:
                out = {**out, **validator.run(engine, lambda: env.any(stop.requested)[0])}
            except Interrupted:
                cut = True
        return out, cut

    def checkpoint(w: dict[str, torch.Tensor] | None) -> Path:
        client = {"train_state": asdict(state), "config": asdict(cfg), "world_size": env.world_size}
        path = save_checkpoint(engine, out_dir, state.step, client, w, cfg.model, tc.keep_last, env)
        if mirror is not None:
            mirror.submit(path)
        return path

    # ---- loop -------------------------------------------------------------------------------------------------
    # Between sync steps (logging, evaluation, checkpoints, a stop, the last step) nothing here reads a device
    # value on the host: the loss, its finiteness and the metrics stay on the device (`vlpretrain.guard`).
    try:
        while state.step < tc.steps:
            group = next(batches)
            state.epoch, state.batch_in_epoch = group[-1][0], group[-1][1] + 1
            torch.manual_seed(tc.seed * 1_000_003 + micro * 101 + env.rank)  # router jitter etc.: resumable
            micro += len(group)
            masking = masked_fraction(state.step, tc.steps, tc.unmasked_steps, cfg.model.patch_dropout)
            set_patch_dropout(engine.module, masking)  # FLIP: the last train.unmasked_steps see every patch
            # guard.observe: a non-finite loss on any rank makes the optimizer skip the update, on the device
            loss, extra = accumulation.step([(images, texts) for _, _, images, texts in group], guard.observe)
            n = sum(images.shape[0] for _, _, images, _ in group) * env.world_size
            state.samples += n
            state.flops += n * sample_flops[masking]
            window_samples += n
            guard.settle()
            state.step += 1
            due_log = state.step % tc.log_every == 0 or state.step == tc.steps
            due_eval = bool(cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < tc.steps)
            due_ckpt = bool(tc.save_every and state.step % tc.save_every == 0)
            stopping = env.any(stop.requested)[0] or bool(tc.stop_after and state.step - start_step >= tc.stop_after)
            if due_log or due_eval or due_ckpt or stopping or state.step == tc.steps:
                counts = guard.read(end_window=due_log)  # the sync step: the device's counters reach the host
                state.nonfinite_total += counts.skipped
                if counts.skipped:
                    log.warning("%d non-finite loss(es) by step %d: those steps' updates were skipped",
                                counts.skipped, state.step)
                if counts.worst_run >= tc.max_nonfinite:
                    raise TrainingError(f"{counts.worst_run} non-finite losses in a row by step {state.step} "
                                        f"(train.max_nonfinite {tc.max_nonfinite}); skipped steps leave the weights "
                                        f"untouched, so the last checkpoint holds the last good weights: "
                                        f"{last_ckpt or 'none'}")
                if due_log:
                    now = time.perf_counter()
                    row = {"step": state.step, "epoch": state.epoch, "loss": counts.loss, "lr": engine.lr,
                           "samples": state.samples, "samples_per_s": window_samples / max(now - window_t, 1e-9),
                           "nonfinite_skipped": state.nonfinite_total, **host_values(extra), **data.metrics(),
                           **(mirror.report() if mirror else {})}
                    # what the steps took, all ranks: a source counts a batch as it hands it out, and DevicePrefetch
                    # has taken the next step's batches already
                    row["data/samples"] = state.samples
                    if cfg.model.patch_dropout:
                        row["patch_dropout"] = masking
                    row["flops"] = state.flops
                    if env.device.type == "cuda":  # alike on every rank: one small host collective, here only
                        joules = total_over_ranks(env.sum(*rank_reading(energy.read())))
                        if joules is not None:
                            state.energy_j = row["energy_j"] = energy_before + joules
                    window_t, window_samples = now, 0
                    metrics.log(row)
            metrics.advance()
            if due_eval and not stopping:
                eval_results, cut = evaluate(lambda stop_here: evaluator.during(weights(), stop_here))
                if cut:  # the checkpoint below keeps this step's state, then the run stops
                    log.warning("stop requested during the evaluation at step %d: evaluation cut short", state.step)
                    stopping = True
                else:
                    metrics.log_eval(state.step, eval_results)
            if due_ckpt or stopping or state.step == tc.steps:
                final_weights, have_final = weights(), True
                last_ckpt = checkpoint(final_weights)
            if stopping:
                log.warning("stop requested: checkpoint %s written, exiting", last_ckpt)
                break
        metrics.finish_steps()
        if state.step >= tc.steps:
            if not have_final:  # collective: every rank decides alike
                final_weights = weights()
            if env.is_main:  # the run's model, beside its results
                export_model(None, cfg.model, out_dir / "model.safetensors", state_dict=final_weights)
            if cfg.eval.at_end:  # the final checkpoint is written: a stop here has nothing more to save
                eval_results, eval_cut = evaluate(
                    lambda stop_here: evaluator.final_report(final_weights, out_dir / "results.json", stop_here))
                if eval_cut:
                    log.warning("stop requested during the final evaluation: cut short; %s lists what was not "
                                "evaluated", out_dir / "results.json")
                else:
                    metrics.log_eval(state.step, eval_results)
            evaluator.record_training(out_dir / "results.json", training_totals(state, sample_flops, cfg, env))
    finally:
        if mirror is not None:  # signals still go to `stop`: a second one leaves this wait at once (exit 130)
            mirror.finish()
            metrics.log_values(state.step, mirror.report())
        stop.restore()
        metrics.close()
    summary = {"steps": state.step, "samples": state.samples, "nonfinite_skipped": state.nonfinite_total,
               "interrupted": state.step < tc.steps or eval_cut, "checkpoint": str(last_ckpt) if last_ckpt else None,
               "output_dir": str(out_dir), "eval": eval_results, "last_loss": metrics.last_loss,
               **training_totals(state, sample_flops, cfg, env)}
    shutdown_distributed()  # after rank 0's upload: the other ranks wait for it here
    if mirror is not None and mirror.missing:
        raise CheckpointError(f"train.remote_dir: {mirror.missing} never reached {tc.remote_dir} (see the warning "
                              f"above); it is complete in {out_dir / 'checkpoints'}")
    return summary


def train_flops(model: torch.nn.Module, cfg: RunConfig) -> dict[float, int]:
    """Model FLOPs (forward + backward) of one training sample at each patch dropout the run uses (the configured
    fraction, and 0 for `train.unmasked_steps`), counted on the plain model at the data's image size."""
    size, context, p = cfg.data.image_size or image_size(model), model.context_length, cfg.model.patch_dropout
    fractions = [p] + ([0.0] if p and cfg.train.unmasked_steps else [])
    return {f: flops_per_sample(model, size, context, patch_dropout=f).train for f in fractions}


def training_totals(state: TrainState, sample_flops: dict[float, int], cfg: RunConfig,
                    env: DistEnv) -> dict[str, float]:
    """What the run's training cost: steps, samples, model FLOPs (and those of one sample at the configured patch
    dropout), and joules where GPUs report them."""
    totals = {"steps": state.step, "samples": state.samples, "flops": state.flops,
              "flops_per_sample": sample_flops[cfg.model.patch_dropout]}
    if env.device.type == "cuda" and state.energy_j:
        totals["energy_j"] = state.energy_j
    return totals


def resolve_auto(cfg: RunConfig, device: torch.device) -> RunConfig:
    """`cfg` with `train.precision: auto` made concrete for `device` (saved that way, so a resumed run compares
    like with like): bf16 where the GPU supports it, fp32 on CPUs (their bf16 matmuls are slower)."""
    if cfg.train.precision != "auto":
        return cfg
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return replace(cfg, train=replace(cfg.train, precision="bf16" if bf16 else "fp32"))


# Outputs of a run that `overwrite` removes (nothing else in the folder is touched).
RUN_OUTPUTS = ("checkpoints", "tensorboard", "metrics.jsonl", "results.json", "model.safetensors", "model.json",
               "loss.png", "config.yaml", SHARD_COUNTS)


def prepare_run_folder(out_dir: Path, resume: str | None, overwrite: bool, env: DistEnv,
                       remote_dir: str | None = None) -> RunLock | None:
    """Make sure the run folder (and the remote mirror) is writable and belongs to this run before any work
    starts; returns rank 0's lock on it (None on other ranks), which the caller releases when the run ends.

    Rank 0 locks the folder (`vlpretrain.runlock`) before anything in it changes, and tells the other ranks, so
    every rank of a run refused by another run's lock stops with the same line. A fresh run in a folder that holds
    another run's checkpoints would mix the two (and pruning would remove the new checkpoints), so it is refused
    unless `overwrite` clears that run's outputs first; the same for the mirror.
    """
    if resume and overwrite:
        raise ConfigError("--overwrite: cannot be combined with --resume (one continues the run, the other "
                          "discards it)")
    lock, refusal = None, None
    if env.is_main:
        try:
            check_writable(out_dir, "train.output_dir")  # the folder, or the parent it will be made in
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_run_folder(out_dir)
        except VLPretrainError as e:
            refusal = {"error": str(e), "type": type(e).__name__}
    refusal = env.share(refusal)  # collective: rank 0's answer reaches every rank (as JSON, never pickled)
    if refusal is not None:
        raise getattr(errors, refusal["type"], VLPretrainError)(refusal["error"])
    try:
        ckpts = out_dir / "checkpoints"
        held = sorted(p.name for p in ckpts.glob("step_*")) if ckpts.is_dir() else []
        if held and not resume and not overwrite:
            raise ConfigError(f"{out_dir}: holds checkpoints of an earlier run (newest {held[-1]}); continue it with "
                              "--resume latest, or start over with --overwrite (or choose another train.output_dir)")
        clear_remote = check_remote_unused(remote_dir, overwrite, env) if remote_dir and not resume else False
        if env.is_main and overwrite:
            for name in RUN_OUTPUTS:
                target = out_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            if clear_remote:
                remove_tree(remote_root(remote_dir))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if env.world_size > 1:
        torch.distributed.barrier()
    return lock


def check_remote_unused(remote_dir: str, overwrite: bool, env: DistEnv) -> bool:
    """A fresh run's mirror must hold no other run's checkpoints (its pruning would delete them), unless
    `overwrite` is to clear them: whether it must (on rank 0). Rank 0 asks the store once; every rank raises
    alike. Collective."""
    held, problem = [], ""
    if env.is_main:
        try:
            held = remote_checkpoints(remote_dir)
        except Exception as e:  # credentials, endpoint, network: say so before any work starts
            problem = f"train.remote_dir: {remote_dir}: cannot list it ({describe_error(e)})"
        if held and not overwrite:
            problem = (f"train.remote_dir: {remote_root(remote_dir)} holds checkpoints of an earlier run (newest "
                       f"{held[-1]}); continue it with --resume latest, or start over with --overwrite (or choose "
                       "another train.remote_dir)")
    problem = env.share(problem)  # collective: every rank raises alike
    if problem:
        raise ConfigError(problem)
    return bool(held)


# Settings that may change when a run resumes: they affect speed, logging, the run's length or evaluation, not
# the state the checkpoint holds. Anything else differing from the checkpoint's run is refused.
RESUMABLE_CHANGES = ("train.steps", "train.stop_after", "train.log_every", "train.save_every", "train.keep_last",
                     "train.remote_dir",
                     "train.progress", "train.report_to", "train.wandb_", "train.max_nonfinite", "train.output_dir", "data.workers", "data.fast_decode", "data.uint8_batches", "model.pretrained",
                     "model.compile", "model.grad_checkpointing", "eval.")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict[str, Any], cfg: RunConfig, path: Path) -> list[str]:
    """The changes since the checkpoint's run that resuming applies ("key old -> new"); a change the resumed
    state would silently ignore (the learning rate, the model, the data order) raises ConfigError."""
    old, new = _flat(saved), _flat(asdict(cfg))
    changed = [k for k in sorted(new) if k in old and old[k] != new[k]]
    refused = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
    if refused:
        k = refused[0]
        raise ConfigError(f"{k}: is {old[k]!r} in the checkpoint {path} but {new[k]!r} now; resuming keeps the "
                          f"checkpoint's optimizer, schedule, model and data order, so drop the change "
                          f"(or start a new run with another train.output_dir)")
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed]
