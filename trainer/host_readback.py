"""A step's loss and counters on the host without stalling the device: the training loop reads them one step late.

Reading a CUDA scalar (`.item()`, `float()`) waits for every kernel queued before it, and a blocking all-reduce
between forward and backward stops the host from queueing the backward while ranks wait for each other. Instead,
each optimizer step's values are summed over ranks with an asynchronous all-reduce and copied into pinned host
memory without blocking; the copy is read at the next step, when it finished long ago, so the host keeps the GPU
queue full. On a CPU (gloo) the reduce runs on gloo's thread and is waited for only when read.
"""

import torch
import torch.distributed as dist


class HostReadback:
    """values (a small float tensor on the training device), summed over all ranks, readable later on the host."""

    def __init__(self, values: torch.Tensor):
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._work = dist.all_reduce(values, async_op=True) if distributed else None
        self._ready = None
        if values.is_cuda:
            if self._work is not None:
                self._work.wait()  # NCCL: orders the copy after the reduce on the stream; the host does not wait
                self._work = None
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = values

    def result(self) -> list[float]:
        """The summed values; waits only if they are not there yet (at the next step they long are)."""
        if self._ready is not None:
            self._ready.synchronize()
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._host.tolist()
