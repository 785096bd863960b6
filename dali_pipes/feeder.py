"""The loader's reading thread: encoded clips from the shard reader -> each clip's plan (frames, crops, flips) -> the
frames of the clips a host decoder reads -> a queue of Feeds, `prefetch` batches ahead of training.

Plans are drawn from (seed, rank, epoch, batch) alone, so a resumed run, a rebuilt pipeline or a repaired batch
sees exactly the same augmentation. The thread is the only user of DALI's reader pipeline, and batches leave it in
order, which keeps the order of batches, and so resume, deterministic. It reads on across epoch ends.
"""

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dali_pipes.cursor import Cursor
from dali_pipes.decoders import DecoderRoute, UndecodableVideo
from dali_pipes.feed import Feed
from dali_pipes.reader import RawBatch, ShardReader
from dali_pipes.shard_format import sample_format, unpack_info
from dali_pipes.shard_set import ShardSet


class Feeder:
    """The Feeds of one rank from `cursor` on, read and planned in a thread of their own."""

    def __init__(self, config, shards: ShardSet, route: DecoderRoute, cursor: Cursor):
        self.config, self.route = config, route
        # reading is memory copies: a quarter of the threads (measured on 2 cores: 1 reading thread beside 2
        # decoding ones gave 125 clips/s against 113 with 2 + 2)
        self._reader = ShardReader(shards, config, cursor, max(1, config.threads // 4), with_meta=route.per_clip)
        self._host = ThreadPoolExecutor(config.threads) if "decoded" in route.kinds else None
        self._queue = queue.Queue(maxsize=config.prefetch + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="video-reader")
        self._thread.start()

    def __next__(self) -> Feed:
        """The next batch; an error of the thread is raised here."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self):
        return self

    def stop(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        if self._host:
            self._host.shutdown(wait=False)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._put(self._feed(self._reader.next_batch()))
        except BaseException as err:  # surfaces in the training loop instead of dying silently
            self._put(err)

    def _feed(self, raw: RawBatch) -> Feed:
        c = self.config
        rng = np.random.default_rng([c.seed, c.rank, raw.epoch, raw.position])
        plans = [c.views.plan(unpack_info(row.tobytes()), rng) for row in raw.info]
        hosts = [self.route.host_decoder_for(sample_format(m) if self.route.per_clip else None) for m in raw.meta]
        data = list(raw.encoded)
        jobs = {i: self._host.submit(_host_decode, host, data[i], plans[i].frames)
                for i, host in enumerate(hosts) if host is not None}
        for i, job in jobs.items():
            data[i] = job.result()
        first = raw.position * c.batch_size
        indices = np.where(np.arange(len(data)) < raw.real, first + np.arange(len(data)), -1)
        return Feed(raw.epoch, raw.position, data, np.array([h is not None for h in hosts]), plans,
                    raw.info[:, 0].astype(np.int64), raw.names, indices, raw.cursor)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass


def _host_decode(decoder, encoded, frames):
    """Frames, or the UndecodableVideo itself (the pool replaces that clip)."""
    try:
        return decoder.frames(encoded, frames)
    except UndecodableVideo as err:
        return err
