"""Planning figures against hand computations: model-state memory per ZeRO stage (DeepSpeed's formulas), counted
FLOPs of a toy two-tower model, epoch sizes, energy arithmetic, and the FLOPs a training run logs."""

import io
import json
import subprocess
import sys
import tarfile

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from helpers import REPO, subprocess_env
from torch import nn

from vlpretrain.cli import main
from vlpretrain.config import DataConfig, ModelConfig
from vlpretrain.energy import EnergyMeter, PowerIntegral, counter_joules, rank_reading, total_over_ranks
from vlpretrain.engine.memory import largest_layer_params, model_state_memory
from vlpretrain.errors import ConfigError, DataError
from vlpretrain.models import build_model
from vlpretrain.planning import epoch_size, flops_per_sample

ENV = subprocess_env()

P, L, N, PER_NODE = 8_000_000, 300_000, 8, 4  # trainable parameters, largest layer, ranks, GPUs per node


def by_stage(rows):
    return {(r.stage, r.offload): (r.gpu_bytes, r.cpu_bytes) for r in rows}


def test_bf16_memory_is_deepspeeds_accounting():
    got = by_stage(model_state_memory(P, 0, L, N, PER_NODE, "bf16"))
    load = int(P * 4 * PER_NODE * 1.5)  # DeepSpeed: every process of a node loads the fp32 model
    offload2 = int(P * max(4 * N, 16) * 1.5)
    assert got == {
        (0, False): (20 * P, load),
        (1, False): (8 * P + 12 * P // N, load),
        (2, False): (2 * P + 18 * P // N, load),
        (3, False): (4 * L + 18 * P // N, int(L * 4 * PER_NODE * 1.5)),
        (1, True): (2 * P, offload2),
        (2, True): (2 * P, offload2),
        (3, True): (4 * L + 2 * P // N, int(P * 16 / (N // PER_NODE) * 1.5)),
    }
    # ZeRO-2/3 are DeepSpeed's own estimators, called the way they document (nodes x GPUs per node)
    cpu, gpu = estimate_zero2_model_states_mem_needs(P, PER_NODE, N // PER_NODE, cpu_offload=False)
    assert got[(2, False)] == (gpu, cpu)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(P, L, PER_NODE, N // PER_NODE, cpu_offload=True,
                                                        cpu_offload_params=False)
    assert got[(3, True)] == (gpu, cpu)


def test_fp32_memory_and_locked_parameters():
    frozen = 1_000_000
    got = {k: gpu for k, (gpu, _) in by_stage(model_state_memory(P, frozen, L, N, PER_NODE, "fp32")).items()}
    # fp32: 4-byte weights and one 4-byte gradient; locked parameters add their weights only (split under ZeRO-3)
    assert got == {
        (0, False): 16 * P + 4 * frozen,
        (1, False): 8 * P + 12 * P // N + 4 * frozen,
        (2, False): 4 * P + 16 * P // N + 4 * frozen,
        (3, False): 4 * L + 16 * P // N + 4 * frozen // N,
        (1, True): 4 * P + 4 * frozen,
        (2, True): 4 * P + 4 * frozen,
        (3, True): 4 * L + 4 * P // N + 4 * frozen // N,
    }


def test_memory_refuses_nodes_that_do_not_divide():
    with pytest.raises(ConfigError, match="--gpus-per-node 8 must divide --world-size 12"):
        model_state_memory(P, 0, L, 12, 8, "bf16")


class ToyTowers(nn.Module):
    """Two towers of plain matmuls whose FLOPs are counted by hand: images (3x2x2) -> 12 -> 8 -> 4, and 3 token
    embeddings of width 2 -> 6 -> 4."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Linear(8, 4))
        self.embed = nn.Embedding(10, 2)
        self.text = nn.Linear(6, 4)
        self.logit_scale = nn.Parameter(torch.ones(1))

    def forward(self, images, texts):
        return {"image_features": self.visual(images), "text_features": self.text(self.embed(texts).flatten(1)),
                "logit_scale": self.logit_scale.exp()}


def test_flops_match_a_hand_count():
    model = ToyTowers()
    f = flops_per_sample(model, image_size=2, context_length=3)
    # forward: 2 x in x out per linear layer
    assert f.forward == 2 * 12 * 8 + 2 * 8 * 4 + 2 * 6 * 4 == 304
    # backward: weight gradients of every layer (2 x in x out each), input gradients of the layers whose input
    # needs one (the second image layer; the text layer, fed by a trainable embedding), none for the pixels
    assert f.backward == (2 * 12 * 8) + 2 * (2 * 8 * 4) + 2 * (2 * 6 * 4) == 416
    assert f.train == 720 and f.locked_saving == 0
    assert all(p.grad is None for p in model.parameters())  # the model never ran

    for p in model.visual.parameters():  # LiT: a locked image tower has no backward at all
        p.requires_grad_(False)
    locked = flops_per_sample(model, image_size=2, context_length=3)
    assert (locked.forward, locked.backward, locked.backward_unlocked) == (304, 96, 416)
    assert locked.locked_saving == 320


def test_patch_dropout_and_checkpointing_change_the_count_as_they_should():
    model = build_model(ModelConfig(name="tiny-vit", patch_dropout=0.5))
    model.set_grad_checkpointing(True)
    masked = flops_per_sample(model, 28, 16)
    full = flops_per_sample(model, 28, 16, patch_dropout=0.0)
    assert model.visual.patch_dropout.prob == 0.5 and model.visual.transformer.grad_checkpointing  # restored
    plain = flops_per_sample(build_model(ModelConfig(name="tiny-vit")), 28, 16)
    assert full == plain  # recomputation by activation checkpointing is not model FLOPs
    assert masked.forward < full.forward


def test_largest_layer_is_the_token_embedding_of_tiny_vit():
    model = build_model(ModelConfig(name="tiny-vit"))
    assert largest_layer_params(model) == 49408 * 128  # vocabulary x width


def write_shards(folder, counts):
    paths = []
    for i, n in enumerate(counts):
        path = folder / f"s-{i:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(n):
                for ext, data in (("txt", b"a caption"), ("jpg", b"\xff\xd8")):
                    info = tarfile.TarInfo(f"{i:03d}{j:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def test_epoch_size_from_shards_and_from_resampled_config(tmp_path):
    write_shards(tmp_path, [9, 9, 9, 9])
    data = DataConfig(train=str(tmp_path / "s-{000000..000003}.tar"), batch_size=4, workers=1)
    e = epoch_size(data, world_size=2, grad_accum=2)
    # each rank reads 2 shards = 18 samples = 4 full batches of 4; 2 micro-steps per optimizer step
    assert (e.batches_per_rank, e.steps, e.samples) == (4, 2.0, 32)
    resampled = DataConfig(train="remote", mode="resampled", train_num_samples=1000, batch_size=16, workers=2)
    e = epoch_size(resampled, world_size=2, grad_accum=2)
    assert (e.batches_per_rank, e.steps, e.samples) == (31, 15.5, 992)  # 1000 // (2 x 16) batches
    with pytest.raises(DataError, match="4 of 4 shards do not exist"):
        epoch_size(DataConfig(train=str(tmp_path / "none-{0..3}.tar")), world_size=1, grad_accum=1)


def test_energy_arithmetic_and_no_reading_on_cpus():
    assert EnergyMeter(torch.device("cpu")).read() is None
    assert EnergyMeter(torch.device("cpu")).kind is None
    assert counter_joules(1_500, 251_500) == 250.0  # NVML counts millijoules
    power = PowerIntegral()
    assert power.add(10.0, 100.0) == 0.0
    assert power.add(12.0, 200.0) == 300.0  # 2 s at a mean of 150 W
    assert power.add(13.0, 200.0) == 500.0
    # what the all-reduce adds up: every rank's joules, and how many ranks had none
    summed = [sum(x) for x in zip(rank_reading(10.0), rank_reading(5.5))]
    assert total_over_ranks(summed) == 15.5
    summed = [sum(x) for x in zip(rank_reading(10.0), rank_reading(None))]
    assert total_over_ranks(summed) is None


def test_run_logs_flops_of_the_samples_trained(tmp_path):
    out = tmp_path / "run"
    # FLIP: steps 1-2 drop half the patches, step 3 (the unmasked tuning) sees them all; a resume between them
    cmd = [sys.executable, str(REPO / "tests" / "train_synthetic.py"), str(out), "train.steps=3",
           "train.grad_accum=2", "model.patch_dropout=0.5", "train.unmasked_steps=1"]
    r = subprocess.run([*cmd, "train.stop_after=2"], env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 130, r.stderr[-3000:]  # stopped at step 2 with a checkpoint
    r = subprocess.run([*cmd, "--resume", "latest"], env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]  # step 3 counts on from the checkpoint's FLOPs
    model = build_model(ModelConfig(name="tiny-vit", patch_dropout=0.5))
    masked = flops_per_sample(model, 28, 16).train
    full = flops_per_sample(model, 28, 16, patch_dropout=0.0).train
    assert masked < full
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    assert [(row["step"], row["samples"]) for row in rows] == [(1, 8), (2, 16), (3, 24)]  # 2 x 4 per step
    assert [row["flops"] for row in rows] == [8 * masked, 16 * masked, 16 * masked + 8 * full]
    assert not any("energy_j" in row for row in rows)  # no GPU, no energy reading
    training = json.loads((out / "results.json").read_text())["training"]
    assert training == {"steps": 3, "samples": 24, "flops": 16 * masked + 8 * full, "flops_per_sample": masked}


def test_info_prints_the_plan_for_a_world_size(tmp_path, capsys):
    write_shards(tmp_path, [9, 9, 9, 9])
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{train: '{tmp_path}/s-{{000000..000003}}.tar', batch_size: 4, workers: 1}}\n"
                      "train: {zero_stage: 2, precision: fp32, steps: 10, warmup_steps: 1}\n")
    assert main(["info", "--config", str(config), "--world-size", "4", "--gpus-per-node", "2"]) == 0
    out = capsys.readouterr().out
    model = build_model(ModelConfig(name="tiny-vit"))
    total = sum(p.numel() for p in model.parameters())
    rows = by_stage(model_state_memory(total, 0, largest_layer_params(model), 4, 2, "fp32"))
    lines = out.splitlines()
    zero2 = next(line for line in lines if line.startswith("#   ZeRO-2"))
    assert zero2.split()[:5] == ["#", "ZeRO-2", "*", f"{rows[(2, False)][0] / 2**20:.1f}", "MiB"]
    assert "4 ranks = 2 node(s) x 2 GPUs" in out and ", fp32, " in out
    f = flops_per_sample(model, 28, 16)
    assert f"#   forward: {f.forward / 1e6:.2f} MFLOP" in lines
    assert f"#   model FLOPs (forward + backward, the MFU convention): {f.train / 1e6:.2f} MFLOP" in lines
    # one 9-sample shard per rank: 2 batches of 4 each, over 4 ranks
    epoch = next(line for line in lines if line.startswith("# epoch"))
    assert "32 samples, 2 batches per rank, 2.0 optimizer steps; train.steps 10 = 5.00 epochs" in epoch

    assert main(["info", "--config", str(config), "--world-size", "12", "--no-data"]) == 0
    out = capsys.readouterr().out
    assert "12 ranks = 3 node(s) x 4 GPUs" in out  # the most GPUs per node up to 8 that divides 12
    assert "#   run (train.steps 10)" in out and "# epoch" not in out  # it got past where the epoch would print
    assert main(["info", "--config", str(config), "--world-size", "12", "--gpus-per-node", "8", "--no-data"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: --gpus-per-node 8 must divide --world-size 12 (both >= 1)"
    assert "# model states" not in captured.out
