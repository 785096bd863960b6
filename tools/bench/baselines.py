"""What users would run instead of the DALI pipeline, for the benchmark to compare against on the same shards.

- hand-written: a PyTorch DataLoader over the webdataset shards, PyAV decoding just the frames a clip needs, and
  torch augmentation (the same random resized crop, flip and normalization, per view), the same sampling.
- mae_st-style: the same, but decoding the whole video and cutting the R clips out of it, as mae_st's Kinetics
  loader does for repeated sampling.
Both run in `workers` processes with one torch thread each.
"""

import io

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from dali_pipes.decoders.pyav import decode_frames
from dali_pipes.sampling import ViewSpec, plan_train_sample
from dali_pipes.shard_format import VIDEO_EXTS, unpack_info
from dali_pipes.normalization import MEAN, STD


def decode_all_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # as in decode_frames: the DataLoader's workers are the parallelism
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


def torch_views(frames: np.ndarray, plan, crop_size: int) -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [R, 3, T, S, S] float, per view: its frames, crop, resize, flip, normalize."""
    video = torch.from_numpy(frames)
    height, width = video.shape[1:3]
    views = []
    for order, box, flip in zip(plan.orders, plan.boxes, plan.flips):
        y0, x0, y1, x1 = (box * np.array([height, width, height, width])).round().astype(int)
        clip = video[order, y0:y1, x0:x1].permute(0, 3, 1, 2).float()  # [T, 3, h, w]
        clip = F.interpolate(clip, size=(crop_size, crop_size), mode="bilinear", align_corners=False)
        if flip:
            clip = clip.flip(-1)
        views.append(((clip - MEAN) / STD).permute(1, 0, 2, 3))
    return torch.stack(views)


class _Views:
    """Picklable per-sample map for the DataLoader workers."""

    def __init__(self, spec: ViewSpec, whole_video: bool, seed: int):
        self.spec, self.whole_video, self.seed = spec, whole_video, seed
        self.rng = None

    def __call__(self, sample: dict):
        if self.rng is None:  # one generator per worker process
            torch.set_num_threads(1)
            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng([self.seed, info.id if info else 0])
        meta = unpack_info(sample["info"])
        data = next(sample[ext] for ext in VIDEO_EXTS if ext in sample)
        plan = plan_train_sample(meta["num_frames"], meta["fps_milli"] / 1000, meta["height"], meta["width"],
                                 self.spec, self.rng)
        if self.whole_video:  # decode everything, then index the clips out of it
            frames = decode_all_frames(data)
            plan.orders = [np.minimum(plan.frames[o], len(frames) - 1) for o in plan.orders]
        else:
            frames = decode_frames(data, plan.frames)
        return torch_views(frames, plan, self.spec.crop_size), meta["label"]


def build_baseline_loader(tars: list, spec: ViewSpec, batch_size: int, workers: int, whole_video: bool,
                          seed: int = 0) -> torch.utils.data.DataLoader:
    """Batches of (views [B, R, 3, T, S, S], labels [B]) over the shards, repeating forever."""
    dataset = wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, empty_check=False).repeat()
    dataset = dataset.shuffle(64).map(_Views(spec, whole_video, seed))
    # the default (forked) workers, as users have them; nothing here has started DALI, whose threads a fork would
    # not survive (dali_pipes imports DALI only with its loaders)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       persistent_workers=workers > 0)
