"""The preflight's bookkeeping between ranks on a gloo group of its own, with a timeout: a rank that failed, hung or
lost the network becomes a FAIL naming it within the timeout, never a job that hangs for NCCL's (10 minutes).

Every rank calls every method in the same order, whatever happened on its side: a check that fails on one rank
turns into a value it gathers, not a missing call.
"""

from datetime import timedelta

import torch.distributed as dist


class Ranks:
    def __init__(self, rank: int, world_size: int, timeout: float):
        """timeout: seconds a check's collective may wait (the checks' own groups get it). This bookkeeping waits
        twice as long: a rank that failed at once waits here for those that waited out a check's collective."""
        self.rank, self.world_size, self.timeout = rank, world_size, timedelta(seconds=timeout)
        self.group = dist.new_group(backend="gloo", timeout=2 * self.timeout) if world_size > 1 else None

    def gather(self, value) -> list | None:
        """Every rank's `value`, or None if some rank did not answer in time."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, value, group=self.group)
        except RuntimeError:  # gloo's timeout, or a peer that is gone
            return None
        return gathered

    def failing(self, ok: bool) -> list[int] | None:
        """The ranks for which `ok` is False (None if some rank did not answer)."""
        votes = self.gather(ok)
        return None if votes is None else [r for r, vote in enumerate(votes) if not vote]
