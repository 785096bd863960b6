"""Everything a loader is built from, in one checked, frozen value: made once (the trainer makes it from its recipe)
and handed to VideoLoader whole."""

import os
from dataclasses import dataclass, field

import torch

from dali_pipes.sampling import EvalViews, TrainViews


def default_threads(processes_per_node: int = 1) -> int:
    """This process's share of the cores it may run on (the ranks of one node share them)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes_per_node))


@dataclass(frozen=True)
class LoaderConfig:
    shards: str  # a folder built by tools/build_shards.py
    views: TrainViews | EvalViews = field(default_factory=TrainViews)  # which views of each clip, and how laid out
    split: str = "train"
    batch_size: int = 8  # decoded clips per batch; the batch holds batch_size x views_per_clip rows
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    decoder: object = "auto"  # a name in dali_pipes.decoders.DECODER_NAMES, or a Decoder
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    num_threads: int | None = None  # None: default_threads(processes_per_node)
    processes_per_node: int = 1
    decode_pipelines: int | None = None  # DALI pipelines taking turns (None: 4 with NVDEC, else 1)
    prefetch: int = 2  # batches read and planned ahead
    shuffle: bool = True  # (evaluation views never shuffle)
    shuffle_buffer: int = 1024  # clips in DALI's shuffle buffer, per rank
    rand_augment: tuple[int, int] | None = None  # (ops, magnitude): DALI's RandAugment per view
    skip_damaged_shards: bool = False  # train without shards that are cut short or lack their index (logged)
    dont_use_mmap: bool = False  # network filesystems: plain reads instead of memory maps

    def __post_init__(self):
        problems = [f"{name}={getattr(self, name)!r} (must be an integer >= {low})" for name, low in (
            ("batch_size", 1), ("world_size", 1), ("rank", 0), ("processes_per_node", 1), ("prefetch", 0),
            ("shuffle_buffer", 1)) if type(getattr(self, name)) is not int or getattr(self, name) < low]
        for name in ("num_threads", "decode_pipelines"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                problems.append(f"{name}={value!r} (must be an integer >= 1, or None: automatic)")
        if type(self.rank) is int and type(self.world_size) is int and self.rank >= self.world_size:
            problems.append(f"rank={self.rank} (must be below world_size={self.world_size})")
        if problems:
            raise ValueError("invalid loader options: " + "; ".join(problems))
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def threads(self) -> int:
        return self.num_threads or default_threads(self.processes_per_node)

    @property
    def shuffled(self) -> bool:
        return self.shuffle and self.views.shuffle
