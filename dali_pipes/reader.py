"""One rank's stream of encoded clips from the shards: DALI's webdataset reader on the CPU, with its index files, and
the cursor that says where the stream stands.

`num_shards` = world size and `shard_id` = rank split the samples across ranks, and `pad_last_batch` pads every
rank's part to the same number of batches (repeating its last sample), so each epoch every sample is read exactly
once across ranks and all ranks take the same number of steps. Shuffling uses DALI's seeded buffer, which gives a
fresh order every epoch; the reader's position and shuffle state are captured by DALI checkpointing.
On network filesystems (NFS, Lustre, GPFS) `dont_use_mmap` makes DALI read with plain reads: DALI's documentation
notes that most network filesystems serve memory-mapped files poorly.
A set in an object store (s3://) is read by DALI over the network: when the store stops answering, the batch is read
again from the cursor (a reader rebuilt from its checkpoint, so the stream goes on identically) after each of
`retry_delays`, and then StoreUnavailable names the store and the last sample read. A set larger than the node cache
is read from its shard window (dali_pipes/shard_window.py): before each batch the window holds every sample the
reader may read next (DALI reads sequentially through the rank's part: its shuffle buffer first, then a sample per
sample it hands out, a few batches ahead), and fetches those after them in the background. DALI reads its files
with plain reads there, not memory maps: a sample in its shuffle buffer is then a copy, and the window can give the
shard's blocks back once the reader has read past it.
"""

import base64
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from dali_pipes.cursor import Cursor
from dali_pipes.shard_format import VIDEO_EXTS
from dali_pipes.shard_set import ShardSet
from dali_pipes.shard_store import StoreUnavailable

log = logging.getLogger("dali_pipes")
REPLAY = 6  # batches after a restore during which DALI's prefetching may still read the part's start again


@dataclass
class RawBatch:
    epoch: int
    position: int
    encoded: list  # per sample: uint8 bytes of the video
    info: np.ndarray  # int32 [B, 6]: shard_format.INFO_FIELDS
    meta: list  # per sample: the bytes of KEY.json (empty when the shard has none, or when not asked for)
    names: list  # per sample: 'shard.tar:offset:key.ext'
    real: int  # samples that are not the epoch's padding: the first `real` ones
    cursor: Cursor  # where the stream stands after this batch


class ShardReader:
    retry_delays = (1, 2, 4, 8, 16)  # seconds before each new try at a batch the store did not serve (31 s in all)

    def __init__(self, shards: ShardSet, config, cursor: Cursor, num_threads: int, with_meta: bool = False):
        """with_meta: also read each clip's KEY.json (its format: where the route decodes clips by format)."""
        self.shards, self.config, self.threads, self.with_meta = shards, config, num_threads, with_meta
        self.batches_per_epoch = shards.batches_per_epoch(config.batch_size, config.world_size)
        self.cursor = self._resumable(cursor)
        self.last_read = "none yet"  # the last sample read, for a store that stops answering
        self.pipe = self._build(self.cursor)

    def _resumable(self, cursor: Cursor) -> Cursor:
        """The cursor to start from. DALI restores a shuffling reader from its checkpoint by reading its part again
        from the start up to where it stood: through a shard window that prefix must fit the window, else the epoch
        goes on from the cursor's batch with a fresh reader (a fresh order, as after a resume on another number of
        processes), said in the log."""
        window = self.shards.window
        if window is None or not cursor.reader_state:
            return cursor
        # the most it reads again: at the last batch its prefetching may take from the part's start
        self.cursor, self._replay_until = dataclasses.replace(cursor, position=cursor.position + REPLAY), math.inf
        needed = window.shards_of(self.samples_next()[0])
        if sum(window.shards[i]["bytes"] for i in needed) <= window.cap:
            return cursor
        log.warning("%s: resuming batch %d of epoch %d through the shard window in a fresh order: DALI would read "
                    "this rank's part again up to there (%d shards), more than the window holds; the same losses "
                    "as a run never stopped need MAE_ST_SHARD_CACHE_GB to hold it", self.shards.location,
                    cursor.position, cursor.epoch, len(needed))
        return Cursor.fresh(cursor.epoch, cursor.position)

    def _build(self, cursor: Cursor):
        c, shards = self.config, self.shards
        # a reader restored from its checkpoint reads its part again from the start when it is built and in DALI's
        # prefetching: that prefix is in the window before, and stays for the batches that may take
        self._replay_until = cursor.position + REPLAY if cursor.reader_state else -1
        if self.shards.window is not None and cursor.reader_state:
            self.cursor = cursor
            self.shards.window.ensure(*self.samples_next())
        seed = (c.seed * 7919 + cursor.reader_start) % 2**31

        @pipeline_def(batch_size=c.batch_size, num_threads=self.threads, device_id=None, seed=seed,
                      enable_checkpointing=True, prefetch_queue_depth=2)
        def reader():
            video, info, *meta = fn.readers.webdataset(
                paths=shards.tars, index_paths=shards.indexes,
                ext=[";".join(VIDEO_EXTS), "info", *["json"] * self.with_meta],
                dtypes=[types.UINT8, types.INT32, *[types.UINT8] * self.with_meta], shard_id=c.rank,
                num_shards=c.world_size, pad_last_batch=True, random_shuffle=c.shuffled,
                initial_fill=shards.shuffle_fill(c.shuffle_buffer, c.world_size), seed=seed, name="reader",
                dont_use_mmap=c.dont_use_mmap or shards.window is not None,  # (a window's samples: copied, not mapped)
            )
            return video, info, fn.get_property(video, key="source_info"), *meta

        pipe = reader(checkpoint=base64.b64decode(cursor.reader_state)) if cursor.reader_state else reader()
        pipe.build()
        return pipe

    def next_batch(self) -> RawBatch:
        c, cursor = self.config, self.cursor
        video, info, names, *meta = self._run()
        read = cursor.position - cursor.reader_offset  # batches this reader read before this one, this epoch
        part = self.shards.rank_sizes(c.world_size)[(c.rank + cursor.reader_epochs) % c.world_size]
        real = min(c.batch_size, max(0, part - read * c.batch_size))
        if cursor.position + 1 < self.batches_per_epoch:
            after = Cursor(cursor.epoch, cursor.position + 1, cursor.reader_start,
                           base64.b64encode(self.pipe.checkpoint()).decode(), cursor.reader_offset)
        elif cursor.reader_offset:  # a reader that began mid-epoch is mid-way through its own: a fresh one follows
            after = Cursor.fresh(cursor.epoch + 1)
            self.pipe = self._build(after)
        else:
            after = Cursor(cursor.epoch + 1, 0, cursor.reader_start, base64.b64encode(self.pipe.checkpoint()).decode())
        self.cursor = after
        names = [np.array(n).tobytes().decode() for n in names]
        self.last_read = names[-1]
        return RawBatch(cursor.epoch, cursor.position, [np.array(v) for v in video],  # copies: DALI reuses buffers
                        np.array(info.as_tensor()), [np.array(m) for m in meta[0]] if meta else [b""] * len(video),
                        names, real, after)

    def _run(self):
        """The next batch from DALI; from a streamed store, tried again from the cursor while the store does not
        answer (DALI's AWS SDK has already retried each request 3 times: its default retry strategy)."""
        if self.shards.window is not None:
            self.shards.window.ensure(*self.samples_next())
        if not self.shards.streamed:
            return self.pipe.run()
        failure = None
        for delay in (0, *self.retry_delays):
            time.sleep(delay)
            try:
                if failure is not None:
                    self.pipe = self._build(self.cursor)  # the failed pipeline is no longer valid (DALI says so)
                return self.pipe.run()
            except RuntimeError as err:
                failure = err
                log.warning("%s did not serve batch %d of epoch %d (%s): trying again from the cursor",
                            self.shards.location, self.cursor.position, self.cursor.epoch, _last_line(err))
        raise StoreUnavailable(
            f"{self.shards.location} stopped answering: batch {self.cursor.position} of epoch {self.cursor.epoch} "
            f"failed {len(self.retry_delays) + 1} times over {sum(self.retry_delays)} s; the last sample read: "
            f"{self.last_read}; DALI said: {_last_line(failure)}") from failure


    def samples_next(self, ahead_batches: int = 4) -> tuple[list, list]:
        """([sample ranges] the reader may read before it hands out its next batch and `ahead_batches` more (DALI's
        prefetching: the pipeline runs prefetch_queue_depth = 2 iterations ahead, its reader loads one batch ahead
        of those), [the ranges after them, to fetch ahead]), in the split's sample numbers. DALI reads its part (rank + reader epochs) % world of the split in order: the shuffle
        buffer's fill, then one sample per sample it hands out."""
        c, cursor, shards = self.config, self.cursor, self.shards
        sizes = shards.rank_sizes(c.world_size)
        fill = shards.shuffle_fill(c.shuffle_buffer, c.world_size) if c.shuffled else 0
        read = cursor.position - cursor.reader_offset  # batches this reader handed out this epoch

        def part(epochs_on: int, low: int, high: int) -> tuple:
            p = (c.rank + cursor.reader_epochs + epochs_on) % c.world_size
            start = sum(sizes[:p])
            return start + min(sizes[p], max(0, low)), start + min(sizes[p], max(0, high))

        edge = fill + (read + ahead_batches) * c.batch_size
        read_already = 0 if read == 0 else fill + (read - 2) * c.batch_size  # (read, whatever DALI prefetched)
        if cursor.position < self._replay_until:  # (restored: _build)
            read_already = 0
        needed = [part(0, read_already, edge)]
        ahead = [part(0, edge, edge + 4 * ahead_batches * c.batch_size)]
        if read + ahead_batches >= self.batches_per_epoch:  # the next epoch's part, from its start
            needed.append(part(1, 0, fill + ahead_batches * c.batch_size))
        return needed, ahead


def _last_line(err: Exception) -> str:
    """The line of a DALI error that says what happened (its message ends with the pipeline's own notes)."""
    lines = [line.strip(" :") for line in str(err).splitlines()
             if line.strip(" :") and "pipeline" not in line and not line.startswith(" ")]
    return lines[-1] if lines else type(err).__name__
