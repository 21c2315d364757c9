"""Where this process sits in the job: joining the process group from the launcher's environment
(`vlpretrain.engine.launch`), and leaving it."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from vlpretrain.engine.launch import launch_env

log = logging.getLogger("vlpretrain")

T = TypeVar("T")


@dataclass
class DistEnv:
    """Where this process sits: global rank, world size, local rank and its device, and who launched it."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: torch.distributed.ProcessGroup | None = None  # a gloo group for host flags when the main group is not gloo (NCCL), else None
    launcher: str = "none"  # torchrun, deepspeed, env, slurm, openmpi, mpich or none (a lone process)
    master: str = ""  # the rendezvous address, host:port

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

    def share(self, value: Any) -> Any:
        """Rank 0's JSON-able `value` on every rank (others pass None): work done once, its result for all. It
        travels as UTF-8 JSON in a byte tensor on the host group, never pickled."""
        if self.world_size == 1:
            return value
        data = json.dumps(value).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        torch.distributed.broadcast(size, src=0, group=self.control)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main else \
            torch.empty(int(size.item()), dtype=torch.uint8)
        torch.distributed.broadcast(buf, src=0, group=self.control)
        return json.loads(buf.numpy().tobytes())

    def sum(self, *values: float) -> list[float]:
        """Each host value summed over ranks, on the host (gloo) as `any` does: no device sync."""
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=self.control)
        return t.tolist()

    def main_alone(self, work: Callable[[Callable[[], bool]], T],
                   stop_here: Callable[[], bool]) -> tuple[T | None, bool]:
        """Run `work(should_stop)` on rank 0 while the other ranks wait; returns (its result on rank 0, None
        elsewhere; whether any rank's `stop_here()` asked to stop), alike on every rank.

        The waiting ranks do not sit in one long collective: every `should_stop()` of rank 0 is a host round trip
        in which each rank says whether it was asked to stop, so a signal to any rank reaches rank 0 within one of
        its batches, and a waiting rank neither hangs when rank 0 stops early nor times out while it works for
        hours. If `work` raises, the waiting ranks are released first and the exception goes on, on rank 0.
        """
        if self.world_size == 1:
            result = work(stop_here)
            return result, stop_here()
        if self.is_main:
            try:
                result = work(lambda: self.any(stop_here(), False)[0])
            finally:
                stopped, _ = self.any(stop_here(), True)  # the last round: rank 0 is done
            return result, stopped
        while True:
            stopped, done = self.any(stop_here(), False)
            if done:
                return None, stopped


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
    """Join (or create) the process group from the launcher's environment: torchrun, deepspeed, SLURM (`srun`),
    MPI (`mpirun`), or a lone process. The place found is exported as RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    and MASTER_PORT, which DeepSpeed, torch's rendezvous and the data loader read."""
    launch = launch_env(os.environ)  # before the slow imports: a launch error is one line, at once
    with quiet_library_chatter():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

    # a lone process gets a one-member group on a free port, so every code path is the distributed one
    os.environ.update(launch.variables(port=launch.master_port or _free_port()))
    acc = get_accelerator()
    backend = "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=int(os.environ.get("VLPRETRAIN_DIST_TIMEOUT_MIN", "30")))
        with quiet_library_chatter():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                       timeout=timeout)
    local_rank = launch.local_rank
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    world = torch.distributed.get_world_size()
    # host flags (stop requests) need a CPU-capable group: NCCL reduces GPU tensors only, and a GPU tensor made
    # from a host value costs a device sync; collective, so every rank creates it here
    control = torch.distributed.new_group(backend="gloo") if world > 1 and backend != "gloo" else None
    return DistEnv(torch.distributed.get_rank(), world, local_rank, device, control, launch.launcher,
                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")


def shutdown_distributed() -> None:
    """Destroy the process group before exit (avoids an abort seen at exit after ZeRO-3 bf16 runs)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
