"""Non-finite losses and the logged loss, kept on the device so that a training step never waits for the GPU.

Reading a loss on the host (`loss.item()`) stalls the CPU until the accelerator has finished every queued kernel,
which on a GPU costs the overlap of one step's launch with the previous step's work. Instead each optimizer step's
"any micro-batch on any rank had a non-finite loss" flag stays a device tensor: the optimizer reads it and skips
the update on the device (`Engine.skip_update_when`), and counters of skipped steps (in a row, the longest run,
in total) are kept there too. The host reads them only on steps that sync anyway (logging, checkpoints,
evaluation, the last step), where the loop decides whether `train.max_nonfinite` in a row stop the run. The
logged loss is likewise summed on the device: the mean of the finite losses since the previous sync step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlpretrain.engine import DistEnv, Engine


@dataclass
class StepCounts:
    """What the host learns on a sync step."""

    skipped: int  # optimizer steps skipped since the previous read
    worst_run: int  # longest run of consecutive skipped steps so far (this process)
    loss: float  # mean finite loss (micro-steps, all ranks) since the window opened; NaN when there was none


class NonFiniteGuard:
    """The device-side flag and counters of skipped optimizer steps (see the module docstring)."""

    def __init__(self, engine: Engine, env: DistEnv):
        self.env = env
        zero = lambda: torch.zeros((), device=env.device)  # noqa: E731
        self.flag = zero()  # this optimizer step: 1.0 when any of its losses on any rank was non-finite
        self.run, self.worst, self.skipped = zero(), zero(), zero()
        self.loss_sum, self.loss_count = zero(), zero()
        # when the optimizer cannot read the flag, DeepSpeed's gradient-norm check skips the step itself
        engine.skip_update_when(self.flag)

    def observe(self, loss: Tensor) -> None:
        """Fold one micro-step's loss into this optimizer step's flag (every rank's: ranks skip together) and,
        when finite, into the logged mean."""
        loss = loss.detach().float().reshape(())
        finite = torch.isfinite(loss)
        self.loss_sum.add_(torch.where(finite, loss, 0.0))
        self.loss_count.add_(finite.float())
        bad = (~finite).float()
        if self.env.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # on the device, no host wait
        torch.maximum(self.flag, bad, out=self.flag)

    def settle(self) -> None:
        """After the optimizer step: count it if it was skipped, clear the flag for the next one."""
        self.run.add_(1).mul_(self.flag)  # consecutive skipped steps; a good step resets it to 0
        torch.maximum(self.worst, self.run, out=self.worst)
        self.skipped.add_(self.flag)
        self.flag.zero_()

    def read(self, end_window: bool = True) -> StepCounts:
        """The counters on the host: one device sync, and a collective (call it on sync steps only, which every
        rank reaches together). `end_window` (a logging step) also closes the logged loss's window; other sync
        steps (checkpoints, evaluations) leave it open, so a row's loss covers every step since the last row."""
        window = torch.stack([self.loss_sum, self.loss_count])
        if end_window and self.env.world_size > 1:
            torch.distributed.all_reduce(window)
        loss_sum, count, skipped, worst = torch.cat([window, torch.stack([self.skipped, self.worst])]).tolist()
        self.skipped.zero_()
        if end_window:
            self.loss_sum.zero_()
            self.loss_count.zero_()
        return StepCounts(skipped=int(skipped), worst_run=int(worst),
                          loss=loss_sum / count if count and end_window else float("nan"))


def host_values(values: dict[str, Tensor | float]) -> dict[str, float]:
    """Metrics gathered on the device as plain floats, copied to the host in one transfer (for logging steps)."""
    keys = [k for k, v in values.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if keys:
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, stacked))
    return {k: out[k] for k in values}
