"""The DALI graph that turns a batch of clips into R views each, and the one object that runs it.

The graph: decode once (or take frames a host decoder made), then per view crop, resize, turn, augment, flip and
normalize, all on the GPU when there is one. Outputs: R of them, view v as [C, T, S, S] per sample, normalized with
mean 0.45 and std 0.225 (in 0-1 units); they are not stacked: the batch assembler copies each straight into its
slice of the batch tensor, which saves a copy.

Inputs are named external sources, each declared here together with what fills it from a clip's plan (CLIP_INPUTS,
VIEW_INPUTS): a new per-view augmentation is a field of sampling.SamplePlan, an entry here and its use in the graph.

ViewsPipeline owns DALI's protocol for one batch in flight: feed the inputs, schedule the run, share the outputs,
release them. A Lane is the pipelines one batch of clips needs (one per kind: encoded, decoded) and the assembler that
copies their outputs into the torch batch: the loader's pool turns lanes, the repair runs a side lane. A failed run
raises what it means (dali_errors.classify): a clip the decoder cannot read, no NVDEC, or DALI out of memory; torch's
own errors (a CUDA out-of-memory in the copy) pass through as themselves.
"""

import contextlib
import warnings

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment as auto_rand_augment

from dali_pipes.dali_errors import VideoDecodeError, classify
from dali_pipes.normalization import MEAN, STD

# name -> (DALI type, the value for one clip from (data, plan)); per-view ones also take the view's number
DATA = "data"  # the encoded clip (a DALI decoder's input), or the frames uint8 [F, H, W, 3] a host decoder made
CLIP_INPUTS = {
    "frames": (types.INT32, lambda data, plan: plan.frames),  # the frames to decode, ascending (DALI decoders)
    "rotate": (types.BOOL, lambda data, plan: np.array(plan.rotation != 0)),  # turn the views (phone videos)
    "angle": (types.FLOAT, lambda data, plan: np.array(-plan.rotation, np.float32)),  # DALI turns counter-clockwise
}
VIEW_INPUTS = {
    "order": (types.INT32, lambda data, plan, v: plan.orders[v]),  # view v's frames, positions into `frames`
    "roi_start": (types.FLOAT, lambda data, plan, v: plan.boxes[v][:2]),  # its crop (y, x), relative, stored frame
    "roi_end": (types.FLOAT, lambda data, plan, v: plan.boxes[v][2:]),
    "antialias": (types.BOOL, lambda data, plan, v: np.array(plan.antialias[v])),  # the crop shrinks enough to alias
    "flip": (types.INT32, lambda data, plan, v: np.array(plan.flips[v], np.int32)),
}


def _data(data, plan):
    return data


class ViewsPipeline:
    """One built views pipeline for a LoaderConfig and a Decoder (a DALI decoder: clips arrive encoded; a host one:
    they arrive as frames). One batch in flight: submit it, then take its outputs before the next submit."""

    def __init__(self, config, decoder, num_threads: int, stop_after: str | None = None):
        """stop_after "decode" or "resize": the graph up to that stage, its output the decoded clip or each view's
        resized crop (the benchmark takes the pipeline apart that way)."""
        self._fill = {DATA: (_data, ())}  # input name -> (what fills it for one clip, its extra arguments)
        self.pipe = self._build(config, decoder, num_threads, stop_after)

    def _source(self, name: str, view: int | None = None):
        """The external source `name` (of view `view`), remembered with what fills it. (No function is made here:
        DALI's autograph converts what the graph calls, and a function made in converted code would run, slowly,
        through autograph at every batch.)"""
        if view is None:
            dtype, fill = CLIP_INPUTS[name]
            self._fill[name] = (fill, ())
        else:
            dtype, fill = VIEW_INPUTS[name]
            name = f"{name}{view}"
            self._fill[name] = (fill, (view,))
        return fn.external_source(name=name, dtype=dtype)

    def _build(self, config, decoder, num_threads: int, stop_after: str | None):
        """Asynchronous execution also matters for faults: after a decoder error DALI's asynchronous executor goes on
        with the next batch, while the synchronous one stays broken (measured with DALI 2.4)."""
        views, cuda = config.views, config.device.type == "cuda"
        size, half = [views.spec.crop_size] * 2, cuda and config.dtype != torch.float32

        @pipeline_def(batch_size=config.batch_size, num_threads=num_threads, prefetch_queue_depth=1,
                      device_id=(config.device.index or 0) if cuda else None, enable_conditionals=True)
        def pipeline():
            if decoder.decodes_in_dali:
                video = decoder.dali_node(fn.external_source(name=DATA, dtype=types.UINT8), self._source("frames"))
            else:
                video = fn.external_source(name=DATA, dtype=types.UINT8, layout="FHWC")
            if stop_after == "decode":
                return video
            if cuda and video.device == "cpu":
                video = video.gpu()  # decoded on the CPU: augmented on the GPU all the same
            if stop_after is None:
                rotate, angle = self._source("rotate"), self._source("angle")
            outputs = []
            for v in range(views.views_per_clip):
                clip = video
                if not views.shared_frames:
                    clip = fn.sequence_rearrange(clip, new_order=self._source("order", v))
                roi = dict(size=size, roi_relative=True, roi_start=self._source("roi_start", v),
                           roi_end=self._source("roi_end", v))
                # antialiasing costs a wider filter: only where the crop shrinks enough to alias (HD sources)
                if self._source("antialias", v):
                    clip = fn.resize(clip, antialias=True, **roi)
                else:
                    clip = fn.resize(clip, antialias=False, **roi)
                if stop_after == "resize":
                    outputs.append(clip)
                    continue
                if rotate:  # a square view keeps its shape turned
                    clip = fn.rotate(clip, angle=angle, keep_size=True, interp_type=types.INTERP_NN)
                if config.rand_augment:
                    # DALI's auto_aug calls operators by their deprecated experimental names and forces the
                    # warning past any filter; nothing for our users to act on, so it is caught here.
                    with warnings.catch_warnings(record=True):
                        clip = auto_rand_augment.rand_augment(clip, n=config.rand_augment[0],
                                                              m=config.rand_augment[1])
                outputs.append(fn.crop_mirror_normalize(
                    clip, mirror=self._source("flip", v), mean=[MEAN] * 3, std=[STD] * 3, output_layout="CFHW",
                    dtype=types.FLOAT16 if half else types.FLOAT,
                ))
            return tuple(outputs)

        pipe = pipeline()
        pipe.build()
        return pipe

    def submit(self, feed, part: slice = slice(None)) -> None:
        """Start the clips `part` of `feed` through the graph."""
        data, plans = feed.data[part], feed.plans[part]
        for name, (fill, args) in self._fill.items():
            self.pipe.feed_input(name, [fill(d, p, *args) for d, p in zip(data, plans)])
        self.pipe.schedule_run()

    @contextlib.contextmanager
    def outputs(self):
        """The submitted batch's views (R DALI TensorLists), valid inside the block; DALI takes them back after."""
        try:
            views = self.pipe.share_outputs()
        except RuntimeError as err:  # the run failed: say what it means (the buffers go back all the same)
            self.pipe.release_outputs()
            raise classify(err) from err
        try:
            yield views
        finally:
            self.pipe.release_outputs()

    def run(self, feed, part: slice = slice(None), use=lambda views: None):
        """One batch through and back, nothing else in flight: use(views) inside the outputs block."""
        self.submit(feed, part)
        with self.outputs() as views:
            return use(views)


class Lane:
    """A views pipeline per kind of clip a Feed holds (Feed.parts), and the batch assembler their outputs go to: one
    batch in flight, submitted, then taken as the torch batch (every part's outputs held at once while the assembler
    copies them) before the next submit."""

    def __init__(self, pipelines: dict, assemble):
        """pipelines: {feed kind: ViewsPipeline}; assemble: a batch_assembler.BatchAssembler."""
        self.pipelines, self.assemble = pipelines, assemble
        self.feed = None  # the batch in flight

    def submit(self, feed) -> None:
        for kind, part in feed.parts().items():
            self.pipelines[kind].submit(feed, part)
        self.feed = feed

    def batch(self) -> dict:
        """The torch batch of the feed in flight; a VideoDecodeError if a clip failed it."""
        return self._take(assemble=True)

    def discard(self) -> None:
        """Take the feed in flight back from DALI unassembled, failed or not."""
        try:
            self._take(assemble=False)
        except VideoDecodeError:
            pass

    def _take(self, assemble: bool):
        """Every part's outputs are taken back from DALI whatever the others did: a part left in DALI would hand its
        views to the lane's next batch. The first failure is raised once all of them are released."""
        feed, self.feed = self.feed, None
        parts, failure = [], None
        with contextlib.ExitStack() as stack:
            for kind, part in feed.parts().items():
                try:
                    parts.append((part, stack.enter_context(self.pipelines[kind].outputs())))
                except Exception as err:  # (the failed part's outputs went back already: ViewsPipeline.outputs)
                    failure = failure or err
            if failure is None:
                return self.assemble(feed, parts) if assemble else None
        raise failure
