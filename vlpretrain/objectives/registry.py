"""The objective contract and its registry: an objective turns a model's named outputs into named loss terms.

Each objective is one small file that registers itself by name (`@register("clip")`); this module never imports
them. The contract splits the loss into two kinds of terms, because they accumulate differently:

- batch terms, functions of the pooled outputs of the whole batch (`pooled`: the features both towers pool, the
  temperature, a teacher's features). Under exact accumulation they are computed once over every micro-batch's
  pooled outputs, so a contrastive term sees the negatives of the whole batch;
- sample terms, means over a micro-batch's samples (captioning, the MoE auxiliary loss). They accumulate as the
  mean of the micro-batches' terms.

The loss is the sum of all terms. The MoE auxiliary loss is the sample term `moe_aux` of every objective, read
from the model's outputs (`vlpretrain.models.moe.report_moe_outputs` puts it there).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch
from torch import Tensor

from vlpretrain.config import RunConfig, build_section
from vlpretrain.errors import ConfigError

log = logging.getLogger("vlpretrain")

Outputs = dict[str, Tensor]  # a forward's named outputs (open_clip's output_dict) plus an objective's targets


@dataclasses.dataclass
class NoOptions:
    """An objective without options of its own."""


class Objective:
    """Named loss terms from named model outputs; subclasses set `pooled`, `Options` and the two term methods."""

    name: ClassVar[str] = ""
    # outputs the batch terms read: cached per micro-batch and concatenated under exact accumulation
    pooled: ClassVar[tuple[str, ...]] = ("image_features", "text_features", "logit_scale")
    Options: ClassVar[type] = NoOptions

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.options = options_of(cfg)

    @classmethod
    def model_options(cls, cfg: RunConfig) -> dict[str, Any]:
        """Keyword arguments for open_clip's `create_model` this objective needs (a logit bias, say)."""
        return {}

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ConfigError when `model` cannot give what this objective reads (before any training); warn when
        it computes what this objective ignores (a CoCa decoder runs in every forward and never learns)."""
        if hasattr(model, "text_decoder"):
            log.warning("train.objective %s ignores %s's text decoder (a CoCa architecture), which still runs in "
                        "every forward; train.objective coca trains it", self.name, self.cfg.model.name)

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move what the objective holds (a teacher) to the training device and precision."""

    def targets(self, images: Tensor, texts: Tensor) -> Outputs:
        """Extra pooled values computed from a micro-batch without autograd (a teacher's features); once per
        micro-batch, never replayed."""
        return {}

    def batch_terms(self, out: Outputs) -> dict[str, Tensor]:
        """Loss terms over the pooled outputs of the whole batch (this rank's share; the mean over ranks is the
        global loss)."""
        raise NotImplementedError

    def sample_terms(self, out: Outputs) -> dict[str, Tensor]:
        """Loss terms that are means over this micro-batch's samples, besides `moe_aux`."""
        return {}

    def micro_terms(self, out: Outputs) -> dict[str, Tensor]:
        """`sample_terms` plus the model's MoE auxiliary loss when it has MoE layers."""
        terms = self.sample_terms(out)
        if "moe_aux" in out:
            terms["moe_aux"] = out["moe_aux"]
        return terms


OBJECTIVES: dict[str, type[Objective]] = {}


def register(name: str):
    """Class decorator: make an `Objective` subclass known as `train.objective: name`."""
    def add(cls: type[Objective]) -> type[Objective]:
        assert name not in OBJECTIVES, f"objective {name} registered twice"
        cls.name = name
        OBJECTIVES[name] = cls
        return cls
    return add


def objective_class(name: str) -> type[Objective]:
    """The registered objective `name`; an unknown name lists the known ones."""
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective: unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def options_of(cfg: RunConfig) -> Any:
    """`train.objective_options` checked against the objective's `Options` dataclass (unknown keys and wrong types
    name the key)."""
    cls = objective_class(cfg.train.objective)
    options = build_section(cls.Options, dict(cfg.train.objective_options), "train.objective_options.")
    check = getattr(options, "validate", None)
    if callable(check):
        check()
    return options


def check_objective(cfg: RunConfig) -> None:
    """The configured objective exists and its options are valid: called before anything is built."""
    options_of(cfg)


def build_objective(cfg: RunConfig, rank: int = 0, world_size: int = 1) -> Objective:
    """The configured objective for this rank."""
    return objective_class(cfg.train.objective)(cfg, rank, world_size)


def total(terms: dict[str, Tensor]) -> Tensor | float:
    """The loss: the sum of its terms (0.0 when there are none)."""
    return sum((t.float().reshape(()) for t in terms.values()), 0.0)


# Pooled outputs that are one value per forward (parameters), not one row per sample: under exact accumulation
# they are taken from the first micro-batch, and their gradient is added once.
PER_FORWARD = frozenset({"logit_scale", "logit_bias", "teacher_logit_scale"})
