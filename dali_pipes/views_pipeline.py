"""The DALI graph that turns a batch of encoded clips into R views each: decode once, then per view crop, resize,
flip and normalize, all on the GPU when there is one.

Inputs arrive through named external sources, one batch per iteration (see loader.Feed):
    data            the encoded video (or, on the PyAV path, the decoded frames uint8 [F, H, W, 3])
    frames          int32 [F]: the frames to decode, ascending (the clip, or the union of the views' frames)
    order{v}        int32 [T]: view v's frames as positions into `frames` (absent when every view shares them)
    roi_start{v}, roi_end{v}   float32 [2]: view v's crop (y, x), relative to the stored frame
    antialias{v}    bool: the crop shrinks by more than ANTIALIAS_ABOVE (sampling.py): filter before resampling
    rotate          bool, and angle float32: the stored frames are turned by `angle` degrees for display (phone
                    videos); applied to each finished view, which is square, so its shape stays
    flip{v}         int32: mirror view v
Outputs: R of them, view v as [C, T, S, S] per sample, normalized with mean 0.45 and std 0.225 (in 0-1 units).
They are not stacked: the loader copies each straight into its slice of the batch tensor, which saves a copy.
"""

import warnings

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment as auto_rand_augment

from dali_pipes.normalization import MEAN, STD




def build_views_pipeline(*, batch_size: int, repeats: int, decoder: str, device_id, crop_size: int,
                         shared_frames: bool, half: bool, num_threads: int,
                         rand_augment: tuple[int, int] | None = None):
    """A built pipeline; `decoder` is dali-gpu (NVDEC), dali-cpu or pyav (frames decoded before DALI).
    One batch in flight: the loader collects it, then schedules the next before handing the first to training.
    Asynchronous execution also matters for faults: after a decoder error DALI's asynchronous executor goes on with
    the next batch, while the synchronous one stays broken (measured with DALI 2.4)."""

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1,
                  enable_conditionals=True)
    def views():
        data = fn.external_source(name="data", dtype=types.UINT8, layout=None if decoder != "pyav" else "FHWC")
        if decoder == "pyav":
            video = data
        else:
            frames = fn.external_source(name="frames", dtype=types.INT32)
            # pad_mode edge: a frame past the last one DALI counts repeats the last frame (the default pads black)
            video = fn.decoders.video(data, device="mixed" if decoder == "dali-gpu" else "cpu", frames=frames,
                                      pad_mode="edge")
        if device_id is not None and decoder != "dali-gpu":
            video = video.gpu()  # decoded on the CPU: augment on the GPU all the same
        rotate = fn.external_source(name="rotate", dtype=types.BOOL)
        angle = fn.external_source(name="angle", dtype=types.FLOAT)
        outputs = []
        for v in range(repeats):
            clip = video
            if not shared_frames:
                clip = fn.sequence_rearrange(video, new_order=fn.external_source(name=f"order{v}", dtype=types.INT32))
            roi = dict(size=[crop_size, crop_size], roi_relative=True,
                       roi_start=fn.external_source(name=f"roi_start{v}", dtype=types.FLOAT),
                       roi_end=fn.external_source(name=f"roi_end{v}", dtype=types.FLOAT))
            # antialiasing costs a wider filter: only where the crop shrinks enough to alias (HD sources)
            if fn.external_source(name=f"antialias{v}", dtype=types.BOOL):
                clip = fn.resize(clip, antialias=True, **roi)
            else:
                clip = fn.resize(clip, antialias=False, **roi)
            if rotate:
                clip = fn.rotate(clip, angle=angle, keep_size=True, interp_type=types.INTERP_NN)
            if rand_augment:  # needs enable_conditionals
                # DALI's auto_aug calls operators by their deprecated experimental names and forces the warning
                # past any filter; nothing for our users to act on, so it is caught here.
                with warnings.catch_warnings(record=True):
                    clip = auto_rand_augment.rand_augment(clip, n=rand_augment[0], m=rand_augment[1])
            outputs.append(fn.crop_mirror_normalize(
                clip, mirror=fn.external_source(name=f"flip{v}", dtype=types.INT32), mean=[MEAN] * 3,
                std=[STD] * 3, output_layout="CFHW", dtype=types.FLOAT16 if half else types.FLOAT,
            ))
        return tuple(outputs)

    pipe = views()
    pipe.build()
    return pipe
