"""The loader's reading thread: encoded clips from the shard reader -> each clip's plan (frames, crops, flips) ->
decoded frames when the decoder works on the host -> a queue of Feeds, `prefetch` batches ahead of training.

Plans are drawn from (seed, rank, epoch, batch) alone, so a resumed run, a rebuilt pipeline or a repaired batch
sees exactly the same augmentation. The thread is the only user of DALI's reader pipeline; the main thread takes
the Feeds and runs the views pipelines, which keeps the order of batches, and so resume, deterministic.
"""

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dali_pipes.decoders import UndecodableVideo
from dali_pipes.feed import Feed
from dali_pipes.reader import ShardReader
from dali_pipes.shard_format import unpack_info

EPOCH_END = object()


class Feeder:
    """Feeds of one rank from (epoch, position) on; `reader_epochs` epochs have passed since `checkpoint` began."""

    def __init__(self, config, shards, decoder, epoch: int, position: int, reader_epochs: int, reader_seed: int,
                 checkpoint: str | None):
        self.config, self.decoder = config, decoder
        # reading is memory copies: a quarter of the threads (measured on 2 cores: 1 reading thread beside 2
        # decoding ones gave 125 clips/s against 113 with 2 + 2)
        reader = ShardReader(shards, config.batch_size, config.rank, config.world_size, reader_seed, config.shuffled,
                             config.shuffle_buffer, max(1, config.threads // 4), checkpoint=checkpoint,
                             dont_use_mmap=config.dont_use_mmap)
        self._queue = queue.Queue(maxsize=config.prefetch + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(reader, epoch, position, reader_epochs), daemon=True,
                                        name="video-reader")
        self._thread.start()

    def next(self) -> Feed | None:
        """The next batch, or None at the end of an epoch; an error of the thread is raised here."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is EPOCH_END else item

    def stop(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def _run(self, reader: ShardReader, epoch: int, position: int, reader_epochs: int) -> None:
        host = None if self.decoder.decodes_in_dali else ThreadPoolExecutor(self.config.threads)
        try:
            while not self._stop.is_set():
                encoded, info, names, state = reader.next_batch()
                real = reader.real_samples(reader_epochs) - position * self.config.batch_size
                feed = self._plan(epoch, position, encoded, info, names, min(self.config.batch_size, max(0, real)),
                                  state)
                if host:
                    feed.data = list(host.map(self._host_decode, feed.data, [p.frames for p in feed.plans]))
                self._put(feed)
                position += 1
                if position == reader.batches_per_epoch:
                    self._put(EPOCH_END)
                    epoch, position, reader_epochs = epoch + 1, 0, reader_epochs + 1
        except BaseException as err:  # surfaces in the training loop instead of dying silently
            self._put(err)
        finally:
            if host:
                host.shutdown(wait=False)

    def _plan(self, epoch, position, encoded, info, names, real, state) -> Feed:
        rng = np.random.default_rng([self.config.seed, self.config.rank, epoch, position])
        plans = [self.config.views.plan(unpack_info(row.tobytes()), rng) for row in info]
        return Feed(epoch, position, encoded, plans, info[:, 0].astype(np.int64), names, real, state)

    def _host_decode(self, encoded, frames):
        """Frames, or the UndecodableVideo itself (the main thread replaces that clip)."""
        try:
            return self.decoder.frames(encoded, frames)
        except UndecodableVideo as err:
            return err

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass
