"""The objectives contract: each objective's terms against a hand computation; CoCa and distillation accumulate
exactly (k micro-batches of b give one batch of k x b: the contrastive and distillation terms over the whole batch,
captioning as the mean of the micro-batches' terms); options and models are checked before training."""

import json
import math

import pytest
import torch
from helpers import COMMON, TorchEngine, assert_same_run, grads, losses, run

from vlpretrain.accumulate import ExactAccumulation, IndependentMicroBatches
from vlpretrain.config import ModelConfig, RunConfig, TrainConfig, load_config
from vlpretrain.errors import ConfigError
from vlpretrain.models import build_model, export_model
from vlpretrain.objectives import OBJECTIVES, build_objective, check_objective, total
from vlpretrain.objectives.distill import fit_context

K, B = 2, 3


def assert_same_grads(got, ref):
    """Equal up to float rounding, relative to each gradient's largest entry (sums taken in another order)."""
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6 * max(1.0, ref[k].abs().max().item()), msg=k)


def objective(name: str, **options):
    return build_objective(RunConfig(train=TrainConfig(objective=name, objective_options=options)))


def feats(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_registry_names_every_objective():
    assert sorted(OBJECTIVES) == ["clip", "coca", "distill", "siglip"]


def test_clip_and_siglip_terms_by_hand():
    i, t = feats([1.0, 0.0], [0.6, 0.8]), feats([0.8, 0.6], [0.0, 1.0])
    s = torch.tensor([2.0], dtype=torch.float64)
    # logits s * i.t: [[1.6, 0], [1.92, 1.6]]
    rows = (math.log(math.exp(1.6) + 1) - 1.6 + math.log(math.exp(1.92) + math.exp(1.6)) - 1.6) / 2
    cols = (math.log(math.exp(1.6) + math.exp(1.92)) - 1.6 + math.log(1 + math.exp(1.6)) - 1.6) / 2
    terms = objective("clip").batch_terms({"image_features": i, "text_features": t, "logit_scale": s})
    assert list(terms) == ["contrastive"]
    assert terms["contrastive"].item() == pytest.approx((rows + cols) / 2, rel=1e-12)

    b = torch.tensor([-1.0], dtype=torch.float64)
    z = [[1.6 - 1, 0 - 1], [1.92 - 1, 1.6 - 1]]
    label = [[1, -1], [-1, 1]]
    sig = -sum(math.log(1 / (1 + math.exp(-label[r][c] * z[r][c]))) for r in range(2) for c in range(2)) / 2
    terms = objective("siglip").batch_terms({"image_features": i, "text_features": t, "logit_scale": s,
                                             "logit_bias": b})
    assert terms["contrastive"].item() == pytest.approx(sig, rel=1e-12)


def test_coca_caption_term_by_hand():
    # one caption of 3 tokens over a vocabulary of 3; the last label is padding (id 0) and is left out
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[1, 2, 0]])
    ce1 = math.log(math.exp(2) + 2) - 0.0  # target 1 has logit 0
    ce2 = math.log(1 + math.exp(1) + math.exp(3)) - 3.0
    terms = objective("coca", caption_weight=2.0).sample_terms({"logits": logits, "labels": labels})
    assert terms["caption"].item() == pytest.approx(2.0 * (ce1 + ce2) / 2, rel=1e-12)


def test_distill_term_by_hand(tmp_path):
    i, t = feats([1.0, 0.0], [0.6, 0.8]), feats([0.8, 0.6], [0.0, 1.0])
    ti, tt = feats([0.0, 1.0], [1.0, 0.0]), feats([0.6, 0.8], [1.0, 0.0])
    s, ts = torch.tensor([2.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)

    def soft_ce(teacher, student):  # rows of logits
        out = 0.0
        for tr, sr in zip(teacher, student):
            p = [math.exp(x) / sum(math.exp(y) for y in tr) for x in tr]
            lse = math.log(sum(math.exp(y) for y in sr))
            out += -sum(pk * (sk - lse) for pk, sk in zip(p, sr))
        return out / len(teacher)

    def logits(a, b, scale):
        return [[scale * sum(x * y for x, y in zip(r, c)) for c in b.tolist()] for r in a.tolist()]

    want = 0.5 * (soft_ce(logits(ti, tt, 3.0), logits(i, t, 2.0)) + soft_ce(logits(tt, ti, 3.0), logits(t, i, 2.0)))
    obj = objective("distill", teacher="unused", weight=0.5)
    terms = obj.batch_terms({"image_features": i, "text_features": t, "logit_scale": s,
                             "teacher_image_features": ti, "teacher_text_features": tt, "teacher_logit_scale": ts})
    assert sorted(terms) == ["contrastive", "distill"]
    assert terms["distill"].item() == pytest.approx(0.5 * want, rel=1e-12)
    assert terms["contrastive"].item() == pytest.approx(
        objective("clip").batch_terms({"image_features": i, "text_features": t, "logit_scale": s})["contrastive"].item())


def batch(n: int, context: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 28, 28, generator=g), torch.randint(1, 49000, (n, context), generator=g)


def step(model, obj, images, texts, k, exact=True):
    engine = TorchEngine(model, k)
    cls = ExactAccumulation if exact else IndependentMicroBatches
    acc = cls(engine, obj, k, torch.device("cpu")) if exact else cls(engine, obj, k)
    loss, logged = acc.step(list(zip(images.chunk(k), texts.chunk(k))), lambda loss: None)
    return loss, logged, grads(model)


def coca_model():
    torch.manual_seed(0)
    return build_model("tiny-coca").train()


def test_coca_decoder_starts_initialised_whatever_memory_held():
    """open_clip leaves the CoCa decoder's output projection as torch.empty: build_model initialises it, so two
    builds under one seed are equal even when freed memory held huge values in between."""
    torch.manual_seed(0)
    first = build_model("tiny-coca").state_dict()
    junk = [torch.full((1 << 20,), 1e30) for _ in range(16)]
    del junk
    torch.manual_seed(0)
    second = build_model("tiny-coca").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    projection = second["text_decoder.text_projection"]
    assert projection.std().item() == pytest.approx(128 ** -0.5, rel=0.05)  # width ** -0.5, open_clip's own rule


def test_coca_exact_accumulation_equals_one_batch_with_mean_caption_term():
    images, texts = batch(K * B)
    obj = objective("coca")
    ref_model = coca_model()
    out = ref_model(images, texts)
    captions = [obj.sample_terms(ref_model(im, tx))["caption"] for im, tx in zip(images.chunk(K), texts.chunk(K))]
    ref = obj.batch_terms(out)["contrastive"] + torch.stack(captions).mean()
    ref.backward()
    model = coca_model()
    loss, logged, got = step(model, obj, images, texts, K)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert logged["loss/caption"].item() == pytest.approx(torch.stack(captions).mean().item(), rel=1e-5)
    assert "loss/contrastive" in logged
    assert_same_grads(got, grads(ref_model))
    # the decoder learns: its weights have gradients
    assert any(k.startswith("text_decoder.") for k in got)


def test_distill_exact_accumulation_equals_one_batch(tmp_path):
    torch.manual_seed(5)
    teacher = build_model("tiny-vit")
    path = export_model(teacher, ModelConfig(name="tiny-vit"), tmp_path / "teacher.safetensors")
    cfg = RunConfig(model=ModelConfig(name="tiny-vit"),
                    train=TrainConfig(objective="distill", objective_options={"teacher": str(path)}))
    images, texts = batch(K * B)

    def student():
        torch.manual_seed(0)
        return build_model("tiny-vit").train()

    obj = build_objective(cfg)
    ref_model = student()
    obj.check_model(ref_model)
    out = {**ref_model(images, texts), **obj.targets(images, texts)}
    terms = obj.batch_terms(out)
    assert terms["distill"].item() > 0
    ref = total(terms)
    ref.backward()
    model = student()
    loss, logged, got = step(model, obj, images, texts, K)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert logged["loss/distill"].item() == pytest.approx(terms["distill"].item(), rel=1e-5)
    assert_same_grads(got, grads(ref_model))
    assert all(not p.requires_grad and p.grad is None for p in obj.teacher.parameters())  # frozen
    # independent micro-batches distil within each micro-batch only: another loss
    loss_indep, _, _ = step(student(), obj, images, texts, K, exact=False)
    assert loss_indep.item() != pytest.approx(ref.item(), rel=1e-3)


def test_objective_and_options_are_checked_when_the_config_loads(tmp_path):
    # the old key still reads, as the new one
    assert load_config(None, ["data.train=x", "train.loss=siglip"]).train.objective == "siglip"
    with pytest.raises(ConfigError, match="renamed to train.objective"):
        load_config(None, ["data.train=x", "train.loss=siglip", "train.objective=clip"])
    # load_config itself refuses a bad objective or option, naming where the value came from
    with pytest.raises(ConfigError, match=r"^--set train.objective=cocaa: train.objective: unknown objective 'cocaa'; "
                                          r"choose one of"):
        load_config(None, ["data.train=x", "train.objective=cocaa"])
    with pytest.raises(ConfigError, match=r"train.objective_options.caption_weigth: unknown key \(did you mean "
                                          r"train.objective_options.caption_weight\?\)"):
        load_config(None, ["data.train=x", "train.objective=coca", "train.objective_options.caption_weigth=1"])
    with pytest.raises(ConfigError, match="train.objective_options.caption_weight: must be >= 0"):
        load_config(None, ["data.train=x", "train.objective=coca", "train.objective_options.caption_weight=-1"])
    config = tmp_path / "run.yaml"
    config.write_text("data: {train: x}\ntrain: {objective: distill}\n")
    with pytest.raises(ConfigError, match=rf"^{config}: train.objective_options.teacher: required value missing"):
        load_config(config)
    # and so does check_objective, which train() calls on configs built without load_config
    cfg = load_config(None, ["data.train=x"])
    cfg.train.objective = "cocaa"
    with pytest.raises(ConfigError, match=r"unknown objective 'cocaa'"):
        check_objective(cfg)
    with pytest.raises(ConfigError, match="coca needs a CoCa architecture"):
        objective("coca").check_model(build_model("tiny-vit"))
    # a teacher that reads other images than the student's
    teacher = export_model(build_model("tiny-resnet"), ModelConfig(name="tiny-resnet"), tmp_path / "t.safetensors")
    with pytest.raises(ConfigError, match="reads 32 px images, the student 28 px"):
        objective("distill", teacher=str(teacher)).check_model(build_model("tiny-vit"))


def test_fit_context_keeps_the_end_of_text_token():
    eot = 49407
    tokens = torch.tensor([[49406, 5, 6, 7, eot, 0], [49406, 5, eot, 0, 0, 0]])
    cut = fit_context(tokens, 4)
    assert cut.tolist() == [[49406, 5, 6, eot], [49406, 5, eot, 0]]
    assert fit_context(tokens, 8)[:, 6:].eq(0).all() and fit_context(tokens, 6) is tokens


# ---- in the trainer (DeepSpeed) ------------------------------------------------------------------------------

@pytest.mark.slow
def test_trainer_coca_and_distill_under_zero3_follow_zero0(tmp_path):
    """CoCa: exact accumulation under ZeRO-3 equals one big batch under ZeRO-0 (on these captions no token is
    padding, so the mean of micro-batch caption losses is the big batch's). Distillation into an MoE student: ZeRO-3
    follows ZeRO-0 step for step, the teacher beside the engine."""

    coca = [*COMMON, "model.name=tiny-coca", "train.objective=coca"]
    run(tmp_path / "coca-big", *coca, "data.batch_size=8", extra=["--per-sample"])
    run(tmp_path / "coca-exact", *coca, "data.batch_size=4", "train.grad_accum=2", "train.zero_stage=3",
        extra=["--per-sample"])
    assert_same_run(tmp_path / "coca-big", tmp_path / "coca-exact", 3)
    rows = [json.loads(x) for x in (tmp_path / "coca-exact" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == pytest.approx(r["loss/contrastive"] + r["loss/caption"], rel=1e-5)
               for r in rows if "loss" in r)

    torch.manual_seed(5)
    teacher = export_model(build_model("tiny-vit"), ModelConfig(name="tiny-vit"), tmp_path / "teacher.safetensors")
    distill = ["train.steps=2", "train.warmup_steps=1", "train.eps=0.01", "train.grad_accum=2",
               "train.objective=distill", f"train.objective_options.teacher={teacher}",
               "model.moe.num_experts=4", "model.moe.towers=both", "model.moe.capacity_factor=8.0"]
    run(tmp_path / "d0", *distill)
    run(tmp_path / "d3", *distill, "train.zero_stage=3")
    a, b = losses(tmp_path / "d0"), losses(tmp_path / "d3")
    assert sorted(a) == sorted(b) == [1, 2]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s
    rows = [json.loads(x) for x in (tmp_path / "d3" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss" in r)
    assert first["loss/distill"] > 0 and first["loss/moe_aux"] > 0
    assert first["loss"] == pytest.approx(first["loss/contrastive"] + first["loss/distill"] + first["loss/moe_aux"],
                                          rel=1e-5)
