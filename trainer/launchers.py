"""Who this process is in a job, whichever launcher started it: the deepspeed launcher (pdsh), torchrun, SLURM's
srun, or mpirun (Open MPI, MVAPICH, MPICH / Intel MPI), or plain `python` for one process.

Each launcher says it in its own variables; DeepSpeed reads only torch's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and otherwise looks for mpi4py. Resolved here into one LaunchEnv, then written into torch's variables
before the process group starts. The launcher closest to the process wins: torch's variables (the deepspeed
launcher, torchrun: explicit), then an MPI launcher's (mpirun inside a SLURM allocation starts its daemons with
srun, so its processes inherit SLURM's variables, which count the daemons), then srun's. A process whose environment says "one of several" (an srun step or an MPI job of
more than one task, a SLURM allocation of several tasks entered without srun) but resolves to a world of one is
refused: every such process would otherwise train alone, on the same GPU, into the same run folder.
"""

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass


class LaunchProblem(ValueError):
    """The launcher's environment is incomplete or contradicts itself; the message says how to start the job."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # how it was told: deepspeed, torchrun, srun, openmpi, mvapich, mpich, environment, python

    def torch_variables(self) -> dict:
        """What torch and DeepSpeed read (DeepSpeed looks for mpi4py when one is missing)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


# (launcher, rank, size, local rank, local size): the variables each MPI launcher sets in every process
MPI_LAUNCHERS = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)
DEFAULT_PORT = 29500
# the ports a SLURM job's own port is derived from: below 32768, where Linux's ephemeral range (ip_local_port_range,
# 32768-60999 by default) begins, so no outgoing connection on the node can hold it
JOB_PORTS = (20000, 32000)


def expand_hostlist(hostlist: str) -> Iterator[str]:
    """The hosts of a SLURM host list, in order, lazily: names separated by commas, each with any number of bracket
    groups of numbers and ranges, zero padding kept ("gpu[01-02]-ib,rack[1-2]n[7,9]" -> gpu01-ib, gpu02-ib, rack1n7,
    rack1n9, rack2n7, rack2n9): SLURM's hostlist grammar (slurm.conf NodeName, scontrol show hostnames)."""
    for name in _top_level_split(hostlist.strip()):
        parts = re.split(r"\[([^\]]*)\]", name)  # text, group, text, group, ..., text
        if not name or any("[" in text or "]" in text for text in parts[::2]):
            raise LaunchProblem(f"cannot read the SLURM node list {hostlist!r}: set MASTER_ADDR to the first node")
        choices = [[part] if i % 2 == 0 else _numbers(part, hostlist) for i, part in enumerate(parts)]
        for combination in itertools.product(*choices):
            yield "".join(combination)


def _top_level_split(text: str) -> list[str]:
    """Split on the commas outside brackets."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
    return names + [text[start:]]


def _numbers(group: str, hostlist: str) -> list[str]:
    """"01-03,7" -> ["01", "02", "03", "7"]: each range as wide as its first number."""
    found = []
    for item in group.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise LaunchProblem(f"cannot read {item!r} in the SLURM node list {hostlist!r}: set MASTER_ADDR to the "
                                "first node")
        low, high = int(match[1]), int(match[2] or match[1])
        found += [str(n).zfill(len(match[1])) for n in range(low, high + 1)]
    return found


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: "gpu[01-04]-ib" -> "gpu01-ib"."""
    return next(expand_hostlist(nodelist))


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node list: "8(x2),4" -> [8, 8, 4]."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise LaunchProblem(f"cannot read SLURM's tasks per node {spec!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def _int(environ, name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchProblem(f"{name}={environ[name]!r} is not a number") from None


def _from_torch(environ) -> LaunchEnv:
    """RANK and WORLD_SIZE given: by the deepspeed launcher, torchrun, or by hand."""
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
    world = _int(environ, "WORLD_SIZE") if "WORLD_SIZE" in environ else 1
    if world > 1:
        missing += [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in environ]
    if missing:
        raise LaunchProblem(f"the environment sets {'RANK' if 'RANK' in environ else 'WORLD_SIZE'} but not "
                            f"{', '.join(missing)}: a launcher (deepspeed, torchrun) sets them all")
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in environ else "deepspeed" if "CROSS_RANK" in environ \
        else "environment"
    local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
    # the local world's size: LOCAL_SIZE from the deepspeed launcher, LOCAL_WORLD_SIZE from torchrun
    names = ("LOCAL_SIZE",) if launcher == "deepspeed" else ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    local_world = next((environ[name] for name in names if name in environ), None)
    return LaunchEnv(_int(environ, "RANK"), world, local, int(local_world) if local_world else world,
                     environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", 0)), launcher)


def _from_srun(environ) -> LaunchEnv:
    world = _int(environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS")
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE"))
    node = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    local_world = tasks_per_node(per_node)[node] if per_node else world
    nodelist = environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST")))
    if "MASTER_ADDR" not in environ and not nodelist and world > 1:
        raise LaunchProblem("srun set no node list (SLURM_STEP_NODELIST): set MASTER_ADDR to the first node")
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:  # a port of the job's own (jobs may share a node), below Linux's ephemeral
        port = JOB_PORTS[0] + _int(environ, "SLURM_JOB_ID") % (JOB_PORTS[1] - JOB_PORTS[0])  # ports: none is in use
    else:
        port = DEFAULT_PORT
    return LaunchEnv(_int(environ, "SLURM_PROCID"), world, _int(environ, "SLURM_LOCALID"), local_world,
                     environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1"), port, "srun")


def _from_mpi(environ, launcher: str, rank: str, size: str, local: str, local_size: str) -> LaunchEnv:
    world = _int(environ, size)
    if world > 1 and "MASTER_ADDR" not in environ:
        raise LaunchProblem(
            f"started by mpirun ({launcher}) without MASTER_ADDR: pass the first node's address to every process, "
            "e.g. mpirun -x MASTER_ADDR=node1 -x MASTER_PORT=29500 ... (Open MPI; -genv for MPICH/Intel MPI)")
    return LaunchEnv(_int(environ, rank), world, _int(environ, local) if local in environ else 0,
                     _int(environ, local_size) if local_size in environ else world,
                     environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", DEFAULT_PORT)), launcher)


def _srun_is_the_mpi_launcher(environ, mpi: tuple) -> bool:
    """Whether srun started this process itself with its PMI (srun --mpi=pmi2/pmix: the MPI variables repeat SLURM's
    rank and size), rather than mpirun inside an allocation, whose daemons srun started and whose variables the
    processes inherit (SLURM's rank and size then count the daemons, one per node: the MPI ones are this process's)."""
    _, rank, size, _, _ = mpi
    steps = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS"))
    return environ[rank] == environ["SLURM_PROCID"] and environ.get(size) == steps


def _claimed_processes(environ, explicit_world: bool) -> list[tuple[str, int]]:
    """What the environment says about the job's process count: (who says it, how many)."""
    claims = []
    if "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ:
        for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
            if name in environ:
                claims.append((f"srun ({name})", _int(environ, name)))
                break
    elif "SLURM_NTASKS" in environ and not explicit_world:  # an allocation's shell: sbatch script, salloc
        claims.append(("the SLURM allocation (SLURM_NTASKS), entered without srun", _int(environ, "SLURM_NTASKS")))
    for launcher, _, size, _, _ in MPI_LAUNCHERS:
        if size in environ:
            claims.append((f"{launcher} ({size})", _int(environ, size)))
    return claims


def resolve_launch(environ=None) -> LaunchEnv:
    """This process's place in the job, from the launcher's variables (torch's first: they are explicit)."""
    environ = os.environ if environ is None else environ
    explicit = "RANK" in environ or "WORLD_SIZE" in environ
    mpi = next((m for m in MPI_LAUNCHERS if m[1] in environ), None)
    srun = "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)
    if explicit:
        env = _from_torch(environ)
    elif mpi and not (srun and _srun_is_the_mpi_launcher(environ, mpi)):
        env = _from_mpi(environ, *mpi)
    elif srun:
        env = _from_srun(environ)
    else:
        env = LaunchEnv(0, 1, 0, 1, "127.0.0.1", 0, "python")
    if env.world_size == 1:
        several = [(who, n) for who, n in _claimed_processes(environ, explicit) if n > 1]
        if several:
            who, n = several[0]
            fix = ("unset WORLD_SIZE and RANK (a script exported them) so that the launcher's own variables are read"
                   if explicit else "to run one process on purpose inside the allocation, set WORLD_SIZE=1 RANK=0")
            raise LaunchProblem(
                f"{who} says this job has {n} processes, but this one resolves to a world of 1 ({env.launcher}): "
                "each would train alone on the same GPU into the same run folder. Start one process per GPU with "
                f"srun (srun python trainer/pretrain.py ...), torchrun or the deepspeed launcher; {fix}")
    if not 0 <= env.rank < env.world_size or not 0 <= env.local_rank < max(1, env.local_world_size):
        raise LaunchProblem(f"rank {env.rank} of {env.world_size} (local {env.local_rank} of {env.local_world_size}, "
                            f"from {env.launcher}) is not a place in the job")
    return env
