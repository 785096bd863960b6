"""A job told to stop: SLURM and most schedulers send SIGTERM before killing a job at its time limit or on
preemption (or a chosen signal ahead of it: sbatch --signal=USR1@120), then wait a grace period (SLURM's KillWait,
30 s by default) before SIGKILL.

The trainer catches SIGTERM and SIGUSR1, checkpoints at the next optimizer step that every rank agrees on (the
signal travels with each step's numbers, trainer/host_readback.py), writes RUN_DIR/preempted.json and exits with
EXIT_PREEMPTED (75, sysexits' EX_TEMPFAIL: try again later), so that a requeue script can tell a preemption from a
failure. A second signal ends the process at once.
"""

import logging
import signal
import threading

log = logging.getLogger("trainer")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75
MARKER = "preempted.json"


class PreemptionSignal:
    """Catches SIGNALS from construction until restore(): `requested` says whether one came."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # (Python takes signals in the main thread)
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        log.warning("received %s: checkpointing at the next optimizer step, then exiting with %d (a second %s ends "
                    "the process at once)", self.received, EXIT_PREEMPTED, self.received)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
