"""JIT-compiled ops and their lock files: build nothing that is not needed, and never wait on a dead builder.

torch.utils.cpp_extension builds an op under TORCH_EXTENSIONS_DIR/<op>/ while holding <op>/lock, a plain file it
creates exclusively and deletes when done (torch.utils.file_baton.FileBaton). A process killed while building
(Ctrl-C during the first start) leaves the file behind, and every later start waits on it forever, silently.
The builder keeps the lock file open for the whole build, so a lock that no process has open is stale.
"""

import glob
import logging
import os

log = logging.getLogger("trainer")


def build_lock_files(root: str | None = None) -> list[str]:
    """Every op's lock file under TORCH_EXTENSIONS_DIR (or torch's default root, which holds one folder per
    Python and accelerator, e.g. py311_cpu/<op>/lock)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = root or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")))


def processes_holding(path: str) -> list[int]:
    """PIDs of the processes on this machine that have `path` open (Linux /proc; empty elsewhere)."""
    target, holders = os.path.realpath(path), []
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            if any(os.path.realpath(os.path.join(fd_dir, fd)) == target for fd in os.listdir(fd_dir)):
                holders.append(int(fd_dir.split("/")[2]))
        except OSError:  # the process ended, or it is not ours to look at
            continue
    return holders


def remove_stale_build_locks(root: str | None = None) -> list[str]:
    """Delete the build locks under root that no process holds open; returns their paths."""
    if not os.path.isdir("/proc/self/fd"):
        return []  # no way to tell a live builder from a dead one here
    removed = []
    for lock in build_lock_files(root):
        if not processes_holding(lock):
            try:
                os.remove(lock)
            except FileNotFoundError:  # its builder finished meanwhile
                continue
            log.warning("removed a stale build lock %s: its builder died (killed during a first start?); the op "
                        "is built again if needed", lock)
            removed.append(lock)
    return removed


def skip_deepspeed_shm_op() -> None:
    """DeepSpeed builds a CPU shared-memory op (~25 s with g++) at every first distributed start on a CPU; it serves
    only its inference all-reduce (deepspeed/comm/torch.py: TorchBackend.inference_all_reduce), never training,
    which uses gloo's all-reduce. Marking it incompatible makes DeepSpeed skip the build (build_shm_op)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
