"""A streamed split on the node's disk, a window at a time: the shards this node's ranks read next, fetched whole
with one GET each, several at once, ahead of the reader, under a size cap, and given back to the disk once every
local rank has read past them. What a split larger than the node cache needs: DALI's own streaming waits on one
ranged GET at a time (10-50 ms each from a real store), a shard fetched whole waits once.

DALI's webdataset reader opens its files when it is built, so every shard of the split is a file here from the start:
a sparse placeholder of the shard's size, taking no disk space. A shard is fetched into its placeholder in place (the
reader's mapping sees the bytes), checked against the manifest's size and SHA-256, and marked whole; leaving the
window, its blocks are given back (a punched hole: the file keeps its size, the reader never reads it again before
it is fetched anew). The reader runs only once the samples it may read next are whole (`ensure`), so the order of
its batches and its cursor are DALI's, as from disk: a run resumes exactly, on any number of processes.

All ranks of a node share one window folder: a shard is fetched by one of them (a lock per shard) and read by every
rank that needs it; each rank records the shards it still needs, and a shard no live rank needs is evicted first.
MAE_ST_SHARD_CACHE_GB caps the window as it caps the node cache; MAE_ST_SHARD_GETS sets the concurrent GETs (8).
"""

import bisect
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from dali_pipes.shard_store import StoreUnavailable

log = logging.getLogger("dali_pipes")
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02  # <linux/falloc.h>
RETRY_DELAYS = (1, 2, 4, 8, 16)  # seconds before each new try at a shard (as the reader's: dali_pipes/reader.py)
WHOLE, NEEDS = ".whole.", ".needs."  # marker of a fetched shard; a process's shards still to read


class WindowTooSmall(ValueError):
    """The samples a reader may read next do not fit the window's cap."""


class ShardWindow:
    def __init__(self, folder: str, shards: list, cap: float, open_file, gets: int | None = None):
        """folder: node-local; shards: the split's manifest entries in the reader's order ({"tar", "bytes",
        "samples", "sha256"}); cap: bytes the window may hold; open_file(name): a stream of the stored file."""
        self.folder, self.shards, self.cap, self.open_file = folder, shards, cap, open_file
        self.gets = gets or int(os.environ.get("MAE_ST_SHARD_GETS", "8"))
        self.first_sample = [0]  # the split's sample number each shard starts at, and one past the last
        for shard in shards:
            self.first_sample.append(self.first_sample[-1] + shard["samples"])
        self.fetched_bytes, self.fetched = 0, []  # by this process: bytes, shard names
        self.waited = 0.0  # seconds this process's reader waited for the window
        self._pool, self._pending, self._lock = ThreadPoolExecutor(self.gets), {}, threading.RLock()
        os.makedirs(folder, exist_ok=True)
        with self._node_lock():
            for shard in shards:  # the placeholders DALI opens
                path = self.path(shard["tar"])
                if not os.path.exists(path) or os.path.getsize(path) != shard["bytes"]:
                    with open(path, "wb") as f:
                        f.truncate(shard["bytes"])

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def shards_of(self, samples: list) -> list[int]:
        """The shard numbers holding any of the sample ranges [(start, stop)] of the split, in order of first need."""
        found = []
        for start, stop in samples:
            if stop <= start:
                continue
            first = bisect.bisect_right(self.first_sample, start) - 1
            last = bisect.bisect_right(self.first_sample, stop - 1) - 1
            found += [i for i in range(first, last + 1) if i not in found]
        return found

    def ensure(self, needed: list, ahead: list) -> None:
        """Return once the shards holding the sample ranges `needed` are whole here; fetch those of `ahead` in the
        background, as far as the cap allows. What this process needs is recorded for the other ranks' eviction."""
        now, later = self.shards_of(needed), self.shards_of(ahead)
        later = [i for i in later if i not in now]
        size = sum(self.shards[i]["bytes"] for i in now)
        if size > self.cap:
            raise WindowTooSmall(
                f"the next samples of this rank are in {len(now)} shards ({size / 1e9:.2f} GB), more than the shard "
                f"window's cap ({self.cap / 1e9:.2f} GB, MAE_ST_SHARD_CACHE_GB): raise the cap to at least the "
                "shuffle buffer's and a few batches' clips per local rank, or lower shuffle_buffer")
        self._record_needs(now, later)
        start = time.perf_counter()
        for i in now:
            self._fetch_async(i, may_evict=True)
        for i in now:
            self._wait_whole(i)
        self.waited += time.perf_counter() - start
        for i in later:
            if not self._fetch_async(i, may_evict=False):
                break  # the cap: the rest when the reader has moved on

    def held_bytes(self) -> int:
        """Bytes of whole shards in the window (all ranks'): its fill."""
        return sum(s["bytes"] for s in self.shards if os.path.exists(self.path(WHOLE + s["tar"])))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path(f"{NEEDS}{os.getpid()}"))

    # --- fetching and eviction -----------------------------------------------------------------------------------

    def _fetch_async(self, i: int, may_evict: bool) -> bool:
        """Start fetching shard i unless it is whole or on its way; False when the cap leaves no room for it (a
        shard a reader waits for makes room by evicting what no rank waits for; one fetched ahead only fits in)."""
        name = self.shards[i]["tar"]
        with self._lock:
            if i in self._pending or os.path.exists(self.path(WHOLE + name)):
                return True
            if not self._make_room(self.shards[i]["bytes"], may_evict):
                return False
            self._pending[i] = future = self._pool.submit(self._fetch, i)
            future.add_done_callback(lambda _, i=i: self._done(i))
        return True

    def _done(self, i: int) -> None:
        with self._lock:
            self._pending.pop(i, None)

    def _wait_whole(self, i: int) -> None:
        name = self.shards[i]["tar"]
        while not os.path.exists(self.path(WHOLE + name)):
            with self._lock:
                future = self._pending.get(i)
            if future is not None:
                future.result()  # its error, if it failed
            else:  # fetched by another rank of the node (or fetched here and evicted since): fetch it here
                self._fetch_async(i, may_evict=True)
                time.sleep(0.005)

    def _fetch(self, i: int) -> None:
        """Shard i into its placeholder, in place, by one process of the node (its lock), checked, then marked."""
        shard = self.shards[i]
        name, path = shard["tar"], self.path(shard["tar"])
        with open(self.path(f".fetch.{name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank fetching it: wait, then find it whole
            if os.path.exists(self.path(WHOLE + name)):
                return
            for delay in (0, *RETRY_DELAYS):
                time.sleep(delay)
                try:
                    digest, got = self._copy(name, path)
                    break
                except Exception as err:  # whatever the store's client raises (boto3's: BotoCoreError, ClientError)
                    failure = err
                    log.warning("shard window: %s: %s; trying again", name, err)
            else:
                raise StoreUnavailable(f"{name}: the store did not send it in {len(RETRY_DELAYS) + 1} tries over "
                                       f"{sum(RETRY_DELAYS)} s: {failure}")
            if got != shard["bytes"] or (shard.get("sha256") and digest.hexdigest() != shard["sha256"]):
                _give_back(path, shard["bytes"])
                raise ValueError(f"{name}: the store sent {got:,} bytes that are not the manifest's shard (size "
                                 f"{shard['bytes']:,}, SHA-256): is the set being published again?")
            open(self.path(WHOLE + name), "w").close()
            with self._lock:
                self.fetched_bytes += got
                self.fetched.append(name)

    def _copy(self, name: str, path: str) -> tuple:
        """One GET of the stored file into its placeholder: (its SHA-256, its bytes)."""
        digest, got = hashlib.sha256(), 0
        response = self.open_file(name)
        if response is None:
            raise FileNotFoundError(f"{name}: the store no longer holds it")
        with response, open(path, "r+b") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
        return digest, got

    def _record_needs(self, now: list, later: list) -> None:
        path = self.path(f"{NEEDS}{os.getpid()}")
        with open(path + ".tmp", "w") as f:
            json.dump({"now": [self.shards[i]["tar"] for i in now], "later": [self.shards[i]["tar"] for i in later]},
                      f)
        os.replace(path + ".tmp", path)

    def _needs_of_live_ranks(self) -> tuple[set, set]:
        """(the shards some live process of the node waits for, those it wants next)."""
        now, later = set(), set()
        for entry in os.scandir(self.folder):
            if entry.name.startswith(NEEDS) and not entry.name.endswith(".tmp"):
                if _alive(int(entry.name[len(NEEDS):])):
                    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError), open(entry.path) as f:
                        needs = json.load(f)
                        now.update(needs["now"])
                        later.update(needs["later"])
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(entry.path)
        return now, later

    def _make_room(self, size: int, may_evict: bool) -> bool:
        """Whether `size` more bytes fit the cap beside the whole shards and those on their way (all the node's);
        may_evict: evict shards no live rank waits for, those no rank wants next first."""
        with self._node_lock():
            held = {s["tar"]: s["bytes"] for s in self.shards if os.path.exists(self.path(WHOLE + s["tar"]))}
            fetching = sum(s["bytes"] for i, s in enumerate(self.shards) if s["tar"] not in held and (
                i in self._pending or _locked(self.path(f".fetch.{s['tar']}.lock"))))
            if sum(held.values()) + fetching + size <= self.cap:
                return True
            if not may_evict:
                return False
            now, later = self._needs_of_live_ranks()
            for name in sorted((n for n in held if n not in now), key=lambda n: n in later):
                os.remove(self.path(WHOLE + name))
                _give_back(self.path(name), held.pop(name))
                if sum(held.values()) + fetching + size <= self.cap:
                    return True
            if not fetching:  # nothing on its way that could free room: the ranks' next samples exceed the cap
                raise WindowTooSmall(
                    f"the next samples of this node's ranks are in shards of {sum(held.values()) / 1e9:.2f} GB and "
                    f"{size / 1e9:.2f} GB more, beyond the shard window's cap ({self.cap / 1e9:.2f} GB, "
                    "MAE_ST_SHARD_CACHE_GB): raise the cap (at least the shuffle buffer's and a few batches' clips "
                    "per local rank), or lower shuffle_buffer")
            return False

    @contextlib.contextmanager
    def _node_lock(self):
        with open(os.path.join(self.folder, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _give_back(path: str, size: int) -> None:
    """The file's blocks back to the disk, its size kept (a reader's mapping of it stays valid)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(size)):
            raise OSError(ctypes.get_errno(), f"{path}: the filesystem cannot punch holes (fallocate): the shard window "
                                              "needs ext4, xfs, btrfs or tmpfs")
    finally:
        os.close(fd)


_LIBC = []


def _libc():
    if not _LIBC:
        _LIBC.append(ctypes.CDLL("libc.so.6", use_errno=True))
    return _LIBC[0]


def _locked(path: str) -> bool:
    """Whether some process holds the lock file at `path` (a fetch in flight)."""
    if not os.path.exists(path):
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
