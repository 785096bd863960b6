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
        return {"cursor": self.cursor.as_dict(), "skipped": self.skipped, "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken: the next batch, same order. Saved with another layout of ranks (world
        size, batch size), the epoch goes on from the batch that the clips read so far reach, in a fresh order."""
        self.close()
        self.pool.repair.skipped = state["skipped"]
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


def build_pretrain_loader(shards_dir: str, batch_size: int = 8, repeats: int = 4, num_frames: int = 16,
                          stride: int = 4, crop_size: int = 224, **options) -> VideoLoader:
    """MAE-ST pretraining: R views per decoded clip, random resized crop (scale 0.5-1, aspect 3/4-4/3), flip.
    options: target_fps, per_view_start, scale, ratio, flip (ViewSpec) and any LoaderConfig field."""
    spec_fields = {k: options.pop(k) for k in ("target_fps", "per_view_start", "scale", "ratio", "flip")
                   if k in options}
    spec = ViewSpec(num_frames=num_frames, stride=stride, repeats=repeats, crop_size=crop_size, **spec_fields)
    return VideoLoader(LoaderConfig(shards_dir, TrainViews(spec), batch_size=batch_size, **options))


def build_finetune_loader(shards_dir: str, batch_size: int = 8, repeats: int = 2, rand_augment=(2, 7),
                          scale=(0.08, 1.0), **options) -> VideoLoader:
    """Fine-tuning: random resized crop scale 0.08-1, flip, RandAugment (DALI's, on the GPU, the same op for every
    frame of a view), repeated augmentation 2. Mixup, cutmix and random erasing act on whole batches and run in
    torch on the device after the loader (trainer/)."""
    return build_pretrain_loader(shards_dir, batch_size=batch_size, repeats=repeats, scale=scale,
                                 rand_augment=rand_augment, **options)


def build_eval_loader(shards_dir: str, batch_size: int = 1, num_clips: int = 7, num_crops: int = 3,
                      num_frames: int = 16, stride: int = 4, crop_size: int = 224, target_fps=30.0,
                      split: str = "val", **options) -> VideoLoader:
    """Multi-view testing: num_clips temporal clips spread over each video x num_crops square crops along its long
    side (the short side resized to crop_size); deterministic; every video exactly once."""
    spec = ViewSpec(num_frames=num_frames, stride=stride, target_fps=target_fps, repeats=1, crop_size=crop_size,
                    flip=False)
    return VideoLoader(LoaderConfig(shards_dir, EvalViews(spec, num_clips, num_crops), split=split,
                                    batch_size=batch_size, **options))
