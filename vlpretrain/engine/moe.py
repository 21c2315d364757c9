"""The DeepSpeed MoE backend: `deepspeed.moe.layer.MoE` behind the `MoELayer` interface, for expert parallelism, and
the optimizer parameter groups it needs. It lives in the engine package, the only one that imports DeepSpeed.

Models are built with the native layer whatever `model.moe.backend` says; `use_deepspeed_moe` (called by
`build_engine` for backend deepspeed) swaps this layer in for each of them, weights kept, the way the engine wraps
any other part of a built model.

With `ep_size` > 1 each rank of an expert-parallel group holds `num_experts / ep_size` experts and tokens travel
by all-to-all. DeepSpeed creates the process groups itself in `deepspeed.initialize` (it calls the layer's
`set_deepspeed_parallelism`), so building the model needs no process group; a forward outside the engine with
`ep_size` > 1 needs `setup_expert_parallel(model)` after `torch.distributed` is initialised. DeepSpeed lays
expert-parallel groups out as consecutive ranks, so rank r holds the experts of block `r % ep_size`.

Checkpoints: `state_dict()` keeps DeepSpeed's names (its engine saves and reloads experts by them); the layer
also loads the native layer's names (`router.weight`, `experts.{e}.…`, the upcycling and export format), and
`native_state()` returns them (gathering experts across the group), so both backends share one file format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import Tensor, nn

from vlpretrain.config import MoEConfig
from vlpretrain.errors import ConfigError
from vlpretrain.models.moe import MoEAux, MoELayer, MoEMLP, balance_loss, moe_layers, z_loss

_EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts."
_ROUTER = "moe.deepspeed_moe.gate.wg.weight"


class DeepSpeedMoEMLP(MoELayer):
    """DeepSpeed's MoE layer over copies of a dense MLP, recording the same losses and statistics as MoEMLP.

    Settings map onto DeepSpeed's gate: no random token selection, no sampled second expert, no minimum
    capacity, "Jitter" noise (fixed at 0.01) when jitter > 0; a capacity factor <= 0 turns token dropping off.
    The z-loss and balance loss are computed from the router logits without jitter noise.
    """

    def __init__(self, dense_mlp: nn.Module, d_model: int, cfg: MoEConfig, tower: str = "", block: int = -1):
        super().__init__()
        self.num_experts, self.top_k, self.ep_size = cfg.num_experts, cfg.top_k, cfg.ep_size
        self.capacity_factor, self.eval_capacity_factor = cfg.capacity_factor, cfg.eval_capacity_factor
        self.aux_loss_weight, self.z_loss_weight = cfg.aux_loss_weight, cfg.z_loss_weight
        self.tower, self.block = tower, block
        self.moe = MoE(d_model, dense_mlp, num_experts=cfg.num_experts, ep_size=cfg.ep_size, k=cfg.top_k,
                       capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                       min_capacity=0, noisy_gate_policy="Jitter" if cfg.jitter > 0 else None, drop_tokens=True,
                       use_rts=False, top2_2nd_expert_sampling=False)
        self.num_local = self.moe.num_local_experts
        self.aux = None
        self._dropped = torch.zeros(())
        self.moe.deepspeed_moe.gate.register_forward_hook(self._record_dropped)
        self.reset_router()

    def router_weight(self) -> Tensor:
        return self.moe.deepspeed_moe.gate.wg.weight

    def expert_parameters(self) -> int:
        return sum(p.numel() for p in self.moe.deepspeed_moe.experts.parameters())

    def _record_dropped(self, gate: nn.Module, args: tuple, out: tuple) -> None:
        """Fraction of assignments the gate dropped: sparse routes mark them -1, dense masks leave them out."""
        tokens = args[0].shape[0] * self.top_k
        if len(out) == 7:
            self._dropped = (out[3] < 0).float().mean().detach()
        else:
            self._dropped = (1.0 - out[2].sum() / tokens).float().detach()

    def forward(self, x: Tensor) -> Tensor:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        self.moe.deepspeed_moe.gate.drop_tokens = factor > 0
        out, _, counts = self.moe(x)
        tokens = x.reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.router_weight().float())
        probs = logits.softmax(dim=-1)
        self.aux = MoEAux(balance=balance_loss(probs, probs.argmax(dim=-1, keepdim=True)), zloss=z_loss(logits),
                          load=counts.float().detach() / (tokens.shape[0] * self.top_k), dropped=self._dropped)
        return out

    # ------------------------------------------------------------------------------------------------------
    # one file format with the native layer

    def ep_rank(self) -> int:
        """This rank's place in its expert-parallel group (which global experts it holds)."""
        if self.ep_size == 1:
            return 0
        name = self.moe.expert_group_name
        if name in groups._get_expert_parallel_group_dict():
            return groups._get_expert_parallel_rank(name)
        if torch.distributed.is_initialized():
            return torch.distributed.get_rank() % self.ep_size
        raise ConfigError(f"model.moe.ep_size: {self.ep_size} needs torch.distributed initialised before "
                          "weights are loaded (each rank holds a different share of the experts)")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Accept native names too: keep this rank's experts, renamed to DeepSpeed's local indices."""
        if prefix + "router.weight" in state_dict:
            state_dict[prefix + _ROUTER] = state_dict.pop(prefix + "router.weight")
        native = [k for k in state_dict if k.startswith(prefix + "experts.")]
        first = self.ep_rank() * self.num_local if native else 0
        for key in native:
            index, rest = key[len(prefix + "experts."):].split(".", 1)
            value = state_dict.pop(key)
            if first <= int(index) < first + self.num_local:
                state_dict[f"{prefix}{_EXPERTS}{int(index) - first}.{rest}"] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def native_state(self) -> dict[str, Tensor]:
        """Router and all experts under native names; with ep_size > 1 a collective over the expert group."""
        local = {k: v.detach() for k, v in self.state_dict().items()}
        state = {"router.weight": local.pop(_ROUTER)}
        group = groups._get_expert_parallel_group(self.moe.expert_group_name) if self.ep_size > 1 else None
        for key, value in local.items():
            index, rest = key[len(_EXPERTS):].split(".", 1)
            shares = [value]
            if group is not None:
                shares = [torch.empty_like(value) for _ in range(self.ep_size)]
                torch.distributed.all_gather(shares, value.contiguous(), group=group)
            for r, share in enumerate(shares):
                state[f"experts.{r * self.num_local + int(index)}.{rest}"] = share
        return state


def use_deepspeed_moe(model: nn.Module, cfg: MoEConfig) -> nn.Module:
    """Swap every native MoE layer of a built `model` for DeepSpeed's, configured by `cfg`; return `model`.

    Each new layer takes the native one's weights (with ep_size > 1 this rank's share of the experts, so
    torch.distributed must be initialised), whether they train (locked towers stay locked) and its mode. The global
    random state is left as it was: a run draws the same numbers afterwards on either backend.
    """
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if not isinstance(layer, MoEMLP):
                continue
            with torch.random.fork_rng(devices=[]):  # DeepSpeed's gate draws its initial weights: ours replace them
                swapped = DeepSpeedMoEMLP(layer.experts[0], layer.router.in_features, cfg, layer.tower, layer.block)
            swapped.load_state_dict(layer.state_dict())  # native names: this rank's experts
            frozen = [n for n, p in layer.named_parameters() if not p.requires_grad]
            if frozen:
                assert len(frozen) == len(list(layer.parameters())), f"partly locked MoE layer: {frozen}"
                swapped.requires_grad_(False)
            setattr(parent, name, swapped.train(layer.training))
    return model


def setup_expert_parallel(model: nn.Module) -> None:
    """Create DeepSpeed's expert-parallel groups for a model used outside `deepspeed.initialize` (which does it).

    Must not run before `deepspeed.initialize` on the same model: DeepSpeed sets each gate's group only once.
    """
    for layer in moe_layers(model):
        if not isinstance(layer, DeepSpeedMoEMLP) or layer.moe.deepspeed_moe.ep_group is not None:
            continue
        if layer.ep_size > 1 or torch.distributed.is_initialized():
            layer.moe.set_deepspeed_parallelism()


def moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with DeepSpeed's expert-parallel parameters split into their own groups.

    A no-op for the native backend (its experts are ordinary replicated parameters); needed by the
    DeepSpeed backend, whose engine reduces expert gradients over the expert-data-parallel group only.
    """
    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(param_groups)]
    if not any(getattr(p, "allreduce", True) is False for g in named for p in g["params"]):
        return named
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(named)
