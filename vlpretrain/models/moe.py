"""Sparse Mixture-of-Experts MLPs for open_clip and Hugging Face towers: routing, the native layer, conversion and
auxiliary losses.

`convert_to_moe` swaps the `.mlp` of chosen residual blocks for an MoE layer whose experts are copies of that MLP
(so converting a trained dense model is sparse upcycling); in a Hugging Face encoder layer the MoE layer takes the
feed-forward's place (`hf_text.hf_feed_forward`). Routing is a pure function (`route`) so capacity,
dropping and priority are tested directly. Every layer stores its auxiliary losses and routing statistics after
each forward; `moe_losses` gathers them per tower for the training loss and the metrics.

Two backends share one interface (`MoELayer`): the native layer here (experts replicated on every data-parallel
rank, works under every ZeRO stage) and DeepSpeed's `deepspeed.moe.layer.MoE` for expert parallelism. Models are
always built with the native layer; with `model.moe.backend: deepspeed` the engine swaps DeepSpeed's layer in
(`vlpretrain.engine.moe.use_deepspeed_moe`), as it wraps the rest of a built model, so this module never knows it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlpretrain.config import MoEConfig
from vlpretrain.errors import ConfigError
from vlpretrain.models.hf_text import hf_feed_forward, hf_layers, hf_text_tower, set_hf_feed_forward

# ---------------------------------------------------------------------------------------------------------------
# which blocks


def _every(arg: str, depth: int) -> list[int]:
    n = _positive_int(arg, "every_N")
    return [i for i in range(depth) if i % n == n - 1]  # the N-th, 2N-th, ... block, as V-MoE's "every 2"


def _last(arg: str, depth: int) -> list[int]:
    n = _positive_int(arg, "last_N")
    if n > depth:
        raise ConfigError(f"model.moe.layers: last_{n} asks for more blocks than the tower's {depth}")
    return list(range(depth - n, depth))


def _all(arg: str, depth: int) -> list[int]:
    if arg:
        raise ConfigError(f"model.moe.layers: 'all' takes no argument, got 'all_{arg}'")
    return list(range(depth))


def _positive_int(arg: str, form: str) -> int:
    if not arg.isdigit() or int(arg) < 1:
        raise ConfigError(f"model.moe.layers: expected {form} with N >= 1, got {form.split('_')[0]}_{arg}")
    return int(arg)


LAYER_RULES: dict[str, Callable[[str, int], list[int]]] = {"every": _every, "last": _last, "all": _all}


def select_blocks(spec: str | list[int], depth: int) -> list[int]:
    """Sorted indices of the blocks that `model.moe.layers` picks in a tower of `depth` blocks."""
    if isinstance(spec, list):
        out = set()
        for i in spec:
            if not -depth <= i < depth:
                raise ConfigError(f"model.moe.layers: block {i} is outside a tower of {depth} blocks")
            out.add(i % depth)
        chosen = sorted(out)
    else:
        rule, _, arg = spec.partition("_")
        if rule not in LAYER_RULES:
            raise ConfigError(f"model.moe.layers: expected 'every_N', 'last_N', 'all' or a list, got {spec!r}")
        chosen = LAYER_RULES[rule](arg, depth)
    if not chosen:
        raise ConfigError(f"model.moe.layers: {spec!r} selects no block of a tower of {depth} blocks")
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# routing (pure functions)


def expert_capacity(tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Token slots per expert: ceil(factor * tokens * k / experts); factor <= 0 means room for every token."""
    if factor <= 0:
        return tokens
    # same arithmetic order as deepspeed.moe.sharded_moe._capacity, so both backends agree on the boundary
    return max(1, math.ceil((tokens / num_experts) * (factor * top_k)))


@dataclass
class Routing:
    """Where each token goes: every assignment sorted by expert (in the order they claimed a slot), its slot in a
    [E x capacity] buffer, and whether it found one. Nothing here needs the host: no data-dependent shapes."""

    probs: Tensor  # [T, E] router softmax (fp32)
    expert_index: Tensor  # [T, k] chosen experts, best first
    weight: Tensor  # [T, k] combine weights (renormalised when asked)
    kept: Tensor  # [T, k] bool: the assignment found a free slot
    sorted_token: Tensor  # [T*k] token of each assignment, grouped by expert (expert 0 first)
    sorted_weight: Tensor  # [T*k] its combine weight, 0 where it was dropped
    slot: Tensor  # [T*k] its row in the [E * capacity] expert buffer; E * capacity (one spare row) if dropped
    keep: Tensor  # [T*k] bool: it found a slot
    counts: Tensor  # [E] kept assignments per expert
    load: Tensor  # [E] assignments per expert before dropping, as a fraction of all T*k
    capacity: int

    @property
    def token(self) -> Tensor:
        """[N] token of each kept assignment, grouped by expert (a data-dependent shape: reading it syncs)."""
        return self.sorted_token[self.keep]

    @property
    def slot_weight(self) -> Tensor:
        """[N] combine weight of each kept assignment, in `token`'s order."""
        return self.sorted_weight[self.keep]


def route(logits: Tensor, top_k: int, capacity: int, normalize: bool = True, batch_priority: bool = False) -> Routing:
    """Top-k routing with per-expert capacity by a stable sort of assignments by expert (no one-hot tensors).

    Slots are claimed by every token's first choice before any second choice (GShard's order); within one
    choice rank tokens go in position order, or by descending top-1 probability with batch-priority routing
    (V-MoE, Riquelme et al. 2021). Assignments past an expert's capacity are dropped; weights are normalised
    over the k choices before dropping, so a token that loses a choice keeps only the others' share.
    """
    num_tokens, num_experts = logits.shape
    probs = logits.float().softmax(dim=-1)
    top_p, top_e = probs.topk(top_k, dim=-1)
    weight = top_p / top_p.sum(dim=-1, keepdim=True) if normalize else top_p
    if batch_priority:
        order = torch.argsort(top_p[:, 0].detach(), descending=True, stable=True)
    else:
        order = torch.arange(num_tokens, device=logits.device)
    # assignment a = r * T + i is choice r of the i-th token in priority order
    assign_expert = top_e[order].t().reshape(-1)
    assign_token = order.repeat(top_k)
    assign_choice = torch.arange(top_k, device=logits.device).repeat_interleave(num_tokens)
    by_expert, perm = torch.sort(assign_expert, stable=True)  # stable: priority order survives within an expert
    totals = torch.bincount(assign_expert, minlength=num_experts)
    starts = torch.cumsum(totals, 0) - totals
    position = torch.arange(perm.numel(), device=logits.device) - starts[by_expert]
    keep = position < capacity
    token, choice = assign_token[perm], assign_choice[perm]
    kept = torch.zeros(num_tokens, top_k, dtype=torch.bool, device=logits.device)
    kept[token, choice] = keep
    slot = torch.where(keep, by_expert * capacity + position, num_experts * capacity)
    return Routing(probs=probs, expert_index=top_e, weight=weight, kept=kept, sorted_token=token,
                   sorted_weight=weight[token, choice] * keep, slot=slot, keep=keep,
                   counts=totals.clamp(max=capacity), load=totals.float() / (num_tokens * top_k), capacity=capacity)


def balance_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e (fraction of tokens whose top-1 is e) * mean prob_e.

    Top-1 assignments are counted (as Switch and DeepSpeed's top-1/top-2 gates do), before any dropping;
    the loss is 1 for perfectly even routing.
    """
    num_experts = probs.shape[-1]
    fraction = torch.bincount(expert_index[:, 0], minlength=num_experts).float() / probs.shape[0]
    return num_experts * torch.sum(fraction * probs.mean(dim=0))


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


# ---------------------------------------------------------------------------------------------------------------
# layers


@dataclass
class MoEAux:
    """Auxiliary losses and routing statistics of one layer's latest forward."""

    balance: Tensor  # Switch load-balancing loss (carries gradient)
    zloss: Tensor  # router z-loss (carries gradient)
    load: Tensor  # [E] fraction of assignments per expert before dropping (detached)
    dropped: Tensor  # fraction of the T*k assignments dropped for lack of capacity (detached)


class MoELayer(nn.Module):
    """Interface of both backends: a drop-in for a residual block's MLP that records `aux` after each forward."""

    num_experts: int
    top_k: int
    tower: str
    block: int
    aux_loss_weight: float
    z_loss_weight: float
    aux: MoEAux | None

    def expert_parameters(self) -> int:
        """Parameters of the experts this layer holds."""
        raise NotImplementedError

    def router_weight(self) -> Tensor:
        """The router's [E, d] weight."""
        raise NotImplementedError

    def reset_router(self, generator: torch.Generator | None = None) -> None:
        """Fresh router weights: normal with std sqrt(0.1 / d), Switch Transformer's router init scale."""
        w = self.router_weight()
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=generator) * math.sqrt(0.1 / w.shape[1]))

    def inactive_parameters(self) -> int:
        """Expert parameters a token does not use: (E - k) / E of them (read by count_parameters)."""
        return self.expert_parameters() * (self.num_experts - self.top_k) // self.num_experts

    def native_state(self) -> dict[str, Tensor] | None:
        """This layer's tensors under the native layer's names where its own differ (DeepSpeed), else None."""
        return None


class MoEMLP(MoELayer):
    """Native MoE MLP: fp32 router, top-k with capacity, experts run on gathered token slices.

    Every expert runs on every forward, on an empty slice if no token chose it, so all ranks and all ZeRO
    stages see the same parameters take part in backward.
    """

    def __init__(self, dense_mlp: nn.Module, d_model: int, cfg: MoEConfig, tower: str = "", block: int = -1):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.capacity_factor, self.eval_capacity_factor = cfg.capacity_factor, cfg.eval_capacity_factor
        self.jitter, self.normalize, self.batch_priority = cfg.jitter, cfg.normalize_weights, cfg.batch_priority
        self.aux_loss_weight, self.z_loss_weight = cfg.aux_loss_weight, cfg.z_loss_weight
        self.tower, self.block = tower, block
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(copy.deepcopy(dense_mlp) for _ in range(cfg.num_experts))
        self.aux = None
        self.reset_router()

    def router_weight(self) -> Tensor:
        return self.router.weight

    def expert_parameters(self) -> int:
        return sum(p.numel() for p in self.experts.parameters())

    def router_logits(self, tokens: Tensor) -> Tensor:
        """[T, E] logits in fp32 whatever the autocast or parameter dtype (routing is precision-sensitive)."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            x = tokens.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return F.linear(x, self.router.weight.float())

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router_logits(tokens)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = expert_capacity(tokens.shape[0], self.top_k, self.num_experts, factor)
        r = route(logits, self.top_k, capacity, self.normalize, self.batch_priority)
        # combine in fp32; a dropped assignment adds nothing, so its token rides the residual path alone
        out = torch.zeros(tokens.shape, dtype=torch.float32, device=x.device)
        if factor > 0:  # fixed [capacity, d] slices: static shapes, no host sync (see `_padded_experts`)
            y = self._padded_experts(tokens, r)
            out.index_add_(0, r.sorted_token, y.float() * r.sorted_weight.unsqueeze(1))
        else:  # room for every token: padding would cost E x, so exact-size slices (their sizes sync)
            slices = tokens.index_select(0, r.token).split(r.counts.tolist())
            y = torch.cat([expert(s) for expert, s in zip(self.experts, slices)])
            out.index_add_(0, r.token, y.float() * r.slot_weight.unsqueeze(1))
        self.aux = MoEAux(balance=balance_loss(r.probs, r.expert_index), zloss=z_loss(logits),
                          load=r.load.detach(), dropped=1.0 - r.kept.float().mean().detach())
        return out.to(x.dtype).reshape(x.shape)

    def _padded_experts(self, tokens: Tensor, r: Routing) -> Tensor:
        """Every expert on its [capacity, d] slice of a zero-padded buffer; [T*k, d] outputs in `r.sorted_token`'s
        order (zeros for dropped assignments). The MLP works token by token, so padding rows change nothing
        for the real ones; they cost at most capacity_factor x the routed tokens' compute."""
        c, n = r.capacity, self.num_experts
        buffer = tokens.new_zeros(n * c + 1, tokens.shape[1]).index_copy(0, r.slot, tokens[r.sorted_token])
        y = torch.cat([expert(buffer[e * c:(e + 1) * c]) for e, expert in enumerate(self.experts)])
        return torch.cat([y, y.new_zeros(1, y.shape[1])])[r.slot]


# ---------------------------------------------------------------------------------------------------------------
# configuration checks


def validate_moe_config(cfg: MoEConfig) -> None:
    """Raise ConfigError naming the `model.moe` key of a setting no backend can run, or of a dense config."""
    if cfg.num_experts < 1:
        raise ConfigError(f"model.moe.num_experts: expected >= 1 for an MoE model, got {cfg.num_experts}")
    cfg.validate()


# ---------------------------------------------------------------------------------------------------------------
# conversion and collection


def _image_blocks(model: nn.Module) -> nn.ModuleList | None:
    return getattr(getattr(getattr(model, "visual", None), "transformer", None), "resblocks", None)


def _text_blocks(model: nn.Module) -> nn.ModuleList | None:
    tower = getattr(model, "transformer", None) or getattr(getattr(model, "text", None), "transformer", None)
    return getattr(tower, "resblocks", None)


TOWER_BLOCKS: dict[str, Callable[[nn.Module], nn.ModuleList | None]] = {"image": _image_blocks, "text": _text_blocks}
TOWERS: dict[str, tuple[str, ...]] = {"image": ("image",), "text": ("text",), "both": ("image", "text")}


def convert_to_moe(model: nn.Module, cfg: MoEConfig) -> nn.Module:
    """Replace the MLP of the blocks `cfg` picks with native MoE layers whose experts copy it; return `model`.
    In a Hugging Face text tower (BERT, RoBERTa, XLM-R) the MLP is a layer's `intermediate.dense`, activation and
    `output.dense` (`hf_feed_forward`).

    Applied to a trained model this is sparse upcycling (Komatsuzaki et al. 2022): every expert starts as the
    dense MLP, so with no token dropped and normalised weights the model computes what it did before.
    """
    validate_moe_config(cfg)
    if cfg.towers not in TOWERS:
        raise ConfigError(f"model.moe.towers: expected one of {sorted(TOWERS)}, got {cfg.towers!r}")
    if moe_layers(model):
        raise ConfigError("model.moe: the model already has MoE layers")
    for tower in TOWERS[cfg.towers]:
        hf = hf_text_tower(model) if tower == "text" else None
        if hf is not None:  # a Hugging Face encoder: each chosen layer's feed-forward becomes the experts
            layers = hf_layers(hf)
            for i in select_blocks(cfg.layers, len(layers)):
                mlp, width = hf_feed_forward(layers[i], f"model.moe: text layer {i}")
                set_hf_feed_forward(layers[i], MoEMLP(mlp, width, cfg, tower, i))
            continue
        blocks = TOWER_BLOCKS[tower](model)
        if blocks is None:
            kind = type(getattr(model, "visual", model)).__name__
            raise ConfigError(f"model.moe.towers: the {tower} tower ({kind}) has no transformer blocks to make "
                              f"sparse; choose towers: {'text' if tower == 'image' else 'image'}")
        for i in select_blocks(cfg.layers, len(blocks)):
            mlp = getattr(blocks[i], "mlp", None)
            fc = getattr(mlp, "c_fc", None)
            if not isinstance(fc, nn.Linear):
                raise ConfigError(f"model.moe: {tower} block {i} ({type(blocks[i]).__name__}) has no open_clip MLP")
            blocks[i].mlp = MoEMLP(mlp, fc.in_features, cfg, tower, i)
    report_moe_outputs(model)  # dense models never pay for the hook
    return model


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of `model` (also inside a DeepSpeed engine or DDP wrapper), in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Weighted auxiliary loss of the latest forward, to add to the contrastive loss: aux_loss_weight * (sum of
    the layers' balance losses) + z_loss_weight * (sum of their z-losses), one term per layer as Switch and ST-MoE
    add them. Device tensors only: no host synchronisation."""
    total: Tensor = torch.zeros(())
    for layer in moe_layers(model):
        if layer.aux is not None:
            total = total + layer.aux_loss_weight * layer.aux.balance + layer.z_loss_weight * layer.aux.zloss
    return total


def moe_stats(model: nn.Module, on_host: bool = True) -> dict[str, float] | dict[str, Tensor]:
    """Routing metrics of the latest forward; `on_host=False` leaves them as device scalars (the training loop
    reads them on logging steps only, in one transfer, so routing never makes a step wait for the device).

    Per tower, averaged over its layers: `moe/{tower}/balance`, `/zloss`, `/dropped` (fraction of assignments),
    `/load_max` (busiest expert's load times E: 1.0 is even), and `moe/{tower}/b{block}/e{expert}` the load of each
    expert of each layer.
    """
    stats: dict[str, Tensor] = {}
    per_tower: dict[str, list[MoEAux]] = {}
    for layer in moe_layers(model):
        if layer.aux is None:
            continue
        a = layer.aux
        per_tower.setdefault(layer.tower, []).append(a)
        for e, v in enumerate(a.load.detach().float().unbind()):
            stats[f"moe/{layer.tower}/b{layer.block}/e{e}"] = v
    for tower, auxes in per_tower.items():
        stats[f"moe/{tower}/balance"] = torch.stack([a.balance.detach().float() for a in auxes]).mean()
        stats[f"moe/{tower}/zloss"] = torch.stack([a.zloss.detach().float() for a in auxes]).mean()
        stats[f"moe/{tower}/dropped"] = torch.stack([torch.as_tensor(a.dropped).float() for a in auxes]).mean()
        stats[f"moe/{tower}/load_max"] = torch.stack([a.load.max().float() * a.load.numel() for a in auxes]).max()
    if not on_host or not stats:
        return stats
    return dict(zip(stats, torch.stack(list(stats.values())).tolist()))


def moe_losses(model: nn.Module, on_host: bool = True) -> tuple[Tensor, dict[str, float] | dict[str, Tensor]]:
    """`moe_aux_loss` and `moe_stats` of the latest forward together."""
    return moe_aux_loss(model), moe_stats(model, on_host)


def _add_moe_outputs(model: nn.Module, inputs: tuple, output: object) -> object:
    """Forward hook: a dict of outputs gains `moe_aux` (the weighted auxiliary loss) and the routing statistics
    (`moe/...`, device scalars) of the forward that made it, when the model has MoE layers."""
    if isinstance(output, dict) and moe_layers(model):
        aux, stats = moe_losses(model, on_host=False)
        output["moe_aux"] = aux
        output.update(stats)
    return output


def report_moe_outputs(model: nn.Module) -> None:
    """Make `model`'s forward return its MoE terms with its other outputs (layers swapped in later count too);
    `convert_to_moe` does, so a dense model's forward carries no hook."""
    model.register_forward_hook(_add_moe_outputs)


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` in the one MoE file format: native names, every expert (gathered across the
    expert-parallel group, so with the DeepSpeed backend and ep_size > 1 every rank of the group must call it)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        native = module.native_state() if isinstance(module, MoELayer) else None
        if native is not None:
            prefix = name + "."
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
            state.update({prefix + k: v for k, v in native.items()})
    return state
