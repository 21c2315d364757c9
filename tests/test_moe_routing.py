"""MoE routing as pure functions: block choice, capacity, top-k dispatch with dropping and priority, aux losses."""

import math

import pytest
import torch

from vlpretrain.errors import ConfigError
from vlpretrain.models.moe import balance_loss, expert_capacity, route, select_blocks, z_loss


@pytest.mark.parametrize("spec,depth,want", [
    ("every_2", 4, [1, 3]),
    ("every_2", 3, [1]),
    ("every_3", 12, [2, 5, 8, 11]),
    ("every_1", 3, [0, 1, 2]),
    ("last_2", 4, [2, 3]),
    ("all", 3, [0, 1, 2]),
    ([0, -1], 4, [0, 3]),
    ([3, 1, 3], 4, [1, 3]),
])
def test_select_blocks(spec, depth, want):
    assert select_blocks(spec, depth) == want


@pytest.mark.parametrize("spec,needle", [
    ("every_0", "N >= 1"), ("every_x", "N >= 1"), ("last_5", "more blocks"), ("first_2", "expected 'every_N'"),
    ([4], "outside a tower of 4"), ("every_5", "selects no block"), ("all_2", "takes no argument"),
])
def test_select_blocks_errors(spec, needle):
    with pytest.raises(ConfigError, match="model.moe.layers") as e:
        select_blocks(spec, 4)
    assert needle in str(e.value)


@pytest.mark.parametrize("tokens,k,experts,factor,want", [
    (4, 1, 2, 1.0, 2),  # 4 tokens over 2 experts
    (4, 1, 2, 0.5, 1),
    (4, 1, 2, 0.0, 4),  # no dropping: room for every token
    (4, 1, 2, -1.0, 4),
    (10, 2, 4, 1.25, 7),  # ceil(10 / 4 * 2.5) = ceil(6.25)
    (3, 2, 3, 1.0, 2),
    (8320, 2, 8, 1.25, 2600),
])
def test_capacity(tokens, k, experts, factor, want):
    assert expert_capacity(tokens, k, experts, factor) == want


def sig(z):
    return 1 / (1 + math.exp(-z))


# 4 tokens, 2 experts: tokens 0, 2, 3 prefer expert 0 (margins 1, 3, 2), token 1 prefers expert 1 (margin 1)
LOGITS_4x2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [2.0, 0.0]])


def test_route_top1_position_order_drops_the_last_token():
    r = route(LOGITS_4x2, top_k=1, capacity=2, normalize=False)
    assert r.expert_index[:, 0].tolist() == [0, 1, 0, 0]
    # expert 0 fills with tokens 0 and 2 (position order); token 3 finds no slot
    assert r.token.tolist() == [0, 2, 1] and r.counts.tolist() == [2, 1]
    assert r.kept[:, 0].tolist() == [True, True, True, False]
    assert torch.allclose(r.slot_weight, torch.tensor([sig(1), sig(3), sig(1)]))
    assert torch.allclose(r.load, torch.tensor([0.75, 0.25]))


def test_route_top1_batch_priority_keeps_the_most_confident():
    r = route(LOGITS_4x2, top_k=1, capacity=2, normalize=False, batch_priority=True)
    # expert 0 candidates by top-1 probability: token 2 (sig 3), token 3 (sig 2), token 0 (sig 1): token 0 drops
    assert r.token.tolist() == [2, 3, 1]
    assert r.kept[:, 0].tolist() == [False, True, True, True]
    assert torch.allclose(r.slot_weight, torch.tensor([sig(3), sig(2), sig(1)]))


def test_route_top1_normalised_weight_is_one_and_large_capacity_drops_nothing():
    r = route(LOGITS_4x2, top_k=1, capacity=4, normalize=True)
    assert r.kept.all() and r.counts.tolist() == [3, 1]
    assert r.token.tolist() == [0, 2, 3, 1]
    assert torch.equal(r.slot_weight, torch.ones(4))


def test_route_top2_first_choices_claim_slots_before_second_choices():
    # 3 tokens, 3 experts, capacity 2. First choices: t0->e0, t1->e1, t2->e1 (e1 now full).
    # Second choices in position order: t0->e1 dropped (full), t1->e2 kept, t2->e0 kept.
    logits = torch.tensor([[3.0, 2.0, 0.0], [0.0, 3.0, 2.0], [2.0, 3.0, 0.0]])
    r = route(logits, top_k=2, capacity=2, normalize=True)
    assert r.expert_index.tolist() == [[0, 1], [1, 2], [1, 0]]
    assert r.kept.tolist() == [[True, False], [True, True], [True, True]]
    assert r.token.tolist() == [0, 2, 1, 2, 1]  # e0: t0, t2 | e1: t1, t2 | e2: t1
    assert r.counts.tolist() == [2, 2, 1]
    hi, lo = math.exp(3), math.exp(2)
    w_hi, w_lo = hi / (hi + lo), lo / (hi + lo)  # every token's top two logits are 3 and 2
    # token 0 keeps only its first choice, with its pre-drop share (not renormalised to 1)
    assert torch.allclose(r.slot_weight, torch.tensor([w_hi, w_lo, w_hi, w_hi, w_lo]))
    assert torch.allclose(r.load, torch.tensor([2 / 6, 3 / 6, 1 / 6]))


@pytest.mark.parametrize("priority,kept,token", [
    # position order: second choices t0->e2 (kept), t1->e2 (full: dropped), t2->e0
    (False, [[True, True], [True, False], [True, True]], [0, 2, 1, 2, 0]),
    # batch priority (t2, then t1, then t0 by top-1 probability): t2->e0, t1->e2 (kept), t0->e2 (dropped)
    (True, [[True, False], [True, True], [True, True]], [0, 2, 1, 2, 1]),
])
def test_route_top2_batch_priority_changes_who_drops(priority, kept, token):
    # first choices t0->e0 (barely: 3 vs 2.9), t1->e1, t2->e2 (confident); all second choices compete for e2/e0
    logits = torch.tensor([[3.0, 0.0, 2.9], [0.0, 3.0, 2.0], [2.0, 0.0, 5.0]])
    r = route(logits, top_k=2, capacity=2, normalize=False, batch_priority=priority)
    assert r.expert_index.tolist() == [[0, 2], [1, 2], [2, 0]]
    assert r.kept.tolist() == kept
    assert r.token.tolist() == token


def test_route_gradient_reaches_logits_through_weights():
    logits = LOGITS_4x2.clone().requires_grad_()
    r = route(logits, top_k=1, capacity=4, normalize=False)
    r.slot_weight.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_balance_loss_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    top1 = probs.argmax(dim=1, keepdim=True)
    # fraction routed: [3/4, 1/4]; mean probability [0.6, 0.4]; 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert balance_loss(probs, top1).item() == pytest.approx(1.1)
    # only the top-1 column counts
    assert balance_loss(probs, torch.cat([top1, 1 - top1], 1)).item() == pytest.approx(1.1)


def test_balance_loss_is_one_when_even():
    probs = torch.full((6, 3), 1 / 3)
    assert balance_loss(probs, torch.tensor([[0], [1], [2], [0], [1], [2]])).item() == pytest.approx(1.0)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    # logsumexp: log 2 and log 4
    want = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(want)
