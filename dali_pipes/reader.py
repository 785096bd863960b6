"""One rank's stream of encoded clips from the shards: DALI's webdataset reader on the CPU, with its index files, and
the cursor that says where the stream stands.

`num_shards` = world size and `shard_id` = rank split the samples across ranks, and `pad_last_batch` pads every
rank's part to the same number of batches (repeating its last sample), so each epoch every sample is read exactly
once across ranks and all ranks take the same number of steps. Shuffling uses DALI's seeded buffer, which gives a
fresh order every epoch; the reader's position and shuffle state are captured by DALI checkpointing.
On network filesystems (NFS, Lustre, GPFS) `dont_use_mmap` makes DALI read with plain reads: DALI's documentation
notes that most network filesystems serve memory-mapped files poorly.
"""

import base64
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from dali_pipes.cursor import Cursor
from dali_pipes.shard_format import VIDEO_EXTS
from dali_pipes.shard_set import ShardSet


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
    def __init__(self, shards: ShardSet, config, cursor: Cursor, num_threads: int, with_meta: bool = False):
        """with_meta: also read each clip's KEY.json (its format: where the route decodes clips by format)."""
        self.shards, self.config, self.threads, self.with_meta = shards, config, num_threads, with_meta
        self.batches_per_epoch = shards.batches_per_epoch(config.batch_size, config.world_size)
        self.cursor = cursor
        self.pipe = self._build(cursor)

    def _build(self, cursor: Cursor):
        c, shards = self.config, self.shards
        seed = (c.seed * 7919 + cursor.reader_start) % 2**31

        @pipeline_def(batch_size=c.batch_size, num_threads=self.threads, device_id=None, seed=seed,
                      enable_checkpointing=True, prefetch_queue_depth=2)
        def reader():
            video, info, *meta = fn.readers.webdataset(
                paths=shards.tars, index_paths=shards.indexes,
                ext=[";".join(VIDEO_EXTS), "info", *["json"] * self.with_meta],
                dtypes=[types.UINT8, types.INT32, *[types.UINT8] * self.with_meta], shard_id=c.rank,
                num_shards=c.world_size, pad_last_batch=True, random_shuffle=c.shuffled, initial_fill=c.shuffle_buffer,
                seed=seed, name="reader", dont_use_mmap=c.dont_use_mmap,
            )
            return video, info, fn.get_property(video, key="source_info"), *meta

        pipe = reader(checkpoint=base64.b64decode(cursor.reader_state)) if cursor.reader_state else reader()
        pipe.build()
        return pipe

    def next_batch(self) -> RawBatch:
        c, cursor = self.config, self.cursor
        video, info, names, *meta = self.pipe.run()
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
        return RawBatch(cursor.epoch, cursor.position, [np.array(v) for v in video],  # copies: DALI reuses buffers
                        np.array(info.as_tensor()), [np.array(m) for m in meta[0]] if meta else [b""] * len(video),
                        [np.array(n).tobytes().decode() for n in names], real, after)
