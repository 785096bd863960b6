"""Writes webdataset shards so that a kill at any moment leaves only whole shards behind.

A shard is written to OUT/.state/NAME.partial, then its DALI index and a sidecar listing its samples are written,
and only then is it renamed to OUT/NAME: the rename is the commit. On a restart, `recover` deletes whatever
belongs to no committed shard and returns the committed shards' samples, so the build carries on where it stopped.
One build at a time writes to a folder (`lock_output`): two would number their shards alike and delete each other's
partial files.
"""

import fcntl
import json
import os
import re

import webdataset as wds
from wds2idx import IndexCreator  # DALI's own index builder (installed with nvidia-dali)

from dali_pipes.shard_format import file_sha256, index_name, shard_name
from trainer.atomic_files import atomic_write_text

STATE_DIR = ".state"
LOCK = "lock"


class OutputLocked(Exception):
    pass


def lock_output(out_dir: str):
    """OUT/.state/lock, open and flock-ed, holding this process's PID: keep it open for the whole build. The kernel
    drops a flock when the last descriptor of it closes, so a killed build (SIGKILL included) leaves no stale lock;
    processes forked while it is held share it, and must not outlive the build."""
    lock = open(os.path.join(out_dir, STATE_DIR, LOCK), "a+")  # "a+": the holder's PID stays readable
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise OutputLocked(f"{out_dir} is being written by another build_shards.py run (PID {holder}): wait for it "
                           "to finish, or use another --out") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def recover(out_dir: str, split: str) -> list[dict]:
    """Committed shards of `split` (their sidecars, in order); removes partial shards and orphaned files."""
    state = os.path.join(out_dir, STATE_DIR)
    pattern = re.compile(rf"^{re.escape(split)}-(\d{{6}})\.")
    committed = []
    for name in sorted(os.listdir(state)) if os.path.isdir(state) else []:
        path = os.path.join(state, name)
        if not pattern.match(name):
            continue
        tar = os.path.join(out_dir, name.split(".")[0] + ".tar")
        if name.endswith(".json") and os.path.exists(tar):
            with open(path) as f:
                committed.append(json.load(f))
        else:  # a .partial tar, a .tmp, or the sidecar of a shard that never got renamed
            os.remove(path)
    for name in os.listdir(out_dir):
        orphan = not os.path.exists(os.path.join(out_dir, name[:-4] + ".tar"))
        if pattern.match(name) and name.endswith(".idx") and orphan:
            os.remove(os.path.join(out_dir, name))
    return committed


def remove_split(out_dir: str, split: str) -> None:
    """Delete a split's shards, indexes, sidecars, skip log and source list (a build that replaces it)."""
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.")
    for folder in (out_dir, os.path.join(out_dir, STATE_DIR)):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if pattern.match(name) or name in (f"skipped-{split}.jsonl", f"sources-{split}.json"):
                os.remove(os.path.join(folder, name))


class ShardWriter:
    def __init__(self, out_dir: str, split: str, max_bytes: int, max_count: int, first_index: int = 0):
        self.out_dir, self.split = out_dir, split
        self.max_bytes, self.max_count = max_bytes, max_count or float("inf")
        self.index = first_index
        self.committed: list[dict] = []  # sidecars of the shards this writer finished
        self._tar = self._file = None
        self._samples: list[dict] = []
        self._bytes = 0
        os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)

    def _state_path(self, suffix: str) -> str:
        return os.path.join(self.out_dir, STATE_DIR, shard_name(self.split, self.index) + suffix)

    def write(self, key: str, files: dict[str, bytes], record: dict) -> None:
        """Add one sample ({ext: bytes}); starts a new shard when this one would exceed its size or count."""
        size = sum(len(v) for v in files.values())
        if self._tar is not None and (self._bytes + size > self.max_bytes or len(self._samples) >= self.max_count):
            self.finish_shard()
        if self._tar is None:
            self._file = open(self._state_path(".partial"), "wb")
            self._tar = wds.TarWriter(self._file, encoder=False)
        self._tar.write({"__key__": key, **files})
        self._samples.append({**record, "key": key, "bytes": size})
        self._bytes += size

    def finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.split, self.index)
        partial, final = self._state_path(".partial"), os.path.join(self.out_dir, name)
        index_tmp = self._state_path(".idx.tmp")
        with IndexCreator(partial, index_tmp, verbose=False) as creator:
            creator.create_index()
        index = os.path.join(self.out_dir, index_name(name))
        os.replace(index_tmp, index)
        # sizes and checksums: what a copy of the set (a node cache, a shard window) is checked against
        sidecar = {"tar": name, "index": index_name(name), "samples": self._samples, "bytes": os.path.getsize(partial),
                   "sha256": file_sha256(partial), "index_bytes": os.path.getsize(index),
                   "index_sha256": file_sha256(index)}
        atomic_write_text(self._state_path(".json"), json.dumps(sidecar))
        os.replace(partial, final)  # the commit
        self.committed.append(sidecar)
        self._tar, self._samples, self._bytes = None, [], 0
        self.index += 1

    def close(self) -> None:
        self.finish_shard()
