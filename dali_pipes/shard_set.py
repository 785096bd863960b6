"""The shards of one split, checked before any pipeline is built, and how DALI splits them across ranks."""

import os
from dataclasses import dataclass

from dali_pipes.shard_format import read_manifest


@dataclass(frozen=True)
class ShardSet:
    tars: list
    indexes: list
    num_samples: int
    codecs: dict  # codec -> clip count, as recorded by the shard builder
    label_map: dict

    def rank_sizes(self, world_size: int) -> list[int]:
        """Samples per rank in DALI's split: rank r reads samples [r N / W, (r + 1) N / W) of the concatenation."""
        n = self.num_samples
        return [(r + 1) * n // world_size - r * n // world_size for r in range(world_size)]


def open_shard_set(shards_dir: str, split: str) -> ShardSet:
    """The split's shards from OUT/manifest.json; every tar and index must be there."""
    if not os.path.isdir(shards_dir):
        raise FileNotFoundError(f"no shards folder {shards_dir}")
    manifest = read_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"{shards_dir} has no {split!r} split; it has {sorted(manifest['splits'])}")
    info = manifest["splits"][split]
    if not info["shards"]:
        raise ValueError(f"{shards_dir}: the {split!r} split has no shards")
    tars = [os.path.join(shards_dir, s["tar"]) for s in info["shards"]]
    indexes = [os.path.join(shards_dir, s["index"]) for s in info["shards"]]
    missing = [p for p in tars + indexes if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard or index file(s) listed in the manifest are missing, e.g. {missing[0]} "
            "(rerun tools/build_shards.py with the same arguments to finish the set)"
        )
    return ShardSet(tars, indexes, info["samples"], info["codecs"], manifest["label_map"])
