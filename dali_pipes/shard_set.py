"""The shards of one split, checked before any pipeline is built, and how DALI splits them across ranks.

A shard cut short (a copy to a cluster's filesystem that did not finish) or without its index would otherwise end
a run after it started, with DALI's raw "offset is outside of the archive file" assertion. The manifest records
every shard's size, so each one is checked when the set is opened.
"""

import logging
import os
from dataclasses import dataclass

from dali_pipes.shard_format import read_manifest

log = logging.getLogger("dali_pipes")


class DamagedShards(FileNotFoundError):
    """Shard files are missing, cut short or without their index; the message names them and what to do."""


@dataclass(frozen=True)
class ShardSet:
    tars: list
    indexes: list
    num_samples: int
    num_bytes: int
    formats: dict  # "codec/pix_fmt" (or "codec", for sets built before pixel formats were recorded) -> clips
    label_map: dict

    def rank_sizes(self, world_size: int) -> list[int]:
        """Samples per rank in DALI's split: rank r reads samples [r N / W, (r + 1) N / W) of the concatenation."""
        n = self.num_samples
        return [(r + 1) * n // world_size - r * n // world_size for r in range(world_size)]

    def batches_per_epoch(self, batch_size: int, world_size: int) -> int:
        """Batches every rank takes per epoch: its largest part's, the others padded up to it (DALI's
        pad_last_batch), so that all ranks take the same number of steps."""
        return -(-max(self.rank_sizes(world_size)) // batch_size)


def shard_damage(shards_dir: str, shard: dict) -> str | None:
    """What is wrong with one shard of the manifest, or None."""
    tar, index = os.path.join(shards_dir, shard["tar"]), os.path.join(shards_dir, shard["index"])
    if not os.path.isfile(tar):
        return f"{shard['tar']}: missing"
    size, expected = os.path.getsize(tar), shard.get("bytes")
    if expected is not None and size != expected:
        return f"{shard['tar']}: {size:,} bytes, the manifest says {expected:,} (cut short by an unfinished copy?)"
    if not os.path.isfile(index) or os.path.getsize(index) == 0:
        return f"{shard['index']}: missing or empty (the shard's DALI index)"
    return None


def open_shard_set(shards_dir: str, split: str, skip_damaged: bool = False) -> ShardSet:
    """The split's shards from OUT/manifest.json, each checked against it. Damaged ones are refused, or with
    skip_damaged left out, loudly."""
    if not os.path.isdir(shards_dir):
        raise FileNotFoundError(f"no shards folder {shards_dir}")
    manifest = read_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"{shards_dir} has no {split!r} split; it has {sorted(manifest['splits'])}")
    info = manifest["splits"][split]
    if not info["shards"]:
        raise ValueError(f"{shards_dir}: the {split!r} split has no shards")
    damage = {i: problem for i, shard in enumerate(info["shards"]) if (problem := shard_damage(shards_dir, shard))}
    if damage and not skip_damaged:
        raise DamagedShards(
            f"{len(damage)} of the {len(info['shards'])} {split!r} shards in {shards_dir} are damaged:\n  "
            + "\n  ".join(list(damage.values())[:10]) + ("\n  ..." if len(damage) > 10 else "")
            + "\nCopy them again from where the set was built (or rebuild it with tools/build_shards.py). To train "
              "without them, set skip_damaged_shards=True: their clips are left out.")
    kept = [shard for i, shard in enumerate(info["shards"]) if i not in damage]
    samples = info["samples"]
    if damage:
        lost = sum(info["shards"][i].get("samples", 0) for i in damage)
        samples -= lost
        log.warning("training WITHOUT %d damaged %r shards (%d of %d clips, %.1f%%): %s", len(damage), split, lost,
                    info["samples"], 100 * lost / max(1, info["samples"]), "; ".join(damage.values()))
        if not kept:
            raise DamagedShards(f"every {split!r} shard in {shards_dir} is damaged: nothing to train on")
    return ShardSet([os.path.join(shards_dir, s["tar"]) for s in kept],
                    [os.path.join(shards_dir, s["index"]) for s in kept], samples,
                    sum(s.get("bytes", 0) for s in kept), info.get("formats") or info["codecs"], manifest["label_map"])
