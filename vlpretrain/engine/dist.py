"""Where this process sits in the job: joining the process group from the launcher's environment, and leaving it."""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger("vlpretrain")


@dataclass
class DistEnv:
    """Where this process sits: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: torch.distributed.ProcessGroup | None = None  # a gloo group for host flags when the main group is not gloo (NCCL), else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, *flags: bool) -> list[bool]:
        """Whether any rank raised each host flag (ranks must stop together). The flags travel on the host
        (gloo), never through the accelerator, so asking costs a small network round trip and no device sync."""
        if self.world_size == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.control)
        return [v > 0 for v in t.tolist()]

    def sum(self, *values: float) -> list[float]:
        """Each host value summed over ranks, on the host (gloo) as `any` does: no device sync."""
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=self.control)
        return t.tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def quiet_library_chatter() -> Iterator[None]:
    """Keep DeepSpeed's and torch's start-up notes off the console (a CPU run prints "No CUDA runtime is found"
    and "... shm_comm_op built successfully" once per process); they go to the debug log instead. Warnings that
    matter to a user, and everything after start-up, still reach the console."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        yield
    for line in captured.getvalue().splitlines():
        log.debug("deepspeed: %s", line)


def init_distributed() -> DistEnv:
    """Join (or create) the process group from the launcher's environment: torchrun, deepspeed, or a lone process."""
    with quiet_library_chatter():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # a lone process: a one-member group so every code path is the distributed one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    acc = get_accelerator()
    backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=int(os.environ.get("VLPRETRAIN_DIST_TIMEOUT_MIN", "30")))
        with quiet_library_chatter():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                       timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    world = torch.distributed.get_world_size()
    # host flags (stop requests) need a CPU-capable group: NCCL reduces GPU tensors only, and a GPU tensor made
    # from a host value costs a device sync; collective, so every rank creates it here
    control = torch.distributed.new_group(backend="gloo") if world > 1 and backend != "gloo" else None
    return DistEnv(torch.distributed.get_rank(), world, local_rank, device, control)


def shutdown_distributed() -> None:
    """Destroy the process group before exit (avoids an abort seen at exit after ZeRO-3 bf16 runs)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
