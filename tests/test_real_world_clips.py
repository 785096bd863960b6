"""The shards tell the truth about real-world clips: one cut before its first keyframe, AV1 in Matroska and other
codecs and containers, a phone's rotated clip, a clip shorter than a training clip, sources larger than GPU training
needs. Each goes through --codec copy and a re-encode (vp9: what DALI's CPU decoder reads)."""

import io
import json

import av
import numpy as np
import pytest
import webdataset as wds

from conftest import read_index, write_cut_clip, write_video
from dali_pipes.decoders.pyav import decode_frames
from dali_pipes.shard_format import RECOMMENDED_SHORT_SIDE, VIDEO_EXTS, read_manifest, unpack_info
from tools import build_shards


def build(root, out, codec, *extra):
    """Shard the class folders under root (sizes kept unless extra says otherwise): ({key: sample}, manifest)."""
    assert build_shards.main(["--root", str(root), "--out", str(out), "--codec", codec, "--workers", "1",
                              "--short-side", "0", *extra]) == 0
    manifest = read_manifest(str(out))
    tars = [str(out / shard["tar"]) for shard in manifest["splits"]["train"]["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}, manifest


def video(sample) -> tuple[str, bytes]:
    (ext,) = [k for k in sample if k in VIDEO_EXTS]
    return ext, sample[ext]


def facts(sample) -> tuple[dict, dict]:
    return json.loads(sample["json"]), unpack_info(sample["info"])


def dali_cpu_frames(clips: list[bytes], frames: list[int]) -> np.ndarray:
    """Frames `frames` of each clip as DALI's CPU video decoder returns them: [clips, frames, H, W, 3]."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(clips), num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(source=lambda: [np.frombuffer(c, np.uint8) for c in clips], batch=True)
        return fn.decoders.video(encoded, device="cpu", frames=frames)

    p = pipe()
    p.build()
    (frames_out,) = p.run()
    return np.array(frames_out.as_tensor())


def stored_cut_clip(tmp_path, codec: str, name: str) -> dict:
    """A cut clip (conftest.write_cut_clip: its source frames 1-4 cannot be decoded) through copy and a vp9
    re-encode: {mode: stored bytes}, after checking that both keep the 25 frames that decode, and that PyAV decodes
    source frame 5 as frame 0 and source frame 29 as the last."""
    (tmp_path / "root" / "c").mkdir(parents=True)
    write_cut_clip(tmp_path / "root" / "c" / name, frames=30, gop=5, codec=codec)
    stored = {}
    for mode in ("copy", "vp9"):
        samples, manifest = build(tmp_path / "root", tmp_path / mode, mode)
        assert manifest["skipped"] == []
        meta, info = facts(samples["cut"])
        assert meta["num_frames"] == info["num_frames"] == 25
        ext, stored[mode] = video(samples["cut"])
        assert ext == (name.split(".")[1] if mode == "copy" else "mp4")
        assert [read_index(f) for f in decode_frames(stored[mode], np.array([0, 1, 24]))] == [5, 6, 29]
    return stored


def test_clip_cut_before_its_first_keyframe_starts_at_its_first_decodable_frame(tmp_path):
    """VP9: the packets before the next keyframe are left out (copy remuxes the rest), and DALI's CPU decoder, which
    stops with an error on them, numbers the frames as PyAV does."""
    stored = stored_cut_clip(tmp_path, "libvpx-vp9", "cut.webm")
    decoded = dali_cpu_frames([stored["copy"], stored["vp9"]], [0, 24])
    assert [[read_index(f) for f in clip] for clip in decoded] == [[5, 29], [5, 29]]


def leading_pictures(data: bytes) -> int:
    """Packets after a clip's first keyframe (in decode order) that are displayed before it: an open GOP's leading
    pictures, which reference the group before the keyframe."""
    with av.open(io.BytesIO(data)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    first = next(i for i, p in enumerate(packets) if p.is_keyframe)
    return sum(p.pts < packets[first].pts for p in packets[first:])


def test_open_gop_clip_cut_before_its_first_keyframe_loses_the_leading_pictures(tmp_path):
    """HEVC with an open GOP: the B-frames after the next keyframe that are displayed before it are left out too."""
    stored = stored_cut_clip(tmp_path, "libx265", "cut.mp4")
    assert leading_pictures((tmp_path / "root" / "c" / "cut.mp4").read_bytes()) > 0  # the source has some
    assert leading_pictures(stored["copy"]) == 0


def test_codec_names_and_container_extensions_are_the_truth(tmp_path):
    """Canonical codec names (AV1, not its decoder libdav1d), extensions that name the container (Matroska is webm
    only when its DocType says so; QuickTime is mov), and the pixel formats and profiles the GPU preflight checks."""
    root = tmp_path / "root" / "c"
    root.mkdir(parents=True)
    write_video(root / "av1.mkv", frames=10, codec="libsvtav1")
    write_video(root / "mpeg4.avi", frames=10, codec="mpeg4")
    write_video(root / "vp9.webm", frames=10, codec="libvpx-vp9")
    write_video(root / "h264.mov", frames=10, pix_fmt="yuv444p")
    samples, manifest = build(tmp_path / "root", tmp_path / "copy", "copy")
    stored = {key: (video(s)[0], facts(s)[0]["codec"]) for key, s in samples.items()}
    assert stored == {"av1": ("mkv", "av1"), "mpeg4": ("avi", "mpeg4"), "vp9": ("webm", "vp9"), "h264": ("mov", "h264")}
    split = manifest["splits"]["train"]
    assert split["codecs"] == {"av1": 1, "mpeg4": 1, "vp9": 1, "h264": 1}
    assert split["formats"] == {"av1/yuv420p": 1, "mpeg4/yuv420p": 1, "vp9/yuv420p": 1, "h264/yuv444p": 1}
    assert facts(samples["h264"])[0]["profile"] == "High 4:4:4 Predictive"
    assert facts(samples["mpeg4"])[0]["profile"] == "Simple Profile"
    samples, manifest = build(tmp_path / "root", tmp_path / "vp9", "vp9")
    assert {video(s)[0] for s in samples.values()} == {"mp4"} and manifest["splits"]["train"]["codecs"] == {"vp9": 4}
    assert {(m["pix_fmt"], m["profile"], m["num_frames"]) for m, _ in map(facts, samples.values())} == {
        ("yuv420p", "Profile 0", 10)}


def test_rotated_phone_clip(tmp_path):
    """A portrait phone clip: stored 64x48 landscape with a 90-degree flag. Copy keeps the bytes and records the
    rotation; a re-encode turns the pixels upright and records none. Sizes are always the stored frame's."""
    root = tmp_path / "root" / "c"
    root.mkdir(parents=True)
    source = write_video(root / "phone.mp4", frames=10, rotation=90)
    with av.open(source) as container:
        assert next(container.decode(video=0)).rotation == -90  # FFmpeg's display matrix angle is counter-clockwise
    samples, manifest = build(tmp_path / "root", tmp_path / "copy", "copy")
    meta, info = facts(samples["phone"])
    assert meta["rotation"] == info["rotation"] == 90 and (meta["height"], meta["width"]) == (48, 64)
    assert (info["height"], info["width"]) == (48, 64) and video(samples["phone"])[1] == open(source, "rb").read()
    assert manifest["splits"]["train"]["rotations"] == {"90": 1}
    with open(tmp_path / "copy" / ".state" / "train-000000.tar.json") as f:
        (record,) = json.load(f)["samples"]
    assert {k: record[k] for k in ("height", "width", "pix_fmt", "rotation")} == {
        "height": 48, "width": 64, "pix_fmt": "yuv420p", "rotation": 90}
    samples, manifest = build(tmp_path / "root", tmp_path / "vp9", "vp9")
    meta, info = facts(samples["phone"])
    assert meta["rotation"] == info["rotation"] == 0 and (info["height"], info["width"]) == (64, 48)
    assert manifest["splits"]["train"]["rotations"] == {"0": 1}
    upright = decode_frames(video(samples["phone"])[1], np.arange(10))
    assert [read_index(np.rot90(f)) for f in upright] == list(range(10))  # turned back counter-clockwise: the source


def test_ten_frame_clip_is_kept_by_default(tmp_path, capsys):
    """mae_st and SlowFast train on short clips by repeating frames, and so does our loader: nothing is dropped."""
    (tmp_path / "root" / "c").mkdir(parents=True)
    write_video(tmp_path / "root" / "c" / "short.mp4", frames=10, codec="libvpx-vp9")
    for codec in ("copy", "vp9"):
        samples, manifest = build(tmp_path / "root", tmp_path / codec, codec)
        meta, info = facts(samples["short"])
        assert meta["num_frames"] == info["num_frames"] == 10 and manifest["options"]["min_frames"] == 1
    with pytest.raises(SystemExit):
        build_shards.parse_args(["--help"])
    assert "(default: 1, every clip that decodes" in " ".join(capsys.readouterr().out.split())


def test_copy_warns_once_about_sources_larger_than_gpu_training_needs(tmp_path, capsys):
    root = tmp_path / "root" / "c"
    root.mkdir(parents=True)
    write_video(root / "small.mp4", frames=10)
    for name in ("hd_a", "hd_b"):
        write_video(root / f"{name}.mp4", frames=10, width=400, height=336)
    _, manifest = build(tmp_path / "root", tmp_path / "copy", "copy")
    split = manifest["splits"]["train"]
    assert split["short_side"] == {"min": 48, "median": 336, "max": 336, f"above_{RECOMMENDED_SHORT_SIDE}": 2}
    assert split["pixels_median"] == 400 * 336
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "kept 2 clips" in warnings[0] and "400x336" in warnings[0]
    assert "--codec h264 --short-side 256" in warnings[0]
    _, manifest = build(tmp_path / "root", tmp_path / "vp9", "vp9", "--short-side", "256")
    assert manifest["splits"]["train"]["short_side"]["max"] == 256
    assert "warning:" not in capsys.readouterr().err
