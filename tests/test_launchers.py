"""trainer/launchers.py: every launcher's variables resolve to the same place in the job, processes started the srun
and the mpirun way form one world, and a process that would train alone by mistake is refused; trainer/supervise.py:
a signalled job ends with its trainers' exit code."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port, process_env
from trainer.launchers import JOB_PORTS, LaunchProblem, expand_hostlist, first_host, resolve_launch, tasks_per_node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_launchers_variables_resolve_to_a_place_in_the_job():
    torchrun = resolve_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                               "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_world_size, torchrun.launcher) == (3, 8, 4, "torchrun")
    deepspeed = resolve_launch({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8",
                                "CROSS_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (deepspeed.local_world_size, deepspeed.launcher) == (8, "deepspeed")
    srun = resolve_launch({"SLURM_JOB_ID": "123456", "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
                           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16",
                           "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NODELIST": "gpu-[007-008]"})
    assert (srun.rank, srun.world_size, srun.local_rank, srun.local_world_size) == (13, 16, 5, 8)
    assert (srun.master_addr, srun.master_port, srun.launcher) == ("gpu-007", 20000 + 123456 % 20000, "srun")
    mpi = resolve_launch({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                          "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "n1"})
    assert (mpi.rank, mpi.world_size, mpi.local_rank, mpi.local_world_size, mpi.launcher) == (2, 4, 0, 2, "openmpi")
    intel = resolve_launch({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "n1"})
    assert (intel.rank, intel.launcher) == (1, "mpich")
    alone = resolve_launch({})
    assert (alone.rank, alone.world_size, alone.master_port, alone.launcher) == (0, 1, 0, "python")
    assert first_host("gpu-[003-006,9],login1") == "gpu-003" and first_host("node7") == "node7"
    assert tasks_per_node("8(x2),4") == [8, 8, 4]


def test_slurm_host_lists_with_suffixes_and_several_bracket_groups():
    """first_host("gpu[01-04]-ib") returned "gpu01": the job's master was a host without the interface suffix."""
    assert first_host("gpu[01-04]-ib") == "gpu01-ib"
    assert list(expand_hostlist("gpu[01-02]-ib,rack[1-2]n[7,09-10],login1")) == [
        "gpu01-ib", "gpu02-ib", "rack1n7", "rack1n09", "rack1n10", "rack2n7", "rack2n09", "rack2n10", "login1"]
    assert first_host("a[008-010]b[1-2].cluster") == "a008b1.cluster"
    for bad in ("gpu[01-04", "gpu[a-b]", "gpu]1["):
        with pytest.raises(LaunchProblem, match="set MASTER_ADDR"):
            first_host(bad)


SLURM_STEP_OF_TWO_DAEMONS = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                             "SLURM_STEP_ID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2",
                             "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


def test_mpirun_inside_a_slurm_allocation_takes_its_own_ranks():
    """Open MPI starts its daemons with srun, so its 16 processes inherit the daemons' SLURM variables (rank 0 of 2):
    they resolved to srun's rank 0 of 2 and the group hung. srun's own PMI (srun --mpi=pmi2) repeats SLURM's rank
    and size: srun stays the launcher there (it alone knows the local rank)."""
    mpirun = resolve_launch({**SLURM_STEP_OF_TWO_DAEMONS, "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16",
                             "OMPI_COMM_WORLD_LOCAL_RANK": "5", "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
                             "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"})
    assert (mpirun.rank, mpirun.world_size, mpirun.local_rank, mpirun.launcher) == (5, 16, 5, "openmpi")
    hydra = resolve_launch({**SLURM_STEP_OF_TWO_DAEMONS, "PMI_RANK": "9", "PMI_SIZE": "16", "MPI_LOCALRANKID": "1",
                            "MASTER_ADDR": "gpu01"})
    assert (hydra.rank, hydra.world_size, hydra.launcher) == (9, 16, "mpich")
    pmi2 = resolve_launch({**SLURM_STEP_OF_TWO_DAEMONS, "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
                           "SLURM_NODEID": "1", "PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (pmi2.rank, pmi2.world_size, pmi2.master_addr, pmi2.launcher) == (1, 2, "gpu01", "srun")


def test_a_jobs_derived_port_is_below_linuxs_ephemeral_range():
    """20000 + job id % 20000 reached 39999, inside 32768-60999, where an outgoing connection may hold it."""
    ports = {resolve_launch({**SLURM_STEP_OF_TWO_DAEMONS, "SLURM_JOB_ID": str(job)}).master_port
             for job in range(0, 100_000, 7)}
    assert min(ports) >= 20000 and max(ports) < 32768 and len(ports) > 10000


def test_each_process_trains_on_a_gpu_it_sees_chosen_before_the_process_group(monkeypatch):
    """srun --gpus-per-task=1: task 3 of a node sees one GPU. LOCAL_RANK stayed 3 and DeepSpeed bound the process
    group to cuda:3 ("device_id ... is out of range") before the modulo was taken."""
    import deepspeed
    import torch

    from trainer import engine

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.setdefault("set_device", torch.device(device)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: seen.update(
        local_rank=os.environ["LOCAL_RANK"], device_first="set_device" in seen, **kwargs))
    monkeypatch.setattr(engine, "remove_stale_build_locks", lambda: None)
    monkeypatch.setattr(os, "environ", {**process_env(), **SLURM_STEP_OF_TWO_DAEMONS, "SLURM_PROCID": "3",
                                        "SLURM_LOCALID": "3", "SLURM_STEP_NUM_TASKS": "8",
                                        "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "MASTER_PORT": "29500"})
    env = engine.init_distributed()
    assert env.device == torch.device("cuda", 0) and (env.rank, env.local_rank) == (3, 3)
    assert seen["set_device"] == torch.device("cuda", 0) and seen["device_first"]
    assert seen["local_rank"] == "0" and seen["dist_backend"] == "nccl"


def test_a_process_that_would_train_alone_by_mistake_is_refused():
    sbatch_shell = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    with pytest.raises(LaunchProblem, match="SLURM allocation .* entered without srun .* 8 processes"):
        resolve_launch(sbatch_shell)
    assert resolve_launch({**sbatch_shell, "WORLD_SIZE": "1", "RANK": "0"}).world_size == 1  # on purpose
    srun_step = {**sbatch_shell, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8"}
    with pytest.raises(LaunchProblem, match="srun .* 8 processes, but this one resolves to a world of 1 .* unset "
                                            "WORLD_SIZE and RANK"):
        resolve_launch({**srun_step, "WORLD_SIZE": "1", "RANK": "0"})  # a script that exported WORLD_SIZE=1
    with pytest.raises(LaunchProblem, match="mpirun -x MASTER_ADDR="):
        resolve_launch({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(LaunchProblem, match="not MASTER_ADDR, MASTER_PORT"):
        resolve_launch({"RANK": "0", "WORLD_SIZE": "2"})


JOIN = """
import sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from trainer.engine import init_distributed
env = init_distributed(timeout=60)
total = torch.tensor([float(env.rank + 1)])
dist.all_reduce(total)
print(f"rank {{env.rank}} of {{env.world_size}} by {{env.launcher}}: {{total.item():.0f}}")
"""


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_two_processes_started_the_srun_and_the_mpirun_way_form_one_world(launcher, tmp_path):
    port = str(free_port(*JOB_PORTS))  # (srun's: the one its job id derives)

    def variables(rank: int) -> dict:
        if launcher == "srun":  # what srun sets in each task (no torch variables, no MASTER_*)
            return {"SLURM_JOB_ID": str(int(port) - JOB_PORTS[0]), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                    "SLURM_NODEID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2",
                    "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost"}
        return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # mpirun -x

    procs = [subprocess.Popen([sys.executable, "-c", JOIN.format(root=ROOT)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=process_env(**variables(r))) for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    expected = "srun" if launcher == "srun" else "openmpi"
    for rank, (out, err) in enumerate(outputs):
        assert f"rank {rank} of 2 by {expected}: 3" in out, out + err[-2000:]


FAKE_TRAINER = """
import sys, time
sys.path.insert(0, {root!r})
from trainer import supervise
from trainer.preemption import PreemptionSignal
stop = PreemptionSignal()
print("ready", flush=True)
while not stop.requested:
    time.sleep(0.01)
time.sleep(0.5)  # the checkpoint
open(sys.argv[1], "w").write(str(stop.count))
supervise.record_exit(75)
sys.exit(75)
"""
# a launcher that starts one trainer and exits 1 whatever it did (torchrun's way), or dies of the signal (the deepspeed
# command's way, which installs no handler for one node), leaving its trainer running
FAKE_LAUNCHER = """
import subprocess, sys
trainer = subprocess.Popen([sys.executable, "-c", {trainer!r}, sys.argv[1]])
sys.exit(1 if trainer.wait() else 0)
"""


@pytest.mark.parametrize("signalled", ["the supervisor alone", "the process group"])
def test_the_supervisor_hands_the_signal_to_the_trainers_waits_for_them_and_exits_with_their_code(signalled,
                                                                                               tmp_path):
    """Kubernetes signals PID 1 only: the supervisor passes it to the trainers that registered with it. A scheduler
    that signals the whole group kills a launcher without a handler: its trainer, orphaned, is still waited for
    (the supervisor is its subreaper), and the job ends with the trainer's 75, not the launcher's 1 or 143."""
    done = tmp_path / "done"
    launcher = FAKE_LAUNCHER.format(trainer=FAKE_TRAINER.format(root=ROOT))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "trainer", "supervise.py"), sys.executable, "-c",
                             launcher, str(done)], stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env=process_env())
    assert proc.stdout.readline().strip() == "ready"
    if signalled == "the supervisor alone":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)  # a second one (a scheduler's, a launcher's): it changes nothing
    assert proc.wait(timeout=30) == 75
    assert done.exists()  # the supervisor returned after the trainer's checkpoint, not before
    assert int(done.read_text()) >= (1 if signalled == "the supervisor alone" else 2)


def test_the_jobs_exit_code_is_the_trainers_verdict_when_every_trainer_gave_one():
    from trainer.supervise import job_exit_code

    assert job_exit_code(1, 2, [75, 75]) == 75  # torchrun's 1 after a checkpoint
    assert job_exit_code(-15, 2, [75, 75]) == 75  # the deepspeed command killed by the signal
    assert job_exit_code(1, 2, [4, 4]) == 4 and job_exit_code(0, 2, [0, 0]) == 0
    assert job_exit_code(1, 2, [75]) == 1  # a trainer crashed (or was killed before its checkpoint): never 75
    assert job_exit_code(-9, 0, []) == 137
