"""A launcher run as a scheduler's job: its stop signals reach the trainers, it waits for their checkpoint, and it
ends with the trainers' own exit code (75 after a stop signal's checkpoint, 4 when the shard store stopped answering).

    python trainer/supervise.py deepspeed --num_gpus 8 trainer/pretrain.py --ds_config ... --output runs/vit_l
    python trainer/supervise.py torchrun --nproc-per-node 8 trainer/pretrain.py ...

Why: a scheduler signals every process of a job (SLURM at a time limit or on scancel; Ctrl-C and `kill -- -PGID`
the whole process group; Kubernetes PID 1 only), and neither launcher passes a checkpoint's exit code on. Measured
here with DeepSpeed 0.19.8 and torch 2.13 on a SIGTERM to the job's process group:
- the `deepspeed` command (launcher/runner.py) installs no handler for one node and dies at once (exit 143); its
  launch.py sends the trainers a second SIGTERM, waits 30 s, kills them, and exits 1; SIGUSR1 kills both launchers;
- torchrun forwards SIGTERM, waits --shutdown-timeout (30 s) for the trainers, and exits 1 (its SignalException);
  it forwards SIGUSR1 only with --signals-to-handle.
This process handles SIGTERM and SIGUSR1 instead of dying, hands each one to the trainers of this node (they
register here when they start: TRAINERS names the folder), keeps every process the launcher started as its child
when the launcher dies (Linux's child subreaper), waits for all of them, and exits with the code the trainers
recorded. The trainers checkpoint once, however many signals come (trainer/preemption.py).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

TRAINERS = "MAE_ST_SUPERVISOR"  # the environment variable naming the folder where this node's trainers register
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_SIGNALLED = "signalled"  # written here when a signal came: a trainer that registers later stops at once too
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


# --- the trainers' side -------------------------------------------------------------------------------------------


def register() -> bool:
    """Called by a trainer as it starts: its PID for the signals to come. True when the job was signalled before."""
    folder = os.environ.get(TRAINERS)
    if not folder or not os.path.isdir(folder):
        return False
    open(os.path.join(folder, f"trainer-{os.getpid()}"), "w").close()
    return os.path.exists(os.path.join(folder, _SIGNALLED))


def record_exit(code: int) -> None:
    """Called by a trainer as it ends (a crash records nothing): the exit code the job should end with."""
    folder = os.environ.get(TRAINERS)
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, f"exit-{os.getpid()}"), "w") as f:
            f.write(str(code))


# --- the supervisor -------------------------------------------------------------------------------------------------


def _trainers(folder: str) -> list[int]:
    return [int(name.split("-")[1]) for name in os.listdir(folder) if name.startswith("trainer-")]


def _recorded_exits(folder: str) -> list[int]:
    codes = []
    for name in os.listdir(folder):
        if name.startswith("exit-"):
            with open(os.path.join(folder, name)) as f:
                codes.append(int(f.read()))
    return codes


def job_exit_code(launcher_code: int, registered: int, recorded: list[int]) -> int:
    """The trainers' verdict when every one of them recorded one (the largest: 75 stop signal > 4 store > 3 guard >
    0 done), else the launcher's: a trainer crashed, or was killed before it could checkpoint (never 75)."""
    if registered and len(recorded) == registered:
        return max(recorded)
    return launcher_code if launcher_code >= 0 else 128 - launcher_code


def _become_subreaper() -> None:
    """Processes whose parent dies (a launcher killed by the signal) become our children, so we can wait for them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("supervise: could not become a child subreaper; trainers orphaned by their launcher are not waited "
              "for", file=sys.stderr)


def main(argv=None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="mae_st_job_")

    def forward(signum, frame) -> None:
        open(os.path.join(folder, _SIGNALLED), "w").close()
        for pid in _trainers(folder):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    _become_subreaper()
    previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        launcher = subprocess.Popen(command, env={**os.environ, TRAINERS: folder})
        code = launcher.wait()
        while True:  # whatever the launcher left running (its trainers, when a signal killed it)
            try:
                os.wait()
            except ChildProcessError:
                break
        return job_exit_code(code, len(_trainers(folder)), _recorded_exits(folder))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
