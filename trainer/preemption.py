"""A job told to stop: SLURM and most schedulers send SIGTERM before killing a job at its time limit or on
preemption (or a chosen signal ahead of it: sbatch --signal=USR1@120), then wait a grace period (SLURM's KillWait,
30 s by default) before SIGKILL.

The trainer catches SIGTERM and SIGUSR1, checkpoints at the next optimizer step that every rank agrees on (the
signal travels with each step's numbers, trainer/host_readback.py), writes RUN_DIR/preempted.json and exits with
EXIT_PREEMPTED (75, sysexits' EX_TEMPFAIL: try again later), so that a requeue script can tell a preemption from a
failure. More signals change nothing: a scheduler signals every process of a job and the launchers pass it on
again (the deepspeed launcher's launch.py and torchrun each send their own SIGTERM), so a trainer commonly gets two
or three; each is logged, the checkpoint is written once. Under trainer/supervise.py the trainer registers itself
so that the supervisor can hand it the signal and end the job with its exit code.
"""

import logging
import signal
import threading

from trainer import supervise

log = logging.getLogger("trainer")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75
MARKER = "preempted.json"


class PreemptionSignal:
    """Catches SIGNALS from construction until restore(): `requested` says whether one came."""

    def __init__(self):
        self.received: str | None = None
        self.count = 0  # signals received
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # (Python takes signals in the main thread)
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        if supervise.register():  # the job was signalled before this process could listen
            self.received, self.count = "the supervisor's signal", 1

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.count += 1
        if self.received is None:
            self.received = name
            log.warning("received %s: checkpointing at the next optimizer step, then exiting with %d", name,
                        EXIT_PREEMPTED)
        else:
            log.warning("received %s again (signal %d): already stopping, the checkpoint is written once", name,
                        self.count)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
