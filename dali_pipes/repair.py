"""Clips a decoder rejects. In DALI one bad clip fails its whole batch; this finds the bad ones by decoding the
batch's clips one by one on a side pipeline, logs and counts them, replaces each by a good clip of the same batch
and decodes the batch again, so the epoch keeps its length and order (all ranks must take the same number of
steps). Host decoders report their bad clips themselves; they are replaced the same way."""

import logging

from dali_pipes.dali_errors import NVDEC_HELP, first_meaningful_line, nvdec_missing
from dali_pipes.views_pipeline import build_views_pipeline, run_batch

log = logging.getLogger("dali_pipes")


class BatchRepair:
    def __init__(self, config, decoder, assemble):
        self.config, self.decoder, self.assemble = config, decoder, assemble
        self.skipped = 0  # clips replaced so far
        self.any_batch_decoded = False  # the loader says when one came through
        self._side = None  # the side pipeline, built on first need

    def substitute(self, feed, bad: list):
        """The batch with its bad clips replaced by good ones of the same batch."""
        for i in bad:
            log.warning("skipping an undecodable video: %s", feed.names[i])
        self.skipped += len(bad)
        good = [i for i in range(len(feed.data)) if i not in bad]
        if not good:
            if self.decoder.needs_gpu and not self.any_batch_decoded:
                raise RuntimeError(f"NVDEC decoded none of the first batch's {len(bad)} clips ({feed.names[0]}, "
                                   f"...): it is probably not available in this process. {NVDEC_HELP}")
            raise RuntimeError(f"every clip of a batch is undecodable ({feed.names}): are these shards intact? "
                               "(python tools/preflight.py --data ... checks them)")
        return feed.substitute(bad, good)

    def repair(self, feed, err: Exception) -> dict:
        """The batch of a failed `feed`, its bad clips found and replaced."""
        if nvdec_missing(err):
            raise RuntimeError(f"{first_meaningful_line(err)}. {NVDEC_HELP}") from None
        log.warning("the video decoder failed on a batch (%s); checking its clips one by one",
                    first_meaningful_line(err)[:300])
        if self._side is None:
            self._side = build_views_pipeline(self.config, self.decoder, self.config.threads)
        bad = []
        for i in range(len(feed.data)):
            try:
                self._run_side(feed, [i])
            except RuntimeError:
                bad.append(i)
        feed = self.substitute(feed, bad)
        return self._run_side(feed, collect=lambda views: self.assemble(feed, views))

    def _run_side(self, feed, indices=None, collect=lambda views: None):
        inputs = feed.inputs(not self.decoder.decodes_in_dali, self.config.views.shared_frames, indices)
        return run_batch(self._side, inputs, collect)
