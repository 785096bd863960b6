"""The torch-facing video loader: shards -> DALI reader -> per-batch plans -> DALI decode + views -> torch tensors.

A background thread reads batch after batch of encoded clips (reader.py), draws each clip's frames and crops
(sampling.py) and, on the PyAV path, decodes them, staying `prefetch` batches ahead. The main thread feeds them to the
views pipeline (views_pipeline.py), which decodes and augments the next batch on DALI's threads and the GPU while
training computes on the current one (on a GPU several such pipelines take turns, to use several NVDEC engines).

A video the decoder rejects fails its whole batch in DALI; the loader then decodes that batch's clips one by one on a
side pipeline, logs and counts the bad ones, replaces them with good clips of the same batch, and yields the repaired
batch in its place, so the epoch keeps its length and order (all ranks must take the same number of steps).
"""

import logging
import math
import os
import queue
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from dali_pipes.dali_errors import NVDEC_HELP, first_meaningful_line, nvdec_missing
from dali_pipes.decoder_choice import choose_decoder, gpu_available
from dali_pipes.pyav_decoder import UndecodableVideo, decode_frames
from dali_pipes.reader import ShardReader
from dali_pipes.sampling import ViewSpec, plan_eval_sample, plan_train_sample
from dali_pipes.shard_format import unpack_info
from dali_pipes.shard_set import open_shard_set
from dali_pipes.views_pipeline import build_views_pipeline

log = logging.getLogger("dali_pipes")
_EPOCH_END = object()


@dataclass
class Feed:
    """One batch on its way from the reader thread to the views pipeline."""

    epoch: int
    position: int  # batch number within the epoch
    data: list  # per sample: encoded bytes, or decoded frames on the PyAV path
    plans: list  # per sample: SamplePlan
    labels: np.ndarray  # int64 [B]
    names: list  # per sample: 'shard.tar:offset:key.ext'
    real: int  # samples that are not epoch padding (the first `real` ones)
    reader_state: str  # DALI reader checkpoint right after this batch was read
    decoded: bool = False  # data holds decoded frames (PyAV path)

    def inputs(self, shared_frames: bool, indices=None) -> dict:
        """External-source name -> per-sample arrays, for all samples or those at `indices`."""
        picks = range(len(self.data)) if indices is None else indices
        plans = [self.plans[i] for i in picks]
        fed = {"data": [self.data[i] for i in picks]}
        if not self.decoded:
            fed["frames"] = [p.frames for p in plans]
        fed["rotate"] = [np.array(p.rotation != 0) for p in plans]
        fed["angle"] = [np.array(-p.rotation, np.float32) for p in plans]  # DALI turns counter-clockwise
        for v in range(len(plans[0].boxes)):
            if not shared_frames:
                fed[f"order{v}"] = [p.orders[v] for p in plans]
            fed[f"roi_start{v}"] = [p.boxes[v][:2] for p in plans]
            fed[f"roi_end{v}"] = [p.boxes[v][2:] for p in plans]
            fed[f"antialias{v}"] = [np.array(p.antialias[v]) for p in plans]
            fed[f"flip{v}"] = [np.array(p.flips[v], np.int32) for p in plans]
        return fed

    def substitute(self, bad: list, good: list) -> "Feed":
        """This batch with each bad sample replaced by a good one (cycling), labels and names included."""
        data, plans, labels, names = list(self.data), list(self.plans), self.labels.copy(), list(self.names)
        for k, i in enumerate(bad):
            j = good[k % len(good)]
            data[i], plans[i], labels[i], names[i] = data[j], plans[j], labels[j], names[j]
        return replace(self, data=data, plans=plans, labels=labels, names=names)


class VideoLoader:
    """Iterate for one epoch of `len(loader)` batches of {'video': [B*V, 3, T, S, S], 'label': [B*V]} (and
    'video_index' in evaluation), V views per clip."""

    def __init__(self, shards_dir: str, *, split: str, batch_size: int, spec: ViewSpec, evaluation: bool = False,
                 eval_clips: int = 7, eval_crops: int = 3, rank: int = 0, world_size: int = 1, seed: int = 0,
                 decoder: str = "auto", device="cpu", dtype=torch.float32, num_threads: int | None = None,
                 prefetch: int = 2, shuffle: bool = True, shuffle_buffer: int = 1024,
                 rand_augment: tuple[int, int] | None = None, decode_pipelines: int | None = None,
                 skip_damaged_shards: bool = False, dont_use_mmap: bool = False):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.shards = open_shard_set(shards_dir, split, skip_damaged_shards)
        self.dont_use_mmap = dont_use_mmap
        smallest = min(self.shards.rank_sizes(world_size))
        if batch_size > smallest:
            raise ValueError(f"batch_size {batch_size} is larger than the {smallest} samples each of {world_size} "
                             f"rank(s) gets from the {self.shards.num_samples} in {shards_dir} ({split})")
        self.device = torch.device(device)
        self.decoder, why = choose_decoder(decoder, self.shards.codecs, self.device.type == "cuda" and gpu_available())
        log.info("video decoder: %s (%s)", self.decoder, why)
        self.spec, self.evaluation, self.eval_clips, self.eval_crops = spec, evaluation, eval_clips, eval_crops
        self.views_per_clip = eval_clips * eval_crops if evaluation else spec.repeats
        self.shared_frames = not evaluation and not spec.per_view_start
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.dtype, self.shuffle, self.shuffle_buffer = dtype, shuffle and not evaluation, shuffle_buffer
        self.num_threads = num_threads or max(1, min(8, os.cpu_count() or 1))
        if self.shuffle:
            clip_mb = self.shards.num_bytes / max(1, self.shards.num_samples) / 1e6
            log.info("shuffle buffer: %d clips x %.2f MB = %.2f GB of host memory in this process (shuffle_buffer)",
                     shuffle_buffer, clip_mb, shuffle_buffer * clip_mb / 1e3)
        self.pipe_options = dict(
            batch_size=batch_size, repeats=self.views_per_clip, decoder=self.decoder, crop_size=spec.crop_size,
            device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
            shared_frames=self.shared_frames, half=self.device.type == "cuda" and dtype != torch.float32,
            num_threads=self.num_threads, rand_augment=rand_augment,
        )
        # One DALI decoder pipeline was reported to drive a single NVDEC engine (NVIDIA/DALI#6387) and an H100 has
        # seven; ViT-B at R=4 needs about two engines' worth of clips at 40% MFU (tools/gpu_projection.py). Several
        # pipelines, fed in turn, each hold one batch in flight. On a CPU one pipeline already uses every core.
        self.decode_pipelines = decode_pipelines or (4 if self.decoder == "dali-gpu" else 1)
        threads = max(1, self.num_threads // self.decode_pipelines)  # the process's share of cores, split
        self.pipes = [build_views_pipeline(**{**self.pipe_options, "num_threads": threads})
                      for _ in range(self.decode_pipelines)]
        self.prefetch, self._side_pipe = prefetch, None
        self.skipped = 0  # undecodable clips replaced so far
        self._decoded_any = False  # a batch came through (so a batch that fails whole is not a missing NVDEC)
        self.epoch, self.position = 0, 0  # of the next batch to yield
        self._reader_state, self._reader_epochs, self._reader_start, self._thread = None, 0, 0, None
        self._pending = deque()  # (pipeline index, feed) scheduled and not yet collected, oldest first
        self._epoch_fed = False  # the reading thread's end-of-epoch mark has been taken
        self._buffers, self._turn = [(None, lambda: None)] * 2, 0  # (buffer, the batch tensor made from it)
        self._batches_per_epoch = math.ceil(max(self.shards.rank_sizes(world_size)) / batch_size)

    # --- public API ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (from its first batch) with its own fresh order; a no-op for the epoch already under way."""
        if epoch != self.epoch:
            self._stop_reader()
            self.epoch, self.position, self._reader_state = epoch, 0, None

    def close(self) -> None:
        """Stop the reading thread (it also stops with the process)."""
        self._stop_reader()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "reader": self._reader_state,
                "reader_start": self._reader_start, "reader_epochs": self._reader_epochs, "skipped": self.skipped,
                "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken: same epoch, next batch, same order. On another rank layout (world size,
        batch size) the epoch restarts from its first batch with a fresh order instead."""
        self._stop_reader()
        self.epoch, self.skipped = state["epoch"], state["skipped"]
        if state["layout"] == self._layout() and state["reader"] is not None:
            self.position, self._reader_state = state["position"], state["reader"]
            self._reader_start, self._reader_epochs = state["reader_start"], state["reader_epochs"]
        else:
            log.warning("loader state was saved with %s, now %s: restarting epoch %d from its first batch",
                        state["layout"], self._layout(), self.epoch)
            self.position, self._reader_state = 0, None

    def __iter__(self):
        """The rest of the current epoch (all of it after set_epoch or at the start)."""
        self._start_reader()
        if not self._pending:  # (batches left from a loop left early belong to an epoch already fed)
            self._epoch_fed = False
        free = [i for i in range(self.decode_pipelines) if i not in {index for index, _ in self._pending}]
        for index in free:  # a loop left early keeps its scheduled batches: they come first
            if not self._schedule_next(index):
                break
        while self._pending:
            index, feed = self._pending.popleft()
            pipe = self.pipes[index]
            try:
                batch = self._to_batch(feed, pipe.share_outputs())
            except RuntimeError as err:  # a clip the decoder cannot read failed the whole batch
                batch = self._repair(feed, err)
            finally:
                pipe.release_outputs()
            self._decoded_any = True
            self._schedule_next(index)  # the next batch decodes while the caller trains on this one
            self.position += 1
            self._reader_state = feed.reader_state
            if self.position == len(self):
                self.epoch, self.position, self._reader_epochs = self.epoch + 1, 0, self._reader_epochs + 1
            yield batch

    def _schedule_next(self, index: int) -> bool:
        """Feed this epoch's next batch to pipeline `index`; False once the epoch has no more."""
        if self._epoch_fed:
            return False
        feed = self._queue.get()
        if isinstance(feed, BaseException):
            raise feed
        if feed is _EPOCH_END:
            self._epoch_fed = True
            return False
        for name, values in feed.inputs(self.shared_frames).items():
            self.pipes[index].feed_input(name, values)
        self.pipes[index].schedule_run()
        self._pending.append((index, feed))
        return True

    # --- reading thread --------------------------------------------------------------------------------------------

    def _layout(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size, "seed": self.seed}

    def _start_reader(self) -> None:
        if self._thread is not None:
            return
        if self._reader_state is None:  # a fresh reader: epoch self.epoch gets an order of its own
            self._reader_start, self._reader_epochs = self.epoch, 0
        # reading is memory copies: a quarter of the threads (measured on 2 cores: 1 reading thread beside 2
        # decoding ones gave 125 clips/s against 113 with 2 + 2)
        reader = ShardReader(self.shards, self.batch_size, self.rank, self.world_size,
                             (self.seed * 7919 + self._reader_start) % 2**31, self.shuffle, self.shuffle_buffer,
                             max(1, self.num_threads // 4), checkpoint=self._reader_state,
                             dont_use_mmap=self.dont_use_mmap)
        self._queue = queue.Queue(maxsize=self.prefetch + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_batches, args=(reader, self._stop), daemon=True,
                                        name="video-reader")
        self._thread.start()

    def _stop_reader(self) -> None:
        while self._pending:  # batches already scheduled: collect and drop them
            index, _ = self._pending.popleft()
            try:
                self.pipes[index].share_outputs()
            except RuntimeError:
                pass
            self.pipes[index].release_outputs()
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = None

    def _read_batches(self, reader: ShardReader, stop: threading.Event) -> None:
        epoch, position, reader_epochs = self.epoch, self.position, self._reader_epochs
        decode_pool = ThreadPoolExecutor(self.num_threads) if self.decoder == "pyav" else None
        try:
            while not stop.is_set():
                encoded, info, names, state = reader.next_batch()
                real = min(self.batch_size, max(0, reader.real_samples(reader_epochs) - position * self.batch_size))
                feed = self._plan(epoch, position, encoded, info, names, real, state)
                if decode_pool:
                    feed = self._decode_with_pyav(feed, decode_pool)
                self._put(feed, stop)
                position += 1
                if position == reader.batches_per_epoch:
                    self._put(_EPOCH_END, stop)
                    epoch, position, reader_epochs = epoch + 1, 0, reader_epochs + 1
        except BaseException as err:  # surfaces in the training loop instead of dying silently
            self._put(err, stop)
        finally:
            if decode_pool:
                decode_pool.shutdown(wait=False)

    def _put(self, item, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _plan(self, epoch, position, encoded, info, names, real, state) -> Feed:
        rng = np.random.default_rng([self.seed, self.rank, epoch, position])
        plans = []
        for row in info:
            meta = unpack_info(row.tobytes())
            fps, rotation = meta["fps_milli"] / 1000, meta.get("rotation", 0)
            args = (meta["num_frames"], fps, meta["height"], meta["width"], self.spec)
            if self.evaluation:
                plans.append(plan_eval_sample(*args, num_clips=self.eval_clips, num_crops=self.eval_crops,
                                              rotation=rotation))
            else:
                plans.append(plan_train_sample(*args, rng, rotation=rotation))
        return Feed(epoch, position, encoded, plans, info[:, 0].astype(np.int64), names, real, state)

    def _decode_with_pyav(self, feed: Feed, pool: ThreadPoolExecutor) -> Feed:
        results = list(pool.map(_try_decode, feed.data, [p.frames for p in feed.plans]))
        bad = [i for i, r in enumerate(results) if isinstance(r, UndecodableVideo)]
        feed = replace(feed, data=results, decoded=True)
        return self._substitute(feed, bad) if bad else feed

    # --- undecodable clips -----------------------------------------------------------------------------------------

    def _substitute(self, feed: Feed, bad: list) -> Feed:
        for i in bad:
            log.warning("skipping an undecodable video: %s", feed.names[i])
        self.skipped += len(bad)
        good = [i for i in range(len(feed.data)) if i not in bad]
        if not good:
            if self.decoder == "dali-gpu" and not self._decoded_any:
                raise RuntimeError(f"NVDEC decoded none of the first batch's {len(bad)} clips ({feed.names[0]}, "
                                   f"...): it is probably not available in this process. {NVDEC_HELP}")
            raise RuntimeError(f"every clip of a batch is undecodable ({feed.names}): are these shards intact? "
                               "(python tools/preflight.py --data ... checks them)")
        return feed.substitute(bad, good)

    def _repair(self, feed: Feed, err: Exception) -> dict:
        """Find the clips of a failed batch that the decoder rejects, replace them, decode the batch on the side."""
        if nvdec_missing(err):
            raise RuntimeError(f"{first_meaningful_line(err)}. {NVDEC_HELP}") from None
        log.warning("the video decoder failed on a batch (%s); checking its clips one by one",
                    first_meaningful_line(err)[:300])
        if self._side_pipe is None:
            self._side_pipe = build_views_pipeline(**self.pipe_options)
        bad = []
        for i in range(len(feed.data)):
            try:
                self._run_side(feed, [i])
            except RuntimeError:
                bad.append(i)
        feed = self._substitute(feed, bad)
        return self._run_side(feed, collect=lambda views: self._to_batch(feed, views))

    def _run_side(self, feed: Feed, indices=None, collect=lambda views: None):
        for name, values in feed.inputs(self.shared_frames, indices).items():
            self._side_pipe.feed_input(name, values)
        self._side_pipe.schedule_run()
        try:
            return collect(self._side_pipe.share_outputs())
        finally:
            self._side_pipe.release_outputs()

    # --- to torch --------------------------------------------------------------------------------------------------

    def _output_buffer(self, shape, dtype) -> torch.Tensor:
        """Two output buffers used in turn: a fresh 40 MB tensor per batch costs more in page faults than the copy
        into it (CPU, measured: 14.6 ms against 2.5 ms). A buffer whose last batch is still referenced (someone
        kept it, e.g. list(loader)) is left to its holder and replaced."""
        self._turn = 1 - self._turn
        buffer, handed_out = self._buffers[self._turn]
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or handed_out() is not None:
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
        return buffer

    def _to_batch(self, feed: Feed, views: tuple) -> dict:
        """DALI's per-view outputs -> torch. Training batches are view-major (row v * B + b is view v of clip b);
        evaluation batches clip-major, so that a video's views sit together, with a 'video_index' per row."""
        first = views[0].as_tensor()  # [B, C, T, S, S]
        out = self._output_buffer((len(views), *first.shape()), to_torch_type[first.dtype])
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for v, view in enumerate(views):
            feed_ndarray(view.as_tensor(), out[v], cuda_stream=stream)
        labels = torch.from_numpy(feed.labels)
        if self.device.type == "cuda":  # from pinned memory, without blocking the host
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        if not self.evaluation:
            video = out.flatten(0, 1).to(self.dtype)
            self._buffers[self._turn] = (out, weakref.ref(video))
            return {"video": video, "label": labels.repeat(len(views))}
        # a video's views share its index; the padding at the end of an epoch keeps its place (every rank runs the
        # same forward passes, which ZeRO-3 needs) with index -1
        first_clip = feed.position * self.batch_size
        index = torch.arange(first_clip, first_clip + len(feed.labels), device=self.device)
        index[feed.real:] = -1
        video = out.transpose(0, 1).flatten(0, 1).to(self.dtype)
        return {"video": video, "label": labels.repeat_interleave(len(views)),
                "video_index": index.repeat_interleave(len(views))}


def _try_decode(data, frames):
    try:
        return decode_frames(data, frames)
    except UndecodableVideo as err:
        return err


def build_pretrain_loader(shards_dir: str, batch_size: int = 8, repeats: int = 4, num_frames: int = 16,
                          stride: int = 4, crop_size: int = 224, rank: int = 0, world_size: int = 1, seed: int = 0,
                          decoder: str = "auto", split: str = "train", **options) -> VideoLoader:
    """MAE-ST pretraining: R views per decoded clip, random resized crop (scale 0.5-1, aspect 3/4-4/3), flip.
    options: target_fps, per_view_start, scale, ratio, flip (ViewSpec) and device, dtype, num_threads, prefetch,
    shuffle_buffer (VideoLoader)."""
    spec_keys = ("target_fps", "per_view_start", "scale", "ratio", "flip")
    spec_fields = {k: options.pop(k) for k in spec_keys if k in options}
    spec = ViewSpec(num_frames=num_frames, stride=stride, repeats=repeats, crop_size=crop_size, **spec_fields)
    return VideoLoader(shards_dir, split=split, batch_size=batch_size, spec=spec, rank=rank, world_size=world_size,
                       seed=seed, decoder=decoder, **options)


def build_finetune_loader(shards_dir: str, batch_size: int = 8, repeats: int = 2, rand_augment=(2, 7),
                          scale=(0.08, 1.0), **options) -> VideoLoader:
    """Fine-tuning: random resized crop scale 0.08-1, flip, RandAugment (DALI's, on the GPU, the same op for every
    frame of a view), repeated augmentation 2. Mixup, cutmix and random erasing act on whole batches and run in
    torch on the device after the loader (trainer/)."""
    return build_pretrain_loader(shards_dir, batch_size=batch_size, repeats=repeats, scale=scale,
                                 rand_augment=rand_augment, **options)


def build_eval_loader(shards_dir: str, batch_size: int = 1, num_clips: int = 7, num_crops: int = 3,
                      num_frames: int = 16, stride: int = 4, crop_size: int = 224, rank: int = 0, world_size: int = 1,
                      decoder: str = "auto", split: str = "val", target_fps=None, **options) -> VideoLoader:
    """Multi-view testing: num_clips temporal clips spread over each video x num_crops square crops along its long
    side (the short side resized to crop_size); deterministic; every video exactly once."""
    spec = ViewSpec(num_frames=num_frames, stride=stride, target_fps=target_fps, repeats=1, crop_size=crop_size,
                    flip=False)
    return VideoLoader(shards_dir, split=split, batch_size=batch_size, spec=spec, evaluation=True,
                       eval_clips=num_clips, eval_crops=num_crops, rank=rank, world_size=world_size, decoder=decoder,
                       **options)
