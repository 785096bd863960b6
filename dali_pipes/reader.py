"""One rank's stream of encoded clips from the shards: DALI's webdataset reader on the CPU, with its index files.

`num_shards` = world size and `shard_id` = rank split the samples across ranks, and `pad_last_batch` pads every
rank's part to the same number of batches (repeating its last sample), so each epoch every sample is read exactly
once across ranks and all ranks take the same number of steps. Shuffling uses DALI's seeded buffer, which gives a
fresh order every epoch; the reader's position and shuffle state are captured by DALI checkpointing.
On network filesystems (NFS, Lustre, GPFS) `dont_use_mmap` makes DALI read with plain reads: DALI's documentation
notes that most network filesystems serve memory-mapped files poorly.
"""

import base64
import math

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from dali_pipes.shard_format import VIDEO_EXTS
from dali_pipes.shard_set import ShardSet


class ShardReader:
    def __init__(self, shards: ShardSet, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 shuffle_buffer: int, num_threads: int, checkpoint: str | None = None, dont_use_mmap: bool = False):
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, seed=seed,
                      enable_checkpointing=True, prefetch_queue_depth=2)
        def reader():
            video, info = fn.readers.webdataset(
                paths=shards.tars, index_paths=shards.indexes, ext=[";".join(VIDEO_EXTS), "info"],
                dtypes=[types.UINT8, types.INT32], shard_id=rank, num_shards=world_size, pad_last_batch=True,
                random_shuffle=shuffle, initial_fill=shuffle_buffer, seed=seed, name="reader",
                dont_use_mmap=dont_use_mmap,
            )
            return video, info, fn.get_property(video, key="source_info")

        self.pipe = reader(checkpoint=base64.b64decode(checkpoint)) if checkpoint else reader()
        self.pipe.build()
        self.batches_per_epoch = math.ceil(max(shards.rank_sizes(world_size)) / batch_size)

    def real_samples(self, epoch_in_reader: int) -> int:
        """Samples (not padding) this rank reads in its epoch_in_reader-th epoch: DALI moves each rank on to the
        next rank's part every epoch."""
        return self.shards.rank_sizes(self.world_size)[(self.rank + epoch_in_reader) % self.world_size]

    def next_batch(self):
        """(encoded videos, info int32 [B, 5], sample names 'shard.tar:offset:key.ext', reader checkpoint after it,
        base64 so that it can go in any state dict)."""
        video, info, names = self.pipe.run()
        encoded = [np.array(v) for v in video]  # copies: DALI reuses its buffers
        names = [np.array(n).tobytes().decode() for n in names]
        return encoded, np.array(info.as_tensor()), names, base64.b64encode(self.pipe.checkpoint()).decode()
