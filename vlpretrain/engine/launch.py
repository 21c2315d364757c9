"""Where this process sits in the job, read from the launcher's environment: torchrun or the deepspeed launcher
(RANK, WORLD_SIZE, ...), Open MPI or MPICH / Intel MPI (`mpirun`), or SLURM (`srun`). Pure, so every launcher is
tested with hand-made environments; `init_distributed` exports the result as RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT, the variables DeepSpeed, torch's env:// rendezvous and the data loader read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import hostlist

from vlpretrain.errors import LaunchError

DEFAULT_PORT = 29500  # torch's and DeepSpeed's default rendezvous port
PMI_LOCAL_RANK = ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")  # MPICH's and Intel MPI's hydra; Cray's PMI


@dataclass(frozen=True)
class Launch:
    """This process's place: global rank, world size, local rank on its machine, the rendezvous address of rank
    0, and the launcher that said so ("torchrun", "deepspeed", "env", "slurm", "openmpi", "mpich" or "none")."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int | None  # None: a lone process, any free port will do
    launcher: str

    def variables(self, port: int) -> dict[str, str]:
        """The torch-style variables to export, with `port` where `master_port` is None."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port or port)}


def launch_env(environ: Mapping[str, str]) -> Launch:
    """Read this process's place from a launcher's environment; raises LaunchError, in one line, when the
    variables contradict each other or several tasks cannot tell which one this is.

    RANK (torchrun, deepspeed, or set by hand) wins over the others: torchrun inside an `srun` step sees SLURM's
    variables too, and they describe the step's one task per node, not torchrun's processes. MPI's variables
    come next, for the same reason when `mpirun` runs inside a SLURM allocation (Intel MPI's starts one proxy per
    node with srun, whose SLURM_PROCID its ranks inherit).
    """
    if "RANK" in environ:
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in environ else
                    "deepspeed" if "CROSS_RANK" in environ else "env")
        missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in environ]
        if missing:
            raise LaunchError(f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                              "set them too, or launch with torchrun, deepspeed, srun or mpirun")
        return _checked(environ, "RANK", "WORLD_SIZE", "LOCAL_RANK", environ["MASTER_ADDR"],
                        _int(environ, "MASTER_PORT"), launcher, local_default=0)
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _mpi(environ, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
                    "OMPI_COMM_WORLD_LOCAL_SIZE", "openmpi")
    # srun --mpi=pmi2 sets PMI_RANK too, but no local rank: SLURM's variables then say it all
    if "PMI_RANK" in environ and ("SLURM_PROCID" not in environ or any(k in environ for k in PMI_LOCAL_RANK)):
        return _mpi(environ, "PMI_RANK", "PMI_SIZE", PMI_LOCAL_RANK, "MPI_LOCALNRANKS", "mpich")
    if "SLURM_PROCID" in environ:
        return _slurm(environ)
    tasks = {k: environ[k] for k in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "WORLD_SIZE") if k in environ}
    for name, value in tasks.items():
        if _int(tasks, name) > 1:  # several tasks started alike, none knowing which it is
            raise LaunchError(f"{name}={value} but this process has no rank (no RANK, SLURM_PROCID or MPI rank): "
                              "start each task with srun (in an sbatch script: `srun vlpretrain train ...`), "
                              "torchrun, deepspeed or mpirun, not with python directly")
    return Launch(0, 1, 0, environ.get("MASTER_ADDR", "127.0.0.1"),
                  _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else None, "none")


def _slurm(environ: Mapping[str, str]) -> Launch:
    """`srun`: one task per process. The step's own counts win over the job's: a step may use part of the job."""
    size = next((k for k in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if k in environ), None)
    if size is None:
        raise LaunchError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is: start the "
                          "tasks with srun")
    if "SLURM_LOCALID" not in environ:
        raise LaunchError("SLURM_PROCID is set but SLURM_LOCALID is not: start the tasks with srun")
    addr = environ.get("MASTER_ADDR") or _first_host(environ)
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:
        # the same for every task of the job, different for jobs sharing a node; below Linux's ephemeral range
        # (32768+) so an outgoing connection never holds it
        port = 10000 + _int(environ, "SLURM_JOB_ID") % 20000
    else:
        port = DEFAULT_PORT
    return _checked(environ, "SLURM_PROCID", size, "SLURM_LOCALID", addr, port, "slurm")


def _first_host(environ: Mapping[str, str]) -> str:
    # the step's list first: rank 0 runs on the first node of its step, which need not be the job's first
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(name):
            try:
                hosts = hostlist.expand_hostlist(environ[name])
            except hostlist.BadHostlist as e:
                raise LaunchError(f"{name}={environ[name]}: not a host list ({e}); set MASTER_ADDR to the host "
                                  "of rank 0") from None
            if hosts:
                return hosts[0]
    raise LaunchError("SLURM_PROCID is set but no SLURM_JOB_NODELIST (or SLURM_STEP_NODELIST, SLURM_NODELIST) "
                      "names the hosts: set MASTER_ADDR to the host of rank 0")


def _mpi(environ: Mapping[str, str], rank: str, size: str, local_ranks: tuple[str, ...], local_size: str,
         launcher: str) -> Launch:
    """`mpirun`: MPI gives ranks but no rendezvous address, so MASTER_ADDR comes from the user unless every rank
    is on this one machine."""
    local = next((k for k in local_ranks if k in environ), None)
    if local is None:
        raise LaunchError(f"{rank} is set but not {' or '.join(local_ranks)}: set LOCAL_RANK, RANK, WORLD_SIZE, "
                          "MASTER_ADDR and MASTER_PORT yourself, or launch with torchrun or srun")
    if size not in environ:
        raise LaunchError(f"{rank} is set but {size} is not: launch with mpirun")
    addr = environ.get("MASTER_ADDR")
    if not addr:
        if environ.get(local_size) != environ[size]:
            raise LaunchError(f"{launcher} launch ({size}={environ[size]}): MPI does not say where rank 0 runs; "
                              "set MASTER_ADDR to its host (e.g. `mpirun -x MASTER_ADDR=node0 -x MASTER_PORT=29500 "
                              "...`)")
        addr = "127.0.0.1"  # every rank on this machine
    port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_PORT
    return _checked(environ, rank, size, local, addr, port, launcher)


def _checked(environ: Mapping[str, str], rank: str, size: str, local: str, addr: str, port: int | None,
             launcher: str, local_default: int | None = None) -> Launch:
    r, n = _int(environ, rank), _int(environ, size)
    lr = _int(environ, local) if local in environ or local_default is None else local_default
    if n < 1 or not 0 <= r < n:
        raise LaunchError(f"{rank}={r} with {size}={n}: a rank must lie in 0..{size}-1 and the size be >= 1")
    if not 0 <= lr <= r:
        raise LaunchError(f"{local}={lr} with {rank}={r}: a local rank must lie in 0..{rank}")
    if n == 1 and "MASTER_PORT" not in environ:  # nobody to meet: a free local port, as a lone process gets
        addr, port = environ.get("MASTER_ADDR", "127.0.0.1"), None
    if port is not None and not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port}: not a port (1..65535)")
    return Launch(r, n, lr, addr, port, launcher)


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f"{name}={environ[name]!r}: not a whole number") from None
