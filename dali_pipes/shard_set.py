"""The shards of one split, checked before any pipeline is built, and how DALI splits them across ranks.

A shard cut short (a copy to a cluster's filesystem that did not finish) or without its index would otherwise end
a run after it started, with DALI's raw "offset is outside of the archive file" assertion. The manifest records
every shard's size, so each one is checked when the set is opened, against one listing of the store's sizes.
"""

import logging
from collections import Counter
from dataclasses import dataclass

from dali_pipes.shard_format import read_manifest
from dali_pipes.shard_store import Expected, open_store
from dali_pipes.shard_window import ShardWindow

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
    location: str = ""  # where the set is (a folder or a store's URL)
    streamed: bool = False  # DALI reads it from a store (s3://, not in the node cache): a silent store is retried
    window: object = None  # dali_pipes/shard_window.py ShardWindow: a split larger than the node cache

    def rank_sizes(self, world_size: int) -> list[int]:
        """Samples per rank in DALI's split: rank r reads samples [r N / W, (r + 1) N / W) of the concatenation."""
        n = self.num_samples
        return [(r + 1) * n // world_size - r * n // world_size for r in range(world_size)]

    def batches_per_epoch(self, batch_size: int, world_size: int) -> int:
        """Batches every rank takes per epoch: its largest part's, the others padded up to it (DALI's
        pad_last_batch), so that all ranks take the same number of steps."""
        return -(-max(self.rank_sizes(world_size)) // batch_size)

    def shuffle_fill(self, buffer: int, world_size: int) -> int:
        """Clips DALI's shuffle buffer holds: `buffer`, at most a rank's part of the set. A larger one shuffles no
        better, costs host memory, and DALI fills it before the first batch by reading the set round again (from a
        store: 1024 clips of an 8-clip set took 105 s)."""
        return min(buffer, max(self.rank_sizes(world_size)))


def shard_damage(sizes: dict, shard: dict) -> str | None:
    """What is wrong with one shard of the manifest, or None, from the store's {file name: bytes}."""
    if shard["tar"] not in sizes:
        return f"{shard['tar']}: missing"
    size, expected = sizes[shard["tar"]], shard.get("bytes")
    if expected is not None and size != expected:
        return f"{shard['tar']}: {size:,} bytes, the manifest says {expected:,} (cut short by an unfinished copy?)"
    if not sizes.get(shard["index"]):
        return f"{shard['index']}: missing or empty (the shard's DALI index)"
    return None


def summed_formats(shard_sets) -> dict:
    """{codec/pix_fmt: clips} over several sets: a mixture's loader takes one decoder route for all of them."""
    return dict(sum((Counter(s.formats) for s in shard_sets), Counter()))


def open_shard_set(location: str, split: str, skip_damaged: bool = False) -> ShardSet:
    """The split's shards from the manifest at `location` (a folder or a store's URL: shard_store.py), each checked
    against it. Damaged ones are refused, or with skip_damaged left out, loudly."""
    store = open_store(location)
    manifest = read_manifest(location)
    if split not in manifest["splits"]:
        raise ValueError(f"{location} has no {split!r} split; it has {sorted(manifest['splits'])}")
    info = manifest["splits"][split]
    if not info["shards"]:
        raise ValueError(f"{location}: the {split!r} split has no shards")
    def fetch(shards):
        store.fetch({name: expected for s in shards for name, expected in (
            (s["tar"], Expected(s.get("bytes"), s.get("sha256"))), (s["index"], Expected(s.get("index_bytes"),
                                                                                        s.get("index_sha256"))))})

    if not store.lists:  # (an http server lists nothing: its copy in the node cache is what is judged)
        fetch(info["shards"])
    sizes = store.sizes()
    damage = {i: problem for i, shard in enumerate(info["shards"]) if (problem := shard_damage(sizes, shard))}
    if damage and not skip_damaged:
        raise DamagedShards(
            f"{len(damage)} of the {len(info['shards'])} {split!r} shards in {location} are damaged: "
            + "; ".join(list(damage.values())[:10]) + ("; ..." if len(damage) > 10 else "")
            + ". Copy them again from where the set was built (or rebuild it with tools/build_shards.py). To train "
              "without them, set skip_damaged_shards=True: their clips are left out.")
    kept = [shard for i, shard in enumerate(info["shards"]) if i not in damage]
    if store.lists:  # judged on the store's listing, nothing copied: now the shards that are whole
        fetch(kept)
    window = None
    if getattr(store, "windowed", False):  # (the store's fetch decided: the split does not fit the node cache)
        window = ShardWindow(store.window_folder, kept, store.cache.room(), store.open)
    samples = info["samples"]
    if damage:
        lost = sum(info["shards"][i].get("samples", 0) for i in damage)
        samples -= lost
        log.warning("training WITHOUT %d damaged %r shards (%d of %d clips, %.1f%%): %s", len(damage), split, lost,
                    info["samples"], 100 * lost / max(1, info["samples"]), "; ".join(damage.values()))
        if not kept:
            raise DamagedShards(f"every {split!r} shard in {location} is damaged: nothing to train on")
    return ShardSet([store.dali_path(s["tar"]) for s in kept], [store.dali_path(s["index"]) for s in kept], samples,
                    sum(s.get("bytes", 0) for s in kept), info.get("formats") or info["codecs"], manifest["label_map"],
                    location, store.streamed, window)
