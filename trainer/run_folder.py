"""The output folder of a run, and the check that every rank writes into the same one.

    RUN_DIR/config.json, train.log, metrics.jsonl, tensorboard/, pictures/, export/, preflight.json
    RUN_DIR/checkpoints/latest, RUN_DIR/checkpoints/stepNNNNNNNN/ (trainer/checkpointing.py)
Checkpoints and resume assume one filesystem shared by all nodes: every rank writes its own part of a checkpoint,
and only rank 0 moves `latest`. A node-local --output (e.g. /tmp on each node) would write checkpoints that no run
can resume from, so it is refused at the start, before any step is lost.
"""

import os
import socket
import uuid

import torch.distributed as dist

TOKENS = ".ranks"


class NotShared(RuntimeError):
    """Some ranks cannot see files written by others into the run folder."""


def _gather(value, world_size: int) -> list:
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def unseen_ranks(run_dir: str, world_size: int, run_id: str) -> list[int]:
    """The ranks whose tokens for `run_id` are not visible in run_dir from here."""
    folder = os.path.join(run_dir, TOKENS)
    present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    return [r for r in range(world_size) if f"{run_id}-rank{r:05d}" not in present]


def write_token(path: str) -> None:
    with open(path, "w") as f:
        f.write(socket.gethostname())


def check_shared(run_dir: str, rank: int, world_size: int) -> None:
    """Every rank writes a token into run_dir and must see every other rank's; raises NotShared naming who sees
    whom, or who could not write. One process (or all on one node) trivially passes. A collective: every rank must
    call it, and every rank takes every step of it whatever fails on its side (a rank that left early would leave
    the others waiting in a collective), so all raise together."""
    run_id = _gather(uuid.uuid4().hex[:12] if rank == 0 else None, world_size)[0]
    folder = os.path.join(run_dir, TOKENS)
    token = os.path.join(folder, f"{run_id}-rank{rank:05d}")
    try:
        os.makedirs(folder, exist_ok=True)
        write_token(token)
        problem = None
    except OSError as err:
        problem = f"{type(err).__name__}: {err}"
    problems = _gather((socket.gethostname(), problem), world_size)
    missing = [] if any(p for _, p in problems) else unseen_ranks(run_dir, world_size, run_id)
    reports = _gather((socket.gethostname(), os.path.abspath(run_dir), missing), world_size)  # everyone looked
    if os.path.exists(token):
        os.remove(token)
    failed = [(r, host, p) for r, (host, p) in enumerate(problems) if p]
    if failed:
        lines = [f"rank {r} on {host} cannot write there: {p}" for r, host, p in failed[:8]]
        raise NotShared(f"the output folder {run_dir} is not writable by every rank:\n  " + "\n  ".join(lines)
                        + "\nGive --output a folder every rank can write, on a filesystem all nodes share.")
    blind = [(r, host, path, missing) for r, (host, path, missing) in enumerate(reports) if missing]
    if blind:
        lines = [f"rank {r} on {host} ({path}) does not see the files of ranks {_ranges(missing)}"
                 for r, host, path, missing in blind[:8]]
        raise NotShared(
            f"the output folder {run_dir} is not shared by all ranks:\n  " + "\n  ".join(lines) + "\nCheckpoints "
            "and resume need one folder that every node sees (a shared filesystem: NFS, Lustre, GPFS, ...); only "
            "rank 0 writes `latest`. Give --output a path on a shared filesystem.")


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)
