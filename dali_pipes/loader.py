"""The torch-facing video loader, a composition of units with one job each:

    shard reader (reader.py) -> plans (sampling.py) -> [host decoder] -> a queue of Feeds   the reading thread
    (feeder.py), prefetch batches ahead
    -> views pipelines taking turns (pipeline_pool.py, views_pipeline.py; the decoder inside when it is DALI's)
    -> the torch batch (batch_assembler.py); a batch a bad clip failed is repaired (repair.py)

Two DALI stages with a thread between them, for three reasons: the reading thread alone touches DALI's reader, so
the order of batches, and with it exact resume, does not depend on timing; several views pipelines can run at
once (one per NVDEC engine); and the next batch decodes while training computes on this one. What differs between
training and testing is data: the LoaderConfig's views (sampling.TrainViews / EvalViews).
"""

import logging
import math

from dali_pipes.batch_assembler import BatchAssembler
from dali_pipes.config import LoaderConfig
from dali_pipes.decoders import choose_decoder, gpu_available
from dali_pipes.feeder import Feeder
from dali_pipes.pipeline_pool import PipelinePool
from dali_pipes.repair import BatchRepair
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
        has_gpu = config.device.type == "cuda" and gpu_available()
        self.decoder, why = choose_decoder(config.decoder, self.shards.codecs, has_gpu)
        log.info("video decoder: %s (%s)", self.decoder.name, why)
        if config.shuffled:
            clip_mb = self.shards.num_bytes / max(1, self.shards.num_samples) / 1e6
            log.info("shuffle buffer: %d clips x %.2f MB = %.2f GB of host memory in this process (shuffle_buffer)",
                     config.shuffle_buffer, clip_mb, config.shuffle_buffer * clip_mb / 1e3)
        self.assemble = BatchAssembler(config)
        self.pool = PipelinePool(config, self.decoder)
        self.repair = BatchRepair(config, self.decoder, self.assemble)
        self.epoch, self.position = 0, 0  # of the next batch to yield
        self._reader_state, self._reader_epochs, self._reader_start = None, 0, 0  # what resumes the reader
        self._feeder, self._epoch_fed = None, False  # the reading thread; its end-of-epoch mark taken
        self._batches_per_epoch = math.ceil(max(self.shards.rank_sizes(config.world_size)) / config.batch_size)

    # --- public API ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._batches_per_epoch

    @property
    def skipped(self) -> int:
        """Undecodable clips replaced so far."""
        return self.repair.skipped

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (from its first batch) with its own fresh order; a no-op for the epoch already under way."""
        if epoch != self.epoch:
            self._stop_feeder()
            self.epoch, self.position, self._reader_state = epoch, 0, None

    def close(self) -> None:
        """Stop the reading thread (it also stops with the process)."""
        self._stop_feeder()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "reader": self._reader_state,
                "reader_start": self._reader_start, "reader_epochs": self._reader_epochs, "skipped": self.skipped,
                "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken: same epoch, next batch, same order. On another rank layout (world size,
        batch size) the epoch restarts from its first batch with a fresh order instead."""
        self._stop_feeder()
        self.epoch, self.repair.skipped = state["epoch"], state["skipped"]
        if state["layout"] == self._layout() and state["reader"] is not None:
            self.position, self._reader_state = state["position"], state["reader"]
            self._reader_start, self._reader_epochs = state["reader_start"], state["reader_epochs"]
        else:
            log.warning("loader state was saved with %s, now %s: restarting epoch %d from its first batch",
                        state["layout"], self._layout(), self.epoch)
            self.position, self._reader_state = 0, None

    def __iter__(self):
        """The rest of the current epoch (all of it after set_epoch or at the start)."""
        self._start_feeder()
        if not len(self.pool):  # (batches left in flight by a loop left early belong to an epoch already fed)
            self._epoch_fed = False
        while self.pool.has_room() and self._submit_next():  # those left in flight come first
            pass
        while len(self.pool):
            feed, batch, err = self.pool.collect(self.assemble)
            if err is not None:
                batch = self.repair.repair(feed, err)
            self.repair.any_batch_decoded = True
            self._submit_next()  # the next batch decodes while the caller trains on this one
            self.position += 1
            self._reader_state = feed.reader_state
            if self.position == len(self):
                self.epoch, self.position, self._reader_epochs = self.epoch + 1, 0, self._reader_epochs + 1
            yield batch

    # --- the reading thread ----------------------------------------------------------------------------------------

    def _submit_next(self) -> bool:
        """Hand this epoch's next batch to a free pipeline; False once the epoch has no more."""
        if self._epoch_fed:
            return False
        feed = self._feeder.next()
        if feed is None:
            self._epoch_fed = True
            return False
        bad = [i for i, data in enumerate(feed.data) if isinstance(data, Exception)]  # a host decoder's refusals
        self.pool.submit(self.repair.substitute(feed, bad) if bad else feed)
        return True

    def _layout(self) -> dict:
        c = self.config
        return {"world_size": c.world_size, "rank": c.rank, "batch_size": c.batch_size, "seed": c.seed}

    def _start_feeder(self) -> None:
        if self._feeder is not None:
            return
        if self._reader_state is None:  # a fresh reader: epoch self.epoch gets an order of its own
            self._reader_start, self._reader_epochs = self.epoch, 0
        seed = (self.config.seed * 7919 + self._reader_start) % 2**31
        self._feeder = Feeder(self.config, self.shards, self.decoder, self.epoch, self.position, self._reader_epochs,
                              seed, self._reader_state)

    def _stop_feeder(self) -> None:
        self.pool.drain()  # batches already in flight: collected and dropped
        if self._feeder is not None:
            self._feeder.stop()
            self._feeder = None


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
                      num_frames: int = 16, stride: int = 4, crop_size: int = 224, target_fps=None,
                      split: str = "val", **options) -> VideoLoader:
    """Multi-view testing: num_clips temporal clips spread over each video x num_crops square crops along its long
    side (the short side resized to crop_size); deterministic; every video exactly once."""
    spec = ViewSpec(num_frames=num_frames, stride=stride, target_fps=target_fps, repeats=1, crop_size=crop_size,
                    flip=False)
    return VideoLoader(LoaderConfig(shards_dir, EvalViews(spec, num_clips, num_crops), split=split,
                                    batch_size=batch_size, **options))
