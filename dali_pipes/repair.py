"""Clips a decoder rejects. In DALI one bad clip fails its whole batch; this finds the bad ones by running the
batch's clips one by one on side pipelines, logs and counts them, replaces each by a good clip of the same batch
and runs the batch again, so the epoch keeps its length and order (all ranks must take the same number of steps).
Host decoders report their bad clips themselves; they are replaced the same way."""

import logging

from dali_pipes.dali_errors import NVDEC_HELP, VideoDecodeError
from dali_pipes.views_pipeline import Lane, ViewsPipeline

log = logging.getLogger("dali_pipes")


class BatchRepair:
    def __init__(self, config, decoders: dict, assemble):
        """decoders: {feed kind: the decoder its views pipeline is built with} (DecoderRoute.kinds)."""
        self.config, self.decoders = config, decoders
        self.skipped = 0  # clips replaced so far
        self._side = Lane({}, assemble)  # side pipelines, one per kind, each built on first need

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"]

    def substitute(self, feed, bad: list, first_batch: bool = False):
        """The batch with its bad clips replaced by good ones of the same batch."""
        for i in bad:
            log.warning("skipping an undecodable video: %s", feed.names[i])
        self.skipped += len(bad)
        good = [i for i in range(len(feed.data)) if i not in bad]
        if not good:
            if first_batch and self.decoders.get("encoded") is not None and self.decoders["encoded"].needs_gpu:
                raise RuntimeError(f"NVDEC decoded none of the first batch's {len(bad)} clips ({feed.names[0]}, "
                                   f"...): it is probably not available in this process. {NVDEC_HELP}")
            raise RuntimeError(f"every clip of a batch is undecodable ({feed.names}): are these shards intact? "
                               "(python tools/preflight.py --data ... checks them)")
        return feed.substitute(bad, good)

    def batch(self, feed, failure: VideoDecodeError, first_batch: bool = False) -> dict:
        """The torch batch of a `feed` whose run failed: its bad clips found and replaced."""
        log.warning("the video decoder failed on a batch (%s); checking its clips one by one", str(failure)[:300])
        bad = []
        for kind, part in feed.parts().items():
            for i in range(part.start, part.stop):
                try:
                    self._pipeline(kind).run(feed, slice(i, i + 1))
                except VideoDecodeError:
                    bad.append(i)
        feed = self.substitute(feed, bad, first_batch)
        return self.run(feed)

    def run(self, feed) -> dict:
        """`feed` through the side lane, assembled (nothing else in flight on it)."""
        for kind in feed.parts():
            self._pipeline(kind)
        self._side.submit(feed)
        return self._side.batch()

    def _pipeline(self, kind: str) -> ViewsPipeline:
        pipelines = self._side.pipelines
        if kind not in pipelines:
            pipelines[kind] = ViewsPipeline(self.config, self.decoders[kind], self.config.threads)
        return pipelines[kind]
