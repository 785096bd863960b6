"""The training-shard contract between tools/build_shards.py (the writer) and the DALI pipelines (the readers).

OUT/{split}-{000000}.tar holds, per sample KEY (dataset-unique, no dots):
    KEY.mp4 | .webm | .mkv | .avi | .mov   the video (re-encoded clips are always .mp4)
    KEY.cls    the label as ASCII digits (the webdataset convention)
    KEY.json   metadata: source path, youtube id, label name, fps, frame count, size, codec, duration
    KEY.info   int32 little-endian [label, num_frames, fps x 1000, height, width]: fixed-size, so DALI can batch it
               and pick frames without opening the video
OUT/{split}-{000000}.idx is its DALI index (wds2idx format) and OUT/manifest.json describes the whole set.
"""

import json
import os

import numpy as np

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
INFO_FIELDS = ("label", "num_frames", "fps_milli", "height", "width")
MANIFEST = "manifest.json"
CPU_DECODABLE = ("vp8", "vp9", "mjpeg")  # what DALI 2.4's CPU video decoder reads; everything else needs NVDEC


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".idx"


def pack_info(label: int, num_frames: int, fps: float, height: int, width: int) -> bytes:
    return np.array([label, num_frames, round(fps * 1000), height, width], dtype="<i4").tobytes()


def unpack_info(raw) -> dict:
    values = np.frombuffer(bytes(raw), dtype="<i4")
    return dict(zip(INFO_FIELDS, values.tolist()))


def read_manifest(shards_dir: str) -> dict:
    path = os.path.join(shards_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{shards_dir} has no {MANIFEST}: build shards with tools/build_shards.py first")
    with open(path) as f:
        return json.load(f)
