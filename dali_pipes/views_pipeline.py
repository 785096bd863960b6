"""The DALI graph that turns a batch of clips into R views each: decode once (or take frames a host decoder made),
then per view crop, resize, turn, augment, flip and normalize, all on the GPU when there is one.

Inputs arrive through the named external sources of feed.Inputs, one batch per iteration. Outputs: R of them,
view v as [C, T, S, S] per sample, normalized with mean 0.45 and std 0.225 (in 0-1 units). They are not stacked:
the batch assembler copies each straight into its slice of the batch tensor, which saves a copy.
"""

import warnings

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment as auto_rand_augment

from dali_pipes.feed import Inputs
from dali_pipes.normalization import MEAN, STD


def build_views_pipeline(config, decoder, num_threads: int):
    """A built pipeline for a LoaderConfig and a Decoder. One batch in flight: the loader collects it, then schedules
    the next before handing the first to training. Asynchronous execution also matters for faults: after a decoder
    error DALI's asynchronous executor goes on with the next batch, while the synchronous one stays broken
    (measured with DALI 2.4)."""
    views, cuda = config.views, config.device.type == "cuda"
    size, half = [views.spec.crop_size] * 2, cuda and config.dtype != torch.float32

    @pipeline_def(batch_size=config.batch_size, num_threads=num_threads, prefetch_queue_depth=1,
                  device_id=(config.device.index or 0) if cuda else None, enable_conditionals=True)
    def pipeline():
        if decoder.decodes_in_dali:
            encoded = fn.external_source(name=Inputs.DATA, dtype=types.UINT8)
            video = decoder.dali_node(encoded, fn.external_source(name=Inputs.FRAMES, dtype=types.INT32))
        else:
            video = fn.external_source(name=Inputs.DATA, dtype=types.UINT8, layout="FHWC")
        if cuda and video.device == "cpu":
            video = video.gpu()  # decoded on the CPU: augmented on the GPU all the same
        rotate = fn.external_source(name=Inputs.ROTATE, dtype=types.BOOL)
        angle = fn.external_source(name=Inputs.ANGLE, dtype=types.FLOAT)
        outputs = []
        for v in range(views.views_per_clip):
            clip = video
            if not views.shared_frames:
                clip = fn.sequence_rearrange(clip, new_order=fn.external_source(name=Inputs.order(v),
                                                                               dtype=types.INT32))
            roi = dict(size=size, roi_relative=True,
                       roi_start=fn.external_source(name=Inputs.roi_start(v), dtype=types.FLOAT),
                       roi_end=fn.external_source(name=Inputs.roi_end(v), dtype=types.FLOAT))
            # antialiasing costs a wider filter: only where the crop shrinks enough to alias (HD sources)
            if fn.external_source(name=Inputs.antialias(v), dtype=types.BOOL):
                clip = fn.resize(clip, antialias=True, **roi)
            else:
                clip = fn.resize(clip, antialias=False, **roi)
            if rotate:  # a square view keeps its shape turned
                clip = fn.rotate(clip, angle=angle, keep_size=True, interp_type=types.INTERP_NN)
            if config.rand_augment:
                # DALI's auto_aug calls operators by their deprecated experimental names and forces the warning
                # past any filter; nothing for our users to act on, so it is caught here.
                with warnings.catch_warnings(record=True):
                    clip = auto_rand_augment.rand_augment(clip, n=config.rand_augment[0], m=config.rand_augment[1])
            outputs.append(fn.crop_mirror_normalize(
                clip, mirror=fn.external_source(name=Inputs.flip(v), dtype=types.INT32), mean=[MEAN] * 3,
                std=[STD] * 3, output_layout="CFHW",
                dtype=types.FLOAT16 if half else types.FLOAT,
            ))
        return tuple(outputs)

    pipe = pipeline()
    pipe.build()
    return pipe


def run_batch(pipe, inputs: dict, collect=lambda outputs: None):
    """One batch through `pipe` and back, nothing else in flight: feed `inputs` (external-source name -> values),
    run, and return collect(outputs), called before DALI takes its output buffers back."""
    for name, values in inputs.items():
        pipe.feed_input(name, values)
    pipe.schedule_run()
    try:
        return collect(pipe.share_outputs())
    finally:
        pipe.release_outputs()
