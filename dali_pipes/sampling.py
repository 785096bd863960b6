"""Which frames and which crop each view of a clip gets: plain numpy, drawn per batch from (seed, rank, epoch, batch).

The pipelines receive these as explicit per-sample arguments instead of drawing them with DALI's random operators,
so a resumed run, a pipeline rebuilt after a bad video, or a batch repaired on the side, sees exactly the same
augmentation, and the tests can check every number.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from dali_pipes import checks


@dataclass(frozen=True)
class ViewSpec:
    """How the views of one decoded clip are made."""

    num_frames: int = 16
    # a key of SAMPLINGS (below). stride: num_frames frames `stride` apart from a random start (Kinetics: 16 x 4, a
    # 2-s window); segments: the whole clip cut into num_frames equal segments, one frame from each (TSN-style,
    # Something-Something v2's custom: its 2-6 s clips are one action from start to end)
    sampling: str = "stride"
    stride: int = 4  # frames between samples, at target_fps when it is set, else at the video's own rate
    target_fps: float | None = 30.0  # mae_st and SlowFast sample at 30 fps whatever the source rate (None: its own)
    repeats: int = 4  # views per decoded clip (MAE-ST repeated sampling)
    per_view_start: bool = False  # each view its own temporal start (the union of frames is decoded once)
    crop_size: int = 224
    scale: tuple[float, float] = (0.5, 1.0)  # random resized crop: area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and aspect ratio (w / h)
    flip: bool = True

    def __post_init__(self):
        checks.refuse("view options", self.problems())

    def problems(self) -> list[str]:
        return checks.problems(self, {
            **{name: (checks.integer(1), "an integer >= 1") for name in ("num_frames", "stride", "repeats",
                                                                         "crop_size")},
            "sampling": (lambda v: v in SAMPLINGS, " or ".join(SAMPLINGS)),
            "target_fps": (checks.optional(checks.number(above=0)), "a number > 0, or None (the video's own rate)"),
            "scale": (checks.pair(checks.number(above=0, high=1)), "(low, high) area fractions, 0 < low <= high <= 1"),
            "ratio": (checks.pair(checks.number(above=0)), "(low, high) aspect ratios, 0 < low <= high"),
            **{name: (checks.boolean, "True or False") for name in ("per_view_start", "flip")},
        })


# Resampling a crop down by more than this aliases visibly (fine textures turn to moire): filter first. Crops of
# the recommended 256-320p shards shrink by at most ~1.4x to 224; HD copy-shards by 3-5x.
ANTIALIAS_ABOVE = 1.5


@dataclass
class SamplePlan:
    frames: np.ndarray  # int32 [F]: frame indices to decode, ascending (repeats only from edge padding)
    orders: list  # per view, int32 [T]: positions into `frames`
    boxes: list  # per view, float32 [4]: crop (y0, x0, y1, x1) relative to the STORED frame
    flips: list  # per view, 0 or 1
    antialias: list  # per view, bool: the crop shrinks by more than ANTIALIAS_ABOVE
    rotation: int = 0  # degrees clockwise that turn a stored frame upright (phone videos)


def clip_indices(start: float, num_frames: int, stride: int, fps: float, target_fps: float | None, total: int):
    """Frame indices of one clip starting at frame `start`; indices past the end repeat the last frame (edge pad)."""
    step = stride * (fps / target_fps if target_fps else 1.0)
    indices = np.floor(start + step * np.arange(num_frames) + 1e-6).astype(np.int64)
    return np.clip(indices, 0, max(total - 1, 0))


def clip_span(num_frames: int, stride: int, fps: float, target_fps: float | None) -> float:
    """Source frames one clip covers."""
    step = stride * (fps / target_fps if target_fps else 1.0)
    return step * (num_frames - 1) + 1


def segment_indices(total: int, num_frames: int, offsets: np.ndarray) -> np.ndarray:
    """One frame from each of num_frames equal segments of a `total`-frame clip, at `offsets` (in [0, 1), one per
    segment) of the way through its segment: segment i covers frames [i total / T, (i + 1) total / T)."""
    edges = np.arange(num_frames + 1) * total / num_frames
    picks = np.floor(edges[:-1] + offsets * np.diff(edges) + 1e-6).astype(np.int64)
    return np.clip(picks, 0, max(total - 1, 0))


def random_start(total: int, span: float, rng: np.random.Generator) -> float:
    """Uniform over every start that keeps the clip inside the video (float draw then floor: DALI's integer uniform
    rounds, which halves the odds of both ends); 0 when the video is shorter than the clip."""
    return float(np.floor(rng.random() * max(1, math.floor(total - span) + 1)))


def random_resized_box(height: int, width: int, scale, ratio, rng: np.random.Generator) -> np.ndarray:
    """The Inception-style random resized crop (torchvision's algorithm): (y0, x0, y1, x1) relative to the frame."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            return np.array([y / height, x / width, (y + h) / height, (x + w) / width], np.float32)
    aspect = width / height  # fallback: the whole frame, cut to the nearest allowed aspect ratio, centred
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    y, x = (height - h) // 2, (width - w) // 2
    return np.array([y / height, x / width, (y + h) / height, (x + w) / width], np.float32)


def display_size(height: int, width: int, rotation: int) -> tuple[int, int]:
    """(height, width) of a stored frame once turned upright."""
    return (width, height) if rotation % 180 else (height, width)


def stored_box(box: np.ndarray, rotation: int) -> np.ndarray:
    """A crop drawn on the upright frame, (y0, x0, y1, x1) relative, as the same pixels of the stored frame (which
    is the upright one turned back by `rotation` degrees clockwise)."""
    y0, x0, y1, x1 = box
    stored = {0: (y0, x0, y1, x1), 90: (1 - x1, y0, 1 - x0, y1), 180: (1 - y1, 1 - x1, 1 - y0, 1 - x0),
              270: (x0, 1 - y1, x1, 1 - y0)}[rotation % 360]
    return np.array(stored, np.float32)


def needs_antialias(box: np.ndarray, height: int, width: int, crop_size: int) -> bool:
    return max((box[2] - box[0]) * height, (box[3] - box[1]) * width) > ANTIALIAS_ABOVE * crop_size


def _union(clips: list) -> tuple[np.ndarray, list]:
    frames = np.unique(np.concatenate(clips)).astype(np.int32)
    return frames, [np.searchsorted(frames, c).astype(np.int32) for c in clips]


def _finish(frames, orders, upright_boxes, flips, height, width, rotation, crop_size) -> SamplePlan:
    """The plan with its boxes moved onto the stored frame (height x width) and each view's antialias flag."""
    boxes = [stored_box(b, rotation) for b in upright_boxes]
    return SamplePlan(frames, orders, boxes, flips, [needs_antialias(b, height, width, crop_size) for b in boxes],
                      rotation)


class TemporalSampling(NamedTuple):
    """Which frames a view takes: one random draw for training, and the num_clips evenly placed test clips."""

    train: Callable  # (total, fps, spec, rng) -> frame indices [num_frames]
    test: Callable  # (total, fps, spec, num_clips) -> list of frame indices [num_frames]


def _stride_train(total: int, fps: float, spec: ViewSpec, rng) -> np.ndarray:
    span = clip_span(spec.num_frames, spec.stride, fps, spec.target_fps)
    return clip_indices(random_start(total, span, rng), spec.num_frames, spec.stride, fps, spec.target_fps, total)


def _stride_test(total: int, fps: float, spec: ViewSpec, num_clips: int) -> list:
    """Starts spread evenly from the first to the last possible one (one clip: the middle)."""
    span = clip_span(spec.num_frames, spec.stride, fps, spec.target_fps)
    last = max(0.0, math.floor(total - span))
    starts = np.linspace(0.0, last, num_clips) if num_clips > 1 else [last / 2]
    return [clip_indices(np.floor(s), spec.num_frames, spec.stride, fps, spec.target_fps, total) for s in starts]


def _segments_train(total: int, fps: float, spec: ViewSpec, rng) -> np.ndarray:
    return segment_indices(total, spec.num_frames, rng.random(spec.num_frames))  # anywhere in each segment


def _segments_test(total: int, fps: float, spec: ViewSpec, num_clips: int) -> list:
    """Clip k takes each segment's frame (k + 1/2) / num_clips of the way through it (one clip: the middles)."""
    return [segment_indices(total, spec.num_frames, np.full(spec.num_frames, (k + 0.5) / num_clips))
            for k in range(num_clips)]


# stride: num_frames frames `stride` apart (Kinetics); segments: one frame from each of num_frames equal segments of
# the whole clip (Something-Something v2). A recipe names one; a new policy is one entry here.
SAMPLINGS = {"stride": TemporalSampling(_stride_train, _stride_test),
             "segments": TemporalSampling(_segments_train, _segments_test)}


def plan_train_sample(total: int, fps: float, height: int, width: int, spec: ViewSpec, rng,
                      rotation: int = 0) -> SamplePlan:
    """R views of one clip: one temporal start (or one per view), each view its own crop and flip, drawn on the
    upright frame (height x width is the stored frame, turned by `rotation` degrees clockwise for display)."""
    draw = SAMPLINGS[spec.sampling].train
    clips = [draw(total, fps, spec, rng) for _ in range(spec.repeats if spec.per_view_start else 1)]
    if spec.per_view_start:
        frames, orders = _union(clips)
    else:  # the decoder returns the clip itself, edge-padding repeats included
        frames, orders = clips[0].astype(np.int32), [np.arange(spec.num_frames, dtype=np.int32)] * spec.repeats
    upright = display_size(height, width, rotation)
    boxes = [random_resized_box(*upright, spec.scale, spec.ratio, rng) for _ in range(spec.repeats)]
    flips = [int(spec.flip and rng.random() < 0.5) for _ in range(spec.repeats)]
    return _finish(frames, orders, boxes, flips, height, width, rotation, spec.crop_size)


def eval_boxes(height: int, width: int, num_crops: int = 3) -> list:
    """Square crops of the short side's size along the long side (left, centre, right; or top, middle, bottom):
    the same pixels as resizing the short side to the crop size and then cropping."""
    side = min(height, width)
    boxes = []
    for i in range(num_crops):
        offset = (max(height, width) - side) * (i / (num_crops - 1) if num_crops > 1 else 0.5)
        y, x = (offset, 0.0) if height > width else (0.0, offset)
        boxes.append(np.array([y / height, x / width, (y + side) / height, (x + side) / width], np.float32))
    return boxes


def plan_eval_sample(total: int, fps: float, height: int, width: int, spec: ViewSpec, num_clips: int,
                     num_crops: int = 3, rotation: int = 0, window_stride: int | None = None) -> SamplePlan:
    """num_clips temporal clips placed evenly by the spec's sampling (or, with window_stride, a sliding window: clip
    k starts at frame k x window_stride, frames past the end repeating the last), times num_crops spatial crops;
    views ordered clip-major (clip 0 crop 0, clip 0 crop 1, ...)."""
    if window_stride:
        clips = [clip_indices(k * window_stride, spec.num_frames, spec.stride, fps, spec.target_fps, total)
                 for k in range(num_clips)]
    else:
        clips = SAMPLINGS[spec.sampling].test(total, fps, spec, num_clips)
    frames, orders = _union(clips)
    boxes = eval_boxes(*display_size(height, width, rotation), num_crops)
    return _finish(frames, [o for o in orders for _ in boxes], boxes * num_clips, [0] * (num_clips * num_crops),
                   height, width, rotation, spec.crop_size)


# --- the two kinds of views a loader makes: what differs between training and testing is this data --------------


@dataclass(frozen=True)
class TrainViews:
    """Training: R views of each decoded clip (MAE-ST's repeated sampling), each with its own random resized crop
    and flip (and start, with per_view_start), drawn from the batch's generator. Batches are view-major."""

    spec: ViewSpec = ViewSpec()
    layout = "view-major"  # row v * B + b is view v of clip b
    shuffle = True

    @property
    def views_per_clip(self) -> int:
        return self.spec.repeats

    @property
    def shared_frames(self) -> bool:
        """Every view uses the decoded frames as they are (no per-view reordering)."""
        return not self.spec.per_view_start

    def plan(self, meta: dict, rng: np.random.Generator) -> SamplePlan:
        return plan_train_sample(meta["num_frames"], meta["fps_milli"] / 1000, meta["height"], meta["width"],
                                 self.spec, rng, rotation=meta.get("rotation", 0))


@dataclass(frozen=True)
class EvalViews:
    """Testing: `clips` temporal clips spread over each video x `crops` square crops; deterministic, in order.
    Batches are clip-major (a video's views together) and carry each row's video index."""

    spec: ViewSpec = ViewSpec()  # (one unflipped view per clip and crop, whatever it says: __post_init__)
    clips: int = 7
    crops: int = 3
    window_stride: int | None = None  # frames between the starts of `clips` sliding windows (None: spread evenly)
    layout = "clip-major"
    shuffle = False
    shared_frames = False

    def __post_init__(self):
        checks.refuse("evaluation views", checks.problems(self, {
            **{name: (checks.integer(1), "an integer >= 1") for name in ("clips", "crops")},
            "window_stride": (checks.optional(checks.integer(1)), "an integer >= 1 (frames), or None")}))
        # a test view is one clip and crop, unflipped, whatever the training views were (frozen: set it this way)
        object.__setattr__(self, "spec", replace(self.spec, repeats=1, per_view_start=False, flip=False))

    @property
    def views_per_clip(self) -> int:
        return self.clips * self.crops

    def plan(self, meta: dict, rng: np.random.Generator) -> SamplePlan:
        return plan_eval_sample(meta["num_frames"], meta["fps_milli"] / 1000, meta["height"], meta["width"],
                                self.spec, self.clips, self.crops, rotation=meta.get("rotation", 0),
                                window_stride=self.window_stride)
