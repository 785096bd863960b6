"""The torch-facing video loader, a composition of units with one job each, which a clip passes through in order,
each file once:

    shard reader (reader.py: DALI's webdataset reader, and the cursor) -> the reading thread (feeder.py: plans from
    sampling.py, frames from a host decoder for the clips the route gives one; a queue of Feeds) -> the mixture's
    schedule (mixture.py: the next batch's set) -> lanes taking turns (pipeline_pool.py) -> a lane's views pipelines
    (views_pipeline.py: decode in DALI, make the views) -> the torch batch (batch_assembler.py) -> here, which keeps
    the cursor and hands the batch to training. A batch a bad clip failed is repaired on a side lane (repair.py).

Two DALI stages with a thread between them, for three reasons: the reading thread alone touches DALI's reader, so
the order of batches, and with it exact resume, does not depend on timing; several views pipelines can run at
once (one per NVDEC engine); and the next batch decodes while training computes on this one. What differs between
training and testing is data: the LoaderConfig's views (sampling.TrainViews / EvalViews). A mixture of shard sets
(mixture.py) is one shard reader and reading thread per set, and the schedule choosing the set of each batch.
"""

import dataclasses
import logging
from dataclasses import dataclass

import torch

from dali_pipes.config import LoaderConfig
from dali_pipes.cursor import Cursor, StreamCursor
from dali_pipes.decoders import choose_route, gpu_capability
from dali_pipes.feeder import Feeder
from dali_pipes.mixture import Schedule, ShardSource, parse_data, required_single
from dali_pipes.pipeline_pool import PipelinePool
from dali_pipes.sampling import EvalViews, TrainViews, ViewSpec
from dali_pipes.shard_set import ShardSet, open_shard_set, summed_formats

log = logging.getLogger("dali_pipes")


@dataclass(frozen=True)
class _Member:
    """One set of the loader's mixture: its shards and the config its own reader and plans run with."""

    source: ShardSource
    shards: ShardSet
    config: LoaderConfig  # the loader's, with this set's location, plan options and seed


class VideoLoader:
    """Iterate for one epoch of `len(loader)` batches of {'video': [B*V, 3, T, S, S], 'label': [B*V]} (and
    'video_index' with clip-major views), V views per clip. `state_dict` / `load_state_dict` resume exactly.

    `config.shards` may name a weighted mixture of sets (dali_pipes/mixture.py): each batch then comes whole from
    one set, each set read by its own reader; one set is the mixture of one."""

    def __init__(self, config: LoaderConfig):
        self.config = config
        self.sources = parse_data(config.shards, config.mixture)
        if not isinstance(config.views, TrainViews):
            required_single(self.sources, "testing")
        self.members = [self._member(i, source) for i, source in enumerate(self.sources)]
        formats = summed_formats(m.shards for m in self.members)
        self.route = choose_route(config.decoder, formats, gpu_capability(config.device))
        log.info("video decoder: %s (%s)", self.route.name, self.route.why)
        if config.shuffled:
            clips = [m.shards.shuffle_fill(config.shuffle_buffer, config.world_size) for m in self.members]
            gb = sum(n * m.shards.num_bytes / max(1, m.shards.num_samples) for n, m in zip(clips, self.members)) / 1e9
            log.info("shuffle buffer: %s clips = %.2f GB of host memory in this process (shuffle_buffer=%d, at most "
                     "a rank's part of %s)", " + ".join(map(str, clips)), gb, config.shuffle_buffer,
                     f"each of the {len(clips)} sets" if len(clips) > 1 else "the set")
        self.schedule = Schedule(tuple(s.weight for s in self.sources), config.seed, config.world_size)
        if len(self.members) > 1:
            log.info("mixture of %d sets, each batch from one set; an epoch is %d batches per rank: %s",
                     len(self.members), len(self), "; ".join(
                         f"{m.source.name} ({m.source.location}) {100 * m.source.weight:.1f}% of batches, "
                         f"{m.source.weight * len(self) / self._set_length(m):.2f} passes per epoch"
                         for m in self.members))
        self.pool = PipelinePool(config, self.route)
        self.cursor = StreamCursor(sets=(Cursor(),) * len(self.members))  # after the last batch handed out
        self._feeders = self._batches = None  # the sets' reading threads, and the pool's stream of batches from them

    def _member(self, index: int, source: ShardSource) -> _Member:
        c = self.config
        # each set its own shuffle and augmentation draws; set 0 keeps the seed: one set is the loader it always was
        config = dataclasses.replace(c, shards=source.location, mixture=None, seed=c.seed + index,
                                     views=dataclasses.replace(c.views, spec=source.views(c.views.spec)))
        shards = open_shard_set(source.location, c.split, c.skip_damaged_shards)
        smallest = min(shards.rank_sizes(c.world_size))
        if c.batch_size > smallest:
            raise ValueError(f"batch_size {c.batch_size} is larger than the {smallest} samples each of "
                             f"{c.world_size} rank(s) gets from the {shards.num_samples} in {source.location} "
                             f"({c.split})")
        return _Member(source, shards, config)

    def _set_length(self, member: _Member) -> int:
        return member.shards.batches_per_epoch(self.config.batch_size, self.config.world_size)

    def __len__(self) -> int:
        """Batches per epoch: as many as all the sets' clips make (one set: its own)."""
        return sum(self._set_length(m) for m in self.members)

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
            self._feeders = [Feeder(m.config, m.shards, self.route, cursor)
                             for m, cursor in zip(self.members, self.cursor.sets)]
            self._batches = self.pool.batches(self.schedule.feeds(self._feeders, self.config.rank, len(self),
                                                                     self.cursor))
        for feed, batch in self._batches:
            self.cursor = feed.cursor
            yield batch
            if feed.cursor.position == 0:  # that was the epoch's last batch
                return

    def store_figures(self) -> dict:
        """What the shard windows of its sets (dali_pipes/shard_window.py) did so far in this process: GB fetched,
        seconds the reader waited for them, GB they hold now (all the node's ranks'); {} without a window."""
        windows = [m.shards.window for m in self.members if m.shards.window is not None]
        if not windows:
            return {}
        return {"fetched_gb": sum(w.fetched_bytes for w in windows) / 1e9,
                "store_wait_s": sum(w.waited for w in windows),
                "window_fill_gb": sum(w.held_bytes() for w in windows) / 1e9}

    def endless(self):
        """Batch after batch across epochs, for as long as it is asked (training's stream; a benchmark's)."""
        while True:
            yield from self

    def placeholder_batch(self) -> dict:
        """A training batch of zeros in this loader's shape, dtype and device: what a rank steps on while the other
        ranks learn, with a step's numbers, that its store stopped answering (they are waiting in that step's
        collectives)."""
        c, spec = self.config, self.config.views.spec
        rows = c.batch_size * c.views.views_per_clip
        return {"video": torch.zeros(rows, 3, spec.num_frames, spec.crop_size, spec.crop_size, dtype=c.dtype,
                                     device=c.device),
                "label": torch.zeros(rows, dtype=torch.int64, device=c.device)}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor.as_dict(), "repair": self.pool.repair.state_dict(), "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken: the next batch, same order. Saved with another layout of ranks (world
        size, batch size), the epoch goes on from the batch that the clips read so far reach, in a fresh order
        (each set's reader, and the mixture's count, alike). A state saved before mixtures loads as one set's."""
        self.close()
        self.pool.repair.load_state_dict(state["repair"])
        stream, layout = StreamCursor.from_dict(state["cursor"]), state["layout"]
        if len(stream.sets) != len(self.members):
            raise ValueError(f"the loader state holds {len(stream.sets)} set(s) but this loader mixes "
                             f"{len(self.members)} ({', '.join(s.name for s in self.sources)}): resume with the "
                             "run's --data")
        if layout == self._layout():
            self.cursor = stream
            return
        read = stream.position * layout["batch_size"] * layout["world_size"]  # clips read this epoch, all ranks
        clips_per_batch = self.config.batch_size * self.config.world_size
        sets = tuple(Cursor.fresh(*self._moved(c, layout, self._set_length(m)))
                     for c, m in zip(stream.sets, self.members))
        self.cursor = StreamCursor(*self._moved(stream, layout, len(self)), sets)
        log.warning("loader state saved by %d rank(s) x %d clips per batch, now %d x %d: epoch %d goes on at batch "
                    "%d of %d (%d clips read of it%s), in a fresh order for the rest of it", layout["world_size"],
                    layout["batch_size"], self.config.world_size, self.config.batch_size, stream.epoch,
                    self.cursor.position, len(self), read,
                    "" if read % clips_per_batch == 0 else f"; {read % clips_per_batch} more are read again")

    def _moved(self, cursor, layout: dict, length: int) -> tuple[int, int]:
        """(epoch, position) on this layout of ranks of a stream of `length` batches per epoch that stood at
        `cursor` (epoch, position) on `layout`: the batch the clips read so far reach."""
        read = cursor.position * layout["batch_size"] * layout["world_size"]
        position = read // (self.config.batch_size * self.config.world_size)
        return cursor.epoch + position // length, position % length

    def close(self) -> None:
        """Stop the reading threads and drop the batches in flight (both also stop with the process)."""
        if self._feeders is not None:
            for feeder in self._feeders:
                feeder.stop()
            self.pool.drain()
        self._feeders = self._batches = None

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
    spec = ViewSpec(**_view_fields(options))
    counts = {name: n for name, n in (("clips", clips), ("crops", crops)) if n is not None}
    return VideoLoader(LoaderConfig(shards_dir, EvalViews(spec, **counts), split=split, **options))
