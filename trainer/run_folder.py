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


def check_shared(run_dir: str, rank: int, world_size: int) -> None:
    """Every rank writes a token into run_dir and must see every other rank's; raises NotShared naming who sees
    whom. One process (or all on one node) trivially passes. A collective: every rank must call it."""
    run_id = _gather(uuid.uuid4().hex[:12] if rank == 0 else None, world_size)[0]
    folder = os.path.join(run_dir, TOKENS)
    os.makedirs(folder, exist_ok=True)
    token = os.path.join(folder, f"{run_id}-rank{rank:05d}")
    with open(token, "w") as f:
        f.write(socket.gethostname())
    if world_size > 1:
        dist.barrier()
    reports = _gather((socket.gethostname(), os.path.abspath(run_dir), unseen_ranks(run_dir, world_size, run_id)),
                      world_size)
    if world_size > 1:
        dist.barrier()  # everyone looked: tokens can go
    os.remove(token)
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
