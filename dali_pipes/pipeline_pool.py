"""Several views pipelines fed in turn, one batch in flight each.

One DALI decoder pipeline was reported to drive a single NVDEC engine (NVIDIA/DALI#6387) and an H100 has seven;
ViT-B at R=4 needs about two engines' worth of clips at 40% MFU (tools/bench/gpu_projection.py). So on a GPU the loader
keeps several pipelines busy, each holding one batch, and collects them in the order they were fed. On a CPU one
pipeline already uses every core.
"""

from collections import deque

from dali_pipes.views_pipeline import build_views_pipeline

NVDEC_PIPELINES = 4


class PipelinePool:
    def __init__(self, config, decoder):
        count = config.decode_pipelines or (NVDEC_PIPELINES if decoder.needs_gpu else 1)
        threads = max(1, config.threads // count)  # the process's share of cores, split among them
        self.pipes = [build_views_pipeline(config, decoder, threads) for _ in range(count)]
        self._decoded, self._shared = not decoder.decodes_in_dali, config.views.shared_frames
        self._free, self._pending = deque(range(count)), deque()  # pipeline indexes; (index, feed), oldest first

    def __len__(self) -> int:
        """Batches in flight."""
        return len(self._pending)

    def has_room(self) -> bool:
        return bool(self._free)

    def submit(self, feed) -> None:
        """Start decoding and augmenting `feed` on a free pipeline."""
        index = self._free.popleft()
        for name, values in feed.inputs(self._decoded, self._shared).items():
            self.pipes[index].feed_input(name, values)
        self.pipes[index].schedule_run()
        self._pending.append((index, feed))

    def collect(self, convert):
        """(feed, convert(feed, outputs), None) for the oldest batch in flight, or (feed, None, DALI's error) if it
        failed; its pipeline is free again either way."""
        index, feed = self._pending.popleft()
        pipe = self.pipes[index]
        try:
            return feed, convert(feed, pipe.share_outputs()), None
        except RuntimeError as err:  # a clip the decoder cannot read fails the whole batch
            return feed, None, err
        finally:
            pipe.release_outputs()
            self._free.append(index)

    def drain(self) -> None:
        """Collect and drop every batch in flight."""
        while self._pending:
            self.collect(lambda feed, outputs: None)
