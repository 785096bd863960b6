"""The training-shard contract between tools/build_shards.py (the writer) and the DALI pipelines (the readers).

OUT/{split}-{000000}.tar holds, per sample KEY (dataset-unique, no dots):
    KEY.mp4 | .webm | .mkv | .avi | .mov   the video (re-encoded clips are always .mp4)
    KEY.cls    the label as ASCII digits (the webdataset convention)
    KEY.json   metadata: source path, youtube id, label name, fps, frame count, size, codec (canonical name: h264,
               hevc, av1, vp9, mpeg4, ...), pix_fmt, profile, rotation, duration
    KEY.info   int32 little-endian [label, num_frames, fps x 1000, height, width, rotation]: fixed-size, so DALI can
               batch it and pick frames without opening the video
num_frames counts the frames that decode, from frame 0 = the first decodable one. height x width is the stored frame
(what a decoder outputs); rotation is the degrees CLOCKWISE (0, 90, 180, 270) that turn it upright for display (a
phone's portrait clip: stored landscape, rotation 90).
OUT/{split}-{000000}.idx is its DALI index (wds2idx format) and OUT/manifest.json describes the whole set, each shard
with its bytes and SHA-256 and its index's (sets built before they were recorded lack them). OUT is a folder or an
object store's prefix (shard_store.py).
"""

import hashlib
import json

import numpy as np

from dali_pipes.shard_store import StoreRefused, open_store

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
INFO_FIELDS = ("label", "num_frames", "fps_milli", "height", "width", "rotation")
MANIFEST = "manifest.json"
# Short side (px) above which a clip costs GPU decode time for nothing: NVDEC's work per frame grows with its pixels,
# and a 224 crop needs ~256-320 px (mae_st / SlowFast pre-resize Kinetics to a 256 short side, VideoMAE to 320).
# build_shards.py --codec copy warns above it and the manifest counts the clips above it.
RECOMMENDED_SHORT_SIDE = 320
KINETICS_FRAME = (256, 341)  # (height, width) of a typical stored frame when a manifest does not say: Kinetics at 256


def file_sha256(path: str) -> str:
    """The checksum a manifest records of each shard and index (a copy is checked against it before it is used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".idx"


def pack_info(label: int, num_frames: int, fps: float, height: int, width: int, rotation: int = 0) -> bytes:
    return np.array([label, num_frames, round(fps * 1000), height, width, rotation], dtype="<i4").tobytes()


def unpack_info(raw) -> dict:
    values = np.frombuffer(bytes(raw), dtype="<i4").tolist()
    return dict(zip(INFO_FIELDS, values + [0] * (len(INFO_FIELDS) - len(values))))  # 5-field .info: rotation 0


def sample_format(meta: bytes) -> str | None:
    """A sample's "codec/pix_fmt" from its KEY.json (empty when the shard has none: unknown, None)."""
    if not len(meta):
        return None
    record = json.loads(bytes(meta))
    codec, pix_fmt = record.get("codec"), record.get("pix_fmt")
    return None if not codec else f"{codec}/{pix_fmt}" if pix_fmt else codec


def split_fingerprint(manifest: dict, split: str) -> str | None:
    """What identifies a split's contents wherever its files are: its shards' names, clip counts, sizes and checksums,
    and the set's label map (None: no such split)."""
    info = manifest["splits"].get(split)
    if info is None:
        return None
    shards = [[s["tar"], s.get("samples"), s.get("bytes"), s.get("sha256")] for s in info["shards"]]
    text = json.dumps([shards, sorted(manifest.get("label_map", {}).items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(location: str) -> dict:
    """The manifest of the set at `location`: a folder, or a store's URL (shard_store.py)."""
    manifest = open_store(location).read_json(MANIFEST)
    if manifest is None:
        raise StoreRefused(f"{location} has no {MANIFEST}: build shards with tools/build_shards.py first")
    return manifest
