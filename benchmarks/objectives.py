"""Optimizer step time of the coca and distill objectives against clip on the same towers, in one invocation.

Each mode is one optimizer step as the trainer takes it: `build_engine` (DeepSpeed, one process, ZeRO-0) and
`build_accumulation` (forward, loss terms, backward, engine step), grad_accum 1 and 2 on micro-batches of b,
`train.accumulation: exact` (at grad_accum 1 that is one plain forward and backward):

  clip          CLIP's objective on the CLIP towers (tiny-vit; ViT-B-32): the baseline
  distill       that CLIP model as the student; the teacher (`--teacher`, default the student's architecture) is a
                randomly initialised copy exported with `export_model` to a temporary folder and loaded as a run
                loads it, forward only, once per micro-batch
  coca          CoCa's objective (contrastive + captioning) on the CoCa towers (tiny-coca; coca_ViT-B-32)
  coca@512      CoCa's objective on tiny-coca-demo: tiny-coca on a 512-token BPE tokenizer of ours (trained here on the
                demo's captions), so its decoder scores 512 tokens per position instead of 49,408 (tiny only)
  clip@coca     CLIP's objective on that same CoCa model. The CoCa towers are not the CLIP ones (attentional
                pooling, a class token in the text tower; tiny-coca also has 2 image blocks of patch 4 where
                tiny-vit has 4 of patch 7; the script prints every difference), so coca / clip@coca is what the
                captioning term adds on the same model. A CoCa
                model runs its text decoder in every forward, so clip@coca still pays the decoder's forward
                (not its backward)

    PYTHONPATH=. python benchmarks/objectives.py [--size tiny --batch 32 --steps 8]          # CPU
    PYTHONPATH=. python benchmarks/objectives.py --modes coca,coca@512 --grad-accum 1         # the vocabulary alone
    PYTHONPATH=. python benchmarks/objectives.py --size ViT-B-32 --batch 256 --precision bf16  # GPU

Time: every mode in one process, taking turns step by step, so that other load on shared cores hits them alike;
the median step time (synchronised with the GPU on CUDA). Memory, on CUDA only: the peak allocated during a step
above what was allocated just before it (activations, gradients, cached features, the teacher's outputs), the
largest over the timed steps. On the CPU memory is not measured: the modes share one process, so its resident set
cannot be split between them (benchmarks/accumulation.py measures one mode per process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlpretrain.engine import DistEnv

# size -> (CLIP architecture, CoCa architecture)
SIZES = {"tiny": ("tiny-vit", "tiny-coca"), "ViT-B-32": ("ViT-B-32", "coca_ViT-B-32")}
MODES = ("clip", "distill", "coca", "clip@coca", "coca@512")
GRAD_ACCUM = (1, 2)


class Setup:
    """One mode at one grad_accum, built as the trainer builds it: objective, model, teacher, engine,
    accumulation."""

    def __init__(self, mode: str, k: int, model_name: str, a: argparse.Namespace, env: DistEnv, out: str,
                 teacher: str | None = None):
        from vlpretrain.accumulate import build_accumulation
        from vlpretrain.config import load_config
        from vlpretrain.engine import build_engine
        from vlpretrain.models import build_model, count_parameters, image_size
        from vlpretrain.objectives import build_objective

        objective = "clip" if mode.startswith("clip") else mode.split("@")[0]
        overrides = ["data.train=synthetic", f"model.name={model_name}", f"data.batch_size={a.batch}",
                     f"train.grad_accum={k}", "train.accumulation=exact", f"train.precision={a.precision}",
                     f"train.output_dir={out}", "train.warmup_steps=1", f"train.objective={objective}"]
        if teacher:
            overrides.append(f"train.objective_options.teacher={teacher}")
        cfg = load_config(None, overrides)
        torch.manual_seed(0)
        self.objective = build_objective(cfg, env.rank, env.world_size)
        model = build_model(cfg.model, self.objective.model_options(cfg))
        self.objective.check_model(model)
        self.params = count_parameters(model)["trainable"]
        self.size, self.context, self.k, self.device = image_size(model), model.context_length, k, env.device
        vocab = model.text.token_embedding.num_embeddings if hasattr(model, "text") else 49408
        engine = build_engine(model, cfg, env)
        self.objective.to(env.device, torch.bfloat16 if a.precision == "bf16" else torch.float32)
        self.accumulation = build_accumulation(engine, self.objective, cfg, env.device)
        g = torch.Generator().manual_seed(1)
        self.batches = [(torch.randn(a.batch, 3, self.size, self.size, generator=g).to(env.device),
                         torch.randint(5, min(49000, vocab), (a.batch, self.context), generator=g).to(env.device))
                        for _ in range(k)]
        self.times: list[float] = []
        self.step_mib = 0.0

    def step(self, record: bool) -> None:
        """One optimizer step (its k micro-batches); its time and, on CUDA, its memory above the start."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        self.accumulation.step(self.batches, lambda loss: None)
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if record:
            self.times.append(seconds)
            if cuda:
                peak = (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
                self.step_mib = max(self.step_mib, peak)


def export_teacher(arch: str, folder: str) -> str:
    """A randomly initialised `arch` written as a run's export, for distill to load as its teacher."""
    from vlpretrain.config import ModelConfig
    from vlpretrain.models import build_model, export_model

    torch.manual_seed(2)
    cfg = ModelConfig(name=arch)
    return str(export_model(build_model(cfg), cfg, Path(folder) / "teacher.safetensors"))


def small_vocab_coca(folder: str) -> str:
    """configs/models/tiny-coca-demo.json reading a 256-token tokenizer trained in `folder` on the demo's captions
    (every training template with every class name), as `make demo-coca` trains it on the shards' captions."""
    import json

    from vlpretrain.tokenizer import train_tokenizer

    repo = Path(__file__).resolve().parents[1]

    def lines(name: str) -> list[str]:
        text = (repo / "configs" / "captions" / name).read_text(encoding="utf-8")
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    texts = [t.replace("{c}", c) for t in lines("fashion_train.txt") for c in lines("fashion_classes.txt")]
    tok = train_tokenizer(texts, 512, Path(folder) / "tokenizer", "bpe", lowercase=True)
    arch = json.loads((repo / "configs" / "models" / "tiny-coca-demo.json").read_text())
    arch["text_cfg"]["hf_tokenizer_name"] = str(tok)
    path = Path(folder) / "tiny-coca-demo.json"
    path.write_text(json.dumps(arch))
    return str(path)


def tower_differences(clip: str, coca: str) -> list[str]:
    """`key a vs b` for each image or text tower setting the two architectures set differently."""
    from vlpretrain.models.clip import model_config_dict

    a, b = model_config_dict(clip), model_config_dict(coca)
    diffs = []
    for tower in ("vision_cfg", "text_cfg"):
        ta, tb = a.get(tower, {}), b.get(tower, {})
        diffs += [f"{tower}.{key} {ta.get(key, '-')} vs {tb.get(key, '-')}"
                  for key in sorted(ta.keys() | tb.keys()) if ta.get(key) != tb.get(key)]
    return diffs


def _ratio(med: float, base: dict[str, float], to: str, applies: bool) -> str:
    """`med` against the baseline mode `to` ("-" where it does not apply or was not timed)."""
    return f"{med / base[to]:.2f}x" if applies and to in base else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="towers: tiny (tiny-vit, tiny-coca) or ViT-B-32 (ViT-B-32, coca_ViT-B-32); default tiny on "
                        "the CPU, ViT-B-32 on a GPU")
    p.add_argument("--teacher", default=None, help="distill's teacher architecture (default: the student's)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size b (default 32 on the CPU, 256 on a GPU)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="default fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per mode")
    p.add_argument("--modes", default=",".join(MODES[:4]),
                   help=f"comma-separated modes of {', '.join(MODES)} (default: all but coca@512, which needs "
                        "transformers and tokenizers)")
    p.add_argument("--grad-accum", type=int, nargs="+", default=list(GRAD_ACCUM), help="values of k to time")
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    gpu = os.environ["DS_ACCELERATOR"] == "cuda"
    a.size = a.size or ("ViT-B-32" if gpu else "tiny")
    a.batch = a.batch or (256 if gpu else 32)
    a.precision = a.precision or ("bf16" if gpu else "fp32")
    clip_arch, coca_arch = SIZES[a.size]
    a.teacher = a.teacher or clip_arch
    modes = [m for m in a.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or ("coca@512" in modes and a.size != "tiny"):
        p.error(f"--modes: unknown {unknown}" if unknown else "--modes: coca@512 needs --size tiny")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)

    from vlpretrain.engine import init_distributed, shutdown_distributed

    env = init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = export_teacher(a.teacher, tmp) if "distill" in modes else None
        archs = {"clip": clip_arch, "distill": clip_arch, "coca": coca_arch, "clip@coca": coca_arch}
        if "coca@512" in modes:
            archs["coca@512"] = small_vocab_coca(tmp)
        setups = {(mode, k): Setup(mode, k, archs[mode], a, env, f"{tmp}/{mode}-{k}",
                                   teacher if mode == "distill" else None)
                  for k in a.grad_accum for mode in modes}
        for i in range(a.warmup + a.steps):
            for setup in setups.values():
                setup.step(record=i >= a.warmup)
        shutdown_distributed()

    device = torch.cuda.get_device_name() if gpu else f"CPU, torch threads {torch.get_num_threads()}"
    print(f"# {a.size}: clip {clip_arch}, coca {coca_arch}, distill teacher {a.teacher} (export); micro-batch "
          f"{a.batch}, {a.precision}, exact accumulation, {device}, median of {a.steps} steps")
    diffs = tower_differences(clip_arch, coca_arch)
    if diffs:
        print(f"# the CoCa towers differ from the CLIP ones ({'; '.join(diffs)}): read coca against clip@coca")
    print(f"{'mode':<10} {'k':>2} {'step ms':>9} {'samples/s':>10} {'vs clip':>8} {'vs clip@coca':>13} "
          f"{'vs coca':>8} {'step MiB':>9} {'params':>12}")
    for k in a.grad_accum:
        base = {m: statistics.median(setups[m, k].times) for m in ("clip", "clip@coca", "coca") if (m, k) in setups}
        for mode in modes:
            s = setups[mode, k]
            med = statistics.median(s.times)
            memory = f"{s.step_mib:.0f}" if gpu else "n/a"
            print(f"{mode:<10} {k:>2} {med * 1000:>9.1f} {k * a.batch / med:>10.0f} "
                  f"{_ratio(med, base, 'clip', True):>8} "
                  f"{_ratio(med, base, 'clip@coca', mode in ('coca', 'clip@coca')):>13} "
                  f"{_ratio(med, base, 'coca', mode.startswith('coca')):>8} {memory:>9} {s.params:>12,}")
    print("step ms: median optimizer step (k micro-batches of b); step MiB: CUDA peak allocated during a step above "
          "the allocation before it (n/a on the CPU); params: trainable (a teacher's are not)")


if __name__ == "__main__":
    main()
