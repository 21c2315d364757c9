"""Launchers: where a process sits, read from hand-made torchrun, deepspeed, SLURM and MPI environments, and one
slow run per launcher showing that srun- and mpirun-style launches train exactly as torchrun does."""

import subprocess
import sys

import pytest
from helpers import ENV, REPO, SCRIPT, free_port, losses, run

from vlpretrain.engine.launch import Launch, launch_env
from vlpretrain.errors import LaunchError

SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[01-04,07]"}
OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


def test_torchrun_and_deepspeed_as_before():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29400",
                "TORCHELASTIC_RUN_ID": "x"}
    assert launch_env(torchrun) == Launch(3, 4, 1, "node0", 29400, "torchrun")
    deepspeed = {**torchrun, "CROSS_RANK": "1"}
    del deepspeed["TORCHELASTIC_RUN_ID"]
    assert launch_env(deepspeed).launcher == "deepspeed"
    # torchrun inside an srun step: torchrun's variables describe this process, SLURM's the step's one task
    assert launch_env({**SRUN, **torchrun}) == Launch(3, 4, 1, "node0", 29400, "torchrun")
    assert launch_env({}) == Launch(0, 1, 0, "127.0.0.1", None, "none")


def test_slurm():
    assert launch_env(SRUN) == Launch(5, 8, 1, "gpu01", 10000 + 123456 % 20000, "slurm")
    # the step's own task count and node list win over the job's; MASTER_ADDR/PORT given win over both
    step = {**SRUN, "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_NODELIST": "gpu[03-04,07]"}
    assert launch_env(step) == Launch(5, 6, 1, "gpu03", 10000 + 123456 % 20000, "slurm")
    assert launch_env({**step, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29501"}).master_addr == "10.0.0.9"
    assert launch_env({**step, "MASTER_PORT": "29501"}).master_port == 29501
    # one task (`srun --pty bash`, then python): a free port, so two such runs on one node do not collide
    one = {**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert launch_env(one) == Launch(0, 1, 0, "127.0.0.1", None, "slurm")
    nodes = {k: v for k, v in SRUN.items() if k not in ("SLURM_JOB_NODELIST", "SLURM_JOB_ID")}
    assert launch_env({**nodes, "SLURM_NODELIST": "a-[9-10]"}) == Launch(5, 8, 1, "a-9", 29500, "slurm")


def test_mpi():
    assert launch_env({**OMPI, "MASTER_ADDR": "node0"}) == Launch(3, 4, 1, "node0", 29500, "openmpi")
    one_node = {**OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert launch_env(one_node).master_addr == "127.0.0.1"  # every rank here: no address needed
    # mpirun inside a SLURM allocation: MPI's ranks, not the batch step's
    assert launch_env({**SRUN, **OMPI, "MASTER_ADDR": "node0"}).launcher == "openmpi"
    intel = {"PMI_RANK": "2", "PMI_SIZE": "8", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "node1", "MASTER_PORT": "1234"}
    assert launch_env(intel) == Launch(2, 8, 0, "node1", 1234, "mpich")
    # Intel MPI's mpirun under SLURM: its ranks inherit the SLURM_PROCID of the srun that started their proxy
    assert launch_env({**SRUN, **intel}) == Launch(2, 8, 0, "node1", 1234, "mpich")
    # srun --mpi=pmi2: PMI_RANK beside SLURM's variables, no MPI local rank
    assert launch_env({**SRUN, "PMI_RANK": "5", "PMI_SIZE": "8"}) == launch_env(SRUN)


@pytest.mark.parametrize("environ, says", [
    # the batch script ran python itself: four tasks were asked for, this one cannot tell which it is
    ({"SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu01"}, "SLURM_NTASKS=4 but this process has no rank"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but this process has no rank"),
    (OMPI, "set MASTER_ADDR to its host"),
    ({**SRUN, "SLURM_JOB_NODELIST": "gpu[01-"}, "SLURM_JOB_NODELIST=gpu[01-: not a host list"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"}, "set MASTER_ADDR to the host of rank 0"),
    ({**SRUN, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 with SLURM_NTASKS=8"),
    ({**SRUN, "SLURM_LOCALID": "x"}, "SLURM_LOCALID='x': not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK is set but MASTER_ADDR, MASTER_PORT are not"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "n"}, "not MPI_LOCALRANKID or PMI_LOCAL_RANK"),
])
def test_launch_errors_say_what_is_wrong(environ, says):
    with pytest.raises(LaunchError) as e:
        launch_env(environ)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_tasks_that_cannot_tell_themselves_apart_stop_in_one_line(tmp_path):
    env = {**_bare(), "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu01"}
    r = subprocess.run([sys.executable, "-m", "vlpretrain.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
                        "--set", f"train.output_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "error: SLURM_NTASKS=4 but this process has no rank (no RANK, SLURM_PROCID or MPI rank): start each task "
        "with srun (in an sbatch script: `srun vlpretrain train ...`), torchrun, deepspeed or mpirun, not with "
        "python directly"]
    assert not (tmp_path / "run").exists()


def _bare() -> dict[str, str]:
    """The tests' environment without any launcher's variables (the tests may themselves run under one)."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_", "OMPI_", "PMI_", "PMIX_",
                "MPI_LOCALRANKID", "TORCHELASTIC_", "CROSS_")
    return {k: v for k, v in ENV.items() if not k.startswith(launcher)}


@pytest.mark.slow
def test_srun_and_mpirun_launches_train_as_torchrun_does(tmp_path):
    """Two processes given only SLURM's variables, then only Open MPI's, follow torchrun's loss trajectory."""
    common = ["train.steps=3", "train.warmup_steps=1"]
    run(tmp_path / "torchrun", *common, nproc=2)
    ref = losses(tmp_path / "torchrun")
    assert sorted(ref) == [1, 2, 3] and ref[3] != ref[1]
    port = free_port()
    launches = {
        "slurm": lambda i: {"SLURM_PROCID": str(i), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(i),
                            "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port)},
        "openmpi": lambda i: {"OMPI_COMM_WORLD_RANK": str(i), "OMPI_COMM_WORLD_SIZE": "2",
                              "OMPI_COMM_WORLD_LOCAL_RANK": str(i), "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": str(port)},
    }
    for name, variables in launches.items():
        out = tmp_path / name
        procs = [subprocess.Popen([sys.executable, SCRIPT, str(out), *common], env={**_bare(), **variables(i)},
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        results = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
        host = "localhost" if name == "slurm" else "127.0.0.1"
        assert f"2 processes ({name}), master {host}:{port}" in results[0][0]  # rank 0 says so, once
        assert "processes" not in results[1][0]
        assert (out / "summary_rank1.json").is_file()  # the second task knew it was rank 1
        assert losses(out) == ref, name  # the same collectives in the same order: the same numbers
