"""One measurement of tools/benchmark.py, alive in a process of its own for the whole benchmark and run one round at
a time, so that the things compared take turns (A B C, B C A, ...) and a slow moment of the machine hits them all.

The process imports `module`, calls `setup(cfg, **kwargs)` once (building loaders, models, reading batches), and
then answers each `round` request with what the returned function measures: {"seconds": s, "items": n, ...}.
Between rounds the benchmark waits for the process (and its children: DataLoader workers) to go idle, so that the
next contender does not share the cores with this one's read-ahead.
"""

import multiprocessing as mp
import os
import resource
import signal
import time


def _serve(connection, module: str, function: str, cfg: dict, kwargs: dict) -> None:
    try:
        run_round = getattr(__import__(module, fromlist=[function]), function)(cfg, **kwargs)
        connection.send({"ready": True})
    except Exception as err:  # reported in the table, not a crash of the whole benchmark
        connection.send({"error": f"{type(err).__name__}: {err}"})
        run_round = None
    while run_round is not None and connection.recv() == "round":
        try:
            connection.send(run_round())
        except Exception as err:
            connection.send({"error": f"{type(err).__name__}: {err}"})
    # Leave without interpreter teardown, workers first: DataLoader workers and DALI threads were seen to abort in
    # their C++ destructors at exit ("terminate called without an active exception"), after the measurement.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the workers' deaths
    for worker in mp.active_children():
        worker.kill()
        worker.join()  # (a waited-for child counts in RUSAGE_CHILDREN's peak)
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    connection.send({"peak_mb": round(peak_kb / 1024)})
    os._exit(0)


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and its descendants so far (Linux /proc; 0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    children, total = {}, 0.0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append((int(entry), int(fields[11]) + int(fields[12])))
            except (OSError, IndexError, ValueError):
                continue
    todo = [pid]
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
        return 0.0
    while todo:
        for child, ticks in children.get(todo.pop(), []):
            total += ticks / tick
            todo.append(child)
    return total


class Contender:
    def __init__(self, name: str, target: str, cfg: dict, views: int = 1, **kwargs):
        self.name, self.views, self.kwargs, self.results, self.error = name, views, kwargs, [], None
        module, function = target.split(":")
        # The processes leave by os._exit (see _serve), so the semaphores of their DataLoader queues are freed by
        # multiprocessing's resource tracker, which would warn about each at the end: expected, not a leak. The
        # tracker starts with the first process and reads this then.
        os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
        ctx = mp.get_context("spawn")
        self._connection, child = ctx.Pipe()
        # not a daemon: a DataLoader in it starts worker processes of its own (stop() ends it and them)
        self._process = ctx.Process(target=_serve, args=(child, module, function, cfg, kwargs))
        self._process.start()  # its setup runs while the group's other contenders start theirs

    def wait_until_set_up(self) -> None:
        """Its setup done (or failed), and the process idle again: the first round may start."""
        answer = self._connection.recv()
        self.error = answer.get("error")
        self.settle()

    def round(self) -> dict | None:
        self.start_round()
        return self.finish_round()

    def start_round(self) -> None:
        """Start a round without waiting for it (contenders that run at once: tools/bench/sharing.py)."""
        if not self.error:
            self._connection.send("round")

    def finish_round(self) -> dict | None:
        """Wait for the round start_round began; its result (None after an error)."""
        if self.error:
            return None
        result = self._connection.recv()
        if "error" in result:
            self.error = result["error"]
            return None
        self.results.append(result)
        self.settle()
        return result

    def settle(self, idle_share: float = 0.05, window: float = 0.1, limit: float = 3.0) -> None:
        """Wait until the process tree uses less than `idle_share` of a core over `window` seconds."""
        deadline, before = time.perf_counter() + limit, _cpu_seconds(self._process.pid)
        while time.perf_counter() < deadline:
            time.sleep(window)
            now = _cpu_seconds(self._process.pid)
            if now - before < idle_share * window:
                return
            before = now

    def stop(self) -> int | None:
        """End the process (a second call does nothing); its peak resident memory (MB, with its children)."""
        peak = None
        if self._process.is_alive():
            try:
                self._connection.send("stop")
                peak = self._connection.recv().get("peak_mb")
            except (EOFError, OSError):
                pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        return peak
