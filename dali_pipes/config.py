"""Everything a loader is built from, in checked, frozen values: LoaderOptions (how it reads and decodes: what a
recipe sets) and LoaderConfig (those, plus where it runs: the shards, the views, the batch, the rank, the device),
made once and handed to VideoLoader whole."""

import os
from dataclasses import dataclass, field

import torch

from dali_pipes import checks
from dali_pipes.sampling import EvalViews, TrainViews


def default_threads(processes_per_node: int = 1) -> int:
    """This process's share of the node's cores. A process allowed on every core of the machine shares them with
    the node's other ranks; one the launcher bound to some cores (srun's CPU binding, mpirun --bind-to, numactl)
    already has its share: all of those are its own."""
    allowed = len(os.sched_getaffinity(0))
    return max(1, allowed // max(1, processes_per_node) if allowed >= (os.cpu_count() or allowed) else allowed)


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    split: str = "train"
    decoder: object = "auto"  # a name in dali_pipes.decoders.DECODER_NAMES, or a Decoder
    num_threads: int | None = None  # None: default_threads(processes_per_node)
    decode_pipelines: int | None = None  # DALI pipelines taking turns (None: 4 with NVDEC, else 1)
    prefetch: int = 2  # batches read and planned ahead
    shuffle: bool = True  # (evaluation views never shuffle)
    shuffle_buffer: int = 1024  # clips in DALI's shuffle buffer, per rank (host memory: the log says how much)
    rand_augment: tuple[int, int] | None = None  # (ops, magnitude): DALI's RandAugment per view
    skip_damaged_shards: bool = False  # train without shards that are cut short or lack their index (logged)
    dont_use_mmap: bool = False  # network filesystems (NFS, Lustre, GPFS): plain reads instead of memory maps
    mixture: dict | None = None  # {set name: weight} for the named sets of `shards` that give no weight (mixture.py)

    def __post_init__(self):
        checks.refuse("loader options", self.problems())

    def problems(self) -> list[str]:
        from dali_pipes.decoders import DECODER_NAMES, Decoder

        return checks.problems(self, {
            "split": (lambda v: isinstance(v, str) and v != "", "a split name in the shards' manifest"),
            "decoder": (lambda v: v in DECODER_NAMES or isinstance(v, Decoder), f"one of {', '.join(DECODER_NAMES)}"),
            **{name: (checks.optional(checks.integer(1)), "an integer >= 1, or None (automatic)")
               for name in ("num_threads", "decode_pipelines")},
            "prefetch": (checks.integer(0), "an integer >= 0"),
            "shuffle_buffer": (checks.integer(1), "an integer >= 1"),
            "rand_augment": (checks.optional(lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(
                map(checks.integer(0), v))), "None, or (number of ops, magnitude) as two integers >= 0"),
            "mixture": (checks.optional(lambda v: isinstance(v, dict) and all(
                isinstance(k, str) and checks.number(above=0)(w) for k, w in v.items())),
                "None, or {set name: weight > 0}"),
            **{name: (checks.boolean, "True or False") for name in ("shuffle", "skip_damaged_shards",
                                                                     "dont_use_mmap")},
        })


@dataclass(frozen=True)
class LoaderConfig(LoaderOptions):
    """LoaderOptions (keyword-only) and where the loader runs; shards and views may be given by position."""

    shards: str  # a folder built by tools/build_shards.py, or a mixture of them (dali_pipes/mixture.py parse_data)
    views: TrainViews | EvalViews = field(default_factory=TrainViews)  # which views of each clip, and how laid out
    batch_size: int = 8  # decoded clips per batch; the batch holds batch_size x views_per_clip rows
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    processes_per_node: int = 1

    def problems(self) -> list[str]:
        found = super().problems() + checks.problems(self, {
            **{name: (checks.integer(low), f"an integer >= {low}") for name, low in (
                ("batch_size", 1), ("world_size", 1), ("rank", 0), ("processes_per_node", 1), ("seed", 0))},
        })
        if type(self.rank) is int and type(self.world_size) is int and self.rank >= self.world_size:
            found.append(f"rank={self.rank} (must be below world_size={self.world_size})")
        return found

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def threads(self) -> int:
        return self.num_threads or default_threads(self.processes_per_node)

    @property
    def shuffled(self) -> bool:
        return self.shuffle and self.views.shuffle
