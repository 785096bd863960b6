"""The torch-facing video loader, a composition of units with one job each, which a clip passes through in order:

    shard reader (reader.py: DALI's webdataset reader, and the cursor) -> the reading thread (feeder.py: plans from
    sampling.py, frames from a host decoder for the clips the route gives one) -> views pipelines taking turns
    (pipeline_pool.py, views_pipeline.py: decode in DALI, make the views) -> the torch batch (batch_assembler.py);
    a batch a bad clip failed is repaired (repair.py)

Two DALI stages with a thread between them, for three reasons: the reading thread alone touches DALI's reader, so
the order of batches, and with it exact resume, does not depend on timing; several views pipelines can run at
once (one per NVDEC engine); and the next batch decodes while training computes on this one. What differs between
training and testing is data: the LoaderConfig's views (sampling.TrainViews / EvalViews).
"""

import dataclasses
import logging

from dali_pipes.config import LoaderConfig
from dali_pipes.cursor import Cursor
from dali_pipes.decoders import choose_route, gpu_capability
from dali_pipes.feeder import Feeder
from dali_pipes.pipeline_pool import PipelinePool
from dali_pipes.sampling import EvalViews, TrainViews, ViewSpec
from dali_pipes.shard_set import open_shard_set

log = logging.getLogger("dali_pipes")


class VideoLoader:
    """Iterate for one epoch of `len(loader)` batches of {'video': [B*V, 3, T, S, S], 'label': [B*V]} (and
    'video_index' with clip-major views), V views per clip. `state_dict` / `load_state_dict` resume exactly."""

    def __init__(self, config: LoaderConfig):
        self.config = config
        self.shards = open_shard_set(config.shards, config.split, config.skip_damaged_shards)
        smallest = min(self.shards.rank_sizes(config.world_size))
        if config.batch_size > smallest:
            raise ValueError(f"batch_size {config.batch_size} is larger than the {smallest} samples each of "
                             f"{config.world_size} rank(s) gets from the {self.shards.num_samples} in "
                             f"{config.shards} ({config.split})")
        self.route = choose_route(config.decoder, self.shards.formats, gpu_capability(config.device))
        log.info("video decoder: %s (%s)", self.route.name, self.route.why)
        if config.shuffled:
            clip_mb = self.shards.num_bytes / max(1, self.shards.num_samples) / 1e6
            log.info("shuffle buffer: %d clips x %.2f MB = %.2f GB of host memory in this process (shuffle_buffer)",
                     config.shuffle_buffer, clip_mb, config.shuffle_buffer * clip_mb / 1e3)
        self.pool = PipelinePool(config, self.route)
        self.cursor = Cursor()  # after the last batch handed out: where iterating goes on
        self._feeder = self._batches = None  # the reading thread, and the pool's stream of batches from it

    def __len__(self) -> int:
        return self.shards.batches_per_epoch(self.config.batch_size, self.config.world_size)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.cursor.epoch

    @property
    def skipped(self) -> int:
        """Undecodable clips replaced so far."""
        return self.pool.repair.skipped

    def __iter__(self):
        """The rest of the current epoch (all of it at the start, or after its last batch)."""
        if self._batches is None:
            self._feeder = Feeder(self.config, self.shards, self.route, self.cursor)
            self._batches = self.pool.batches(self._feeder)
        for feed, batch in self._batches:
            self.cursor = feed.cursor
            yield batch
            if feed.cursor.position == 0:  # that was the epoch's last batch
                return

    def state_dict(self) -> dict:
        return {"cursor": self.cursor.as_dict(), "repair": self.pool.repair.state_dict(), "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken: the next batch, same order. Saved with another layout of ranks (world
        size, batch size), the epoch goes on from the batch that the clips read so far reach, in a fresh order."""
        self.close()
        self.pool.repair.load_state_dict(state["repair"])
        cursor, layout = Cursor.from_dict(state["cursor"]), state["layout"]
        if layout == self._layout():
            self.cursor = cursor
            return
        read = cursor.position * layout["batch_size"] * layout["world_size"]  # clips read this epoch, all ranks
        clips_per_batch = self.config.batch_size * self.config.world_size
        position = read // clips_per_batch
        epoch = cursor.epoch + position // len(self)
        self.cursor = Cursor.fresh(epoch, position % len(self))
        log.warning("loader state saved by %d rank(s) x %d clips per batch, now %d x %d: epoch %d goes on at batch "
                    "%d of %d (%d clips read of it%s), in a fresh order for the rest of it", layout["world_size"],
                    layout["batch_size"], self.config.world_size, self.config.batch_size, cursor.epoch,
                    self.cursor.position, len(self), read,
                    "" if read % clips_per_batch == 0 else f"; {read % clips_per_batch} more are read again")

    def close(self) -> None:
        """Stop the reading thread and drop the batches in flight (both also stop with the process)."""
        if self._feeder is not None:
            self._feeder.stop()
            self.pool.drain()
        self._feeder = self._batches = None

    def _layout(self) -> dict:
        c = self.config
        return {"world_size": c.world_size, "rank": c.rank, "batch_size": c.batch_size, "seed": c.seed}


def _view_fields(options: dict) -> dict:
    """The ViewSpec fields among `options`, taken out of it (the rest are LoaderConfig's)."""
    names = {f.name for f in dataclasses.fields(ViewSpec)}
    return {k: options.pop(k) for k in list(options) if k in names}


def build_pretrain_loader(shards_dir: str, **options) -> VideoLoader:
    """Training views (TrainViews: R views per decoded clip, each its own random resized crop and flip) from any
    ViewSpec field (num_frames, stride, repeats, crop_size, scale, ...) and any LoaderConfig field (batch_size,
    rand_augment, ...); what is not given is their default (the paper's pretraining views)."""
    spec = ViewSpec(**_view_fields(options))
    return VideoLoader(LoaderConfig(shards_dir, TrainViews(spec), **options))


def build_eval_loader(shards_dir: str, clips: int | None = None, crops: int | None = None, split: str = "val",
                      **options) -> VideoLoader:
    """Multi-view testing (EvalViews): clips temporal clips spread over each video x crops square crops along its
    long side (the short side resized to the crop size); deterministic; every video exactly once. ViewSpec and
    LoaderConfig fields as in build_pretrain_loader; a view is one clip, unflipped."""
    spec = ViewSpec(**{"repeats": 1, "flip": False, **_view_fields(options)})
    counts = {name: n for name, n in (("clips", clips), ("crops", crops)) if n is not None}
    return VideoLoader(LoaderConfig(shards_dir, EvalViews(spec, **counts), split=split, **options))
