"""Views pipelines taking turns, one batch in flight on each lane, batches out in the order they went in: the DALI
stage of the loader, from Feeds to torch batches (a failed batch repaired on the side).

One DALI decoder pipeline was reported to drive a single NVDEC engine (NVIDIA/DALI#6387) and an H100 has seven;
ViT-B at R=4 needs about two engines' worth of clips at 40% MFU (tools/bench/gpu_projection.py). So on a GPU the
loader keeps several lanes busy; on a CPU one pipeline already uses every core. A lane holds a pipeline per kind of
clip its batches hold: encoded (a DALI decoder inside) and, where the route sends some formats to a host decoder,
decoded (frames in).
"""

from collections import deque

from dali_pipes.batch_assembler import BatchAssembler
from dali_pipes.dali_errors import VideoDecodeError
from dali_pipes.decoders import DecoderRoute
from dali_pipes.repair import BatchRepair
from dali_pipes.views_pipeline import Lane, ViewsPipeline

NVDEC_PIPELINES = 4


class PipelinePool:
    def __init__(self, config, route: DecoderRoute):
        decoders = route.kinds
        count = config.decode_pipelines or (NVDEC_PIPELINES if route.main.needs_gpu else 1)
        threads = max(1, config.threads // count)  # the process's share of cores, split among them
        assemble = BatchAssembler(config)
        lanes = [Lane({kind: ViewsPipeline(config, decoder, threads) for kind, decoder in decoders.items()}, assemble)
                 for _ in range(count)]
        self.repair = BatchRepair(config, decoders, assemble)
        self._free, self._pending = deque(lanes), deque()  # lanes free; lanes with a batch in flight, oldest first
        self._decoded_any = False

    def batches(self, feeds):
        """(feed, torch batch) for the Feeds of `feeds`, in order, with a batch in flight on every lane: the next
        ones decode while the caller trains on this one."""
        feeds = iter(feeds)
        self._fill(feeds)
        while self._pending:
            done = self._collect()
            self._fill(feeds)
            yield done

    def _fill(self, feeds) -> None:
        while self._free:
            feed = next(feeds, None)
            if feed is None:
                return
            self._submit(feed)

    def _submit(self, feed) -> None:
        bad = feed.failed_on_host()
        if bad:
            feed = self.repair.substitute(feed, bad, first_batch=not self._decoded_any)
        lane = self._free.popleft()
        lane.submit(feed)
        self._pending.append(lane)

    def _collect(self):
        lane = self._pending.popleft()
        feed = lane.feed
        try:
            batch = lane.batch()
        except VideoDecodeError as failure:  # a clip the decoder cannot read fails its whole batch
            batch = self.repair.batch(feed, failure, first_batch=not self._decoded_any)
        finally:
            self._free.append(lane)
        self._decoded_any = True
        return feed, batch

    def drain(self) -> None:
        """Drop every batch in flight (their outputs taken back)."""
        while self._pending:
            lane = self._pending.popleft()
            lane.discard()
            self._free.append(lane)
