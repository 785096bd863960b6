"""The DALI loaders on the CPU: shapes, frames, crops, sharding across ranks, determinism, resume, decoder choice,
bad videos, evaluation views. Shards are built from generated clips whose frames carry their own index."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from conftest import make_shards, once_per_run, read_index, write_video
from dali_pipes import build_eval_loader, build_pretrain_loader
from dali_pipes.decoders import choose_route
from dali_pipes.decoders.base import HostDecoder
from dali_pipes.shard_format import pack_info
from dali_pipes.normalization import MEAN, STD
from tools.shard_building.shard_writer import ShardWriter

@pytest.fixture(scope="module")
def vp9_shards(tmp_path_factory):
    return str(once_per_run(tmp_path_factory, "vp9", make_shards) / "shards")


def pixels(video):
    """Normalized [.., C, T, H, W] float -> uint8-range [.., T, H, W, C] numpy."""
    return (video.float() * STD + MEAN).clamp(0, 255).round().byte().movedim(-4, -1).numpy()


def whole_frame_loader(shards, **options):
    """Views that are the whole 64x48 frame, unflipped: what comes out is what was decoded."""
    return build_pretrain_loader(shards, **{"crop_size": 48, "scale": (1.0, 1.0), "ratio": (64 / 48, 64 / 48),
                                            "flip": False, "decoder": "dali-cpu", **options})


def test_shapes_dtypes_and_normalized_range(vp9_shards):
    loader = build_pretrain_loader(vp9_shards, batch_size=3, repeats=4, num_frames=8, stride=2, crop_size=32)
    assert len(loader) == 4
    batch = next(iter(loader))
    assert batch["video"].shape == (12, 3, 8, 32, 32) and batch["video"].dtype == torch.float32
    assert batch["label"].shape == (12,) and batch["label"].dtype == torch.int64
    assert torch.equal(batch["label"], batch["label"][:3].repeat(4))  # view-major: view v of clip b at v * B + b
    lo, hi = (0 - MEAN) / STD, (255 - MEAN) / STD
    assert lo - 1e-4 <= batch["video"].min() and batch["video"].max() <= hi + 1e-4
    assert batch["video"].std() > 0.2  # a real picture, not a constant
    half = build_pretrain_loader(vp9_shards, batch_size=3, repeats=1, num_frames=2, crop_size=16, dtype=torch.bfloat16)
    assert next(iter(half))["video"].dtype == torch.bfloat16


def test_sampled_frames_are_the_right_ones(vp9_shards):
    loader = whole_frame_loader(vp9_shards, batch_size=4, repeats=2, num_frames=6, stride=4)
    seen = 0
    for batch in loader:
        for clip in pixels(batch["video"]):
            indices = [read_index(frame) for frame in clip]
            assert indices == list(range(indices[0], indices[0] + 24, 4)), indices
            assert 0 <= indices[0] <= 80 - 21
            seen += 1
    assert seen == 24


def test_short_clips_repeat_their_last_frame(tmp_path):
    shards = make_shards(tmp_path, n=2, frames=10)
    batch = next(iter(whole_frame_loader(shards, batch_size=2, repeats=1, num_frames=6, stride=4)))
    for clip in pixels(batch["video"]):
        assert [read_index(f) for f in clip] == [0, 4, 8, 9, 9, 9]


def test_target_fps_maps_the_stride(tmp_path):
    shards = make_shards(tmp_path, n=2, frames=120, fps=60)
    batch = next(iter(whole_frame_loader(shards, batch_size=2, repeats=1, num_frames=4, stride=4, target_fps=30)))
    for clip in pixels(batch["video"]):
        indices = [read_index(f) for f in clip]
        assert np.diff(indices).tolist() == [8, 8, 8]


def test_views_differ_in_crop_and_frames_of_a_view_share_it(tmp_path):
    shards = make_shards(tmp_path, n=2, indexed=False)  # a still picture: frames differ only if crops do
    loader = build_pretrain_loader(shards, batch_size=2, repeats=4, num_frames=4, stride=2, crop_size=32)
    views = pixels(next(iter(loader))["video"]).astype(int)  # [8, T, H, W, C]
    for view in views:
        assert np.abs(view - view[0]).max() <= 2  # every frame of a view: the same crop and flip (codec noise aside)
    for clip in (views[0::2], views[1::2]):  # view-major rows: clip 0 at 0, 2, 4, 6
        assert min(np.abs(clip[a, 0] - clip[b, 0]).mean() for a in range(4) for b in range(a + 1, 4)) > 5


def test_each_sample_once_per_epoch_across_two_ranks(vp9_shards):
    ranks = [build_pretrain_loader(vp9_shards, batch_size=3, repeats=1, num_frames=2, crop_size=16, rank=r,
                                   world_size=2, seed=5) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # 12 clips / 2 ranks / 3 per batch
    for _ in range(2):  # two epochs, each a fresh order
        labels = [torch.cat([b["label"] for b in loader]).tolist() for loader in ranks]
        assert sorted(labels[0] + labels[1]) == list(range(12))
    eval_ranks = [build_eval_loader(vp9_shards, split="train", batch_size=5, clips=1, crops=1, crop_size=16,
                                    num_frames=2, rank=r, world_size=2) for r in range(2)]
    labels = [torch.cat([b["label"][b["video_index"] >= 0] for b in loader]).tolist() for loader in eval_ranks]
    assert sorted(labels[0] + labels[1]) == list(range(12))  # the padding of the last batch is marked -1


def test_seed_determinism_and_fresh_order_per_epoch(vp9_shards):
    def run(seed, epochs=1):
        loader = build_pretrain_loader(vp9_shards, batch_size=4, repeats=2, num_frames=4, crop_size=24, seed=seed)
        return [[b for b in loader] for _ in range(epochs)]

    a, b, c = run(1, epochs=2), run(1), run(2)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["video"], y["video"])
    # several decoding pipelines taking turns (the GPU default) give the very same stream
    turns = build_pretrain_loader(vp9_shards, batch_size=4, repeats=2, num_frames=4, crop_size=24, seed=1,
                                  decode_pipelines=3)
    for x, y in zip([b for _ in range(2) for b in turns], a[0] + a[1]):
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["video"], y["video"])
    assert not all(torch.equal(x["video"], y["video"]) for x, y in zip(a[0], c[0]))
    order = [torch.cat([x["label"][:4] for x in epoch]).tolist() for epoch in a]
    assert sorted(order[0]) == sorted(order[1]) and order[0] != order[1]


def test_state_dict_resumes_at_the_next_batch(vp9_shards):
    def loader():
        return build_pretrain_loader(vp9_shards, batch_size=2, repeats=2, num_frames=4, crop_size=24, seed=3)

    reference = loader()
    stream = [b for _ in range(3) for b in reference]  # three epochs of 6 batches
    first = loader()
    taken = [b for b in first]  # epoch 0, then 2 batches into epoch 1
    for batch in first:
        taken.append(batch)
        if len(taken) == 8:
            break
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a file
    assert (state["cursor"]["epoch"], state["cursor"]["position"]) == (1, 2)
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b for b in resumed] + [b for b in resumed]
    assert len(taken) + len(rest) == len(stream)
    for x, y in zip(taken + rest, stream):
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["video"], y["video"])


def test_a_state_saved_by_another_layout_of_ranks_goes_on_with_the_epoch(vp9_shards):
    """2 ranks x 2 clips read 2 batches (8 of 12 clips); 1 rank x 4 clips goes on at batch 2 of 3 in a fresh order
    for the rest of that epoch, and the next epoch reads every clip once."""
    two = [build_pretrain_loader(vp9_shards, batch_size=2, repeats=1, num_frames=2, crop_size=16, rank=r,
                                 world_size=2, seed=5) for r in range(2)]
    for loader in two:
        stream = iter(loader)
        next(stream), next(stream)
    state = two[0].state_dict()
    one = build_pretrain_loader(vp9_shards, batch_size=4, repeats=1, num_frames=2, crop_size=16, seed=5)
    one.load_state_dict(json.loads(json.dumps(state)))
    assert (one.cursor.epoch, one.cursor.position) == (0, 2) and len(one) == 3
    rest = [batch["label"].tolist() for batch in one]
    assert len(rest) == 1 and one.epoch == 1
    assert sorted(sum((b["label"].tolist() for b in one), [])) == list(range(12))  # epoch 1: each clip once


def test_the_route_gives_each_format_to_a_decoder_that_reads_it_on_this_gpu():
    """NVDEC's formats depend on the GPU (Video Codec SDK 13.0's NVDEC application note): AV1 decodes on GA10x, Ada
    and Blackwell, not on A100 (GA100) or H100/H200 (Hopper). What the main decoder cannot read goes to PyAV."""
    a100, a10, l4, h100, b200 = (8, 0), (8, 6), (8, 9), (9, 0), (10, 0)
    mixed = {"av1/yuv420p": 3, "h264/yuv420p": 5}
    assert choose_route("auto", {"h264/yuv420p": 5}, h100).name == "dali-gpu"
    for gpu in (a10, l4, b200):
        assert choose_route("auto", mixed, gpu).host is None, gpu
    for gpu in (a100, h100):
        route = choose_route("auto", mixed, gpu)
        assert (route.main.name, route.host.name, route.host_formats) == ("dali-gpu", "pyav", {"av1/yuv420p": 3})
        assert route.host_decoder_for("av1/yuv420p").name == "pyav" and route.host_decoder_for("h264/yuv420p") is None
        assert "cannot read av1/yuv420p (3 clips), 37.5% of the clips" in route.why and "--codec h264" in route.why
    with pytest.raises(ValueError, match=r"cannot read av1/yuv420p \(3 clips\) on this Hopper GPU .*decoder='auto'"):
        choose_route("dali-gpu", mixed, h100)
    assert choose_route("auto", {"h264/yuv444p": 1, "h264/yuv420p": 1}, h100).host_formats == {"h264/yuv444p": 1}
    # MJPEG is no NVDEC codec (it ended in "NVDEC is probably not available"); DALI's NVDEC decoders output NV12
    # (4:2:0) only: HEVC 4:4:4 (Turing on) and Blackwell's 4:2:2, which the hardware decodes, go to the host too
    for fmt, gpu in (("mjpeg/yuvj420p", h100), ("mjpeg", a10), ("hevc/yuv444p", h100), ("h264/yuv422p", b200),
                     ("hevc/yuv422p10le", b200)):
        route = choose_route("auto", {fmt: 1, "h264/yuv420p": 3}, gpu)
        assert (route.main.name, route.host_formats) == ("dali-gpu", {fmt: 1}), (fmt, gpu)
    assert choose_route("auto", {"hevc/yuv420p10le": 1, "h264/yuv420p10le": 1}, b200).host is None
    # on a CPU: DALI's decoder for the VP9 clips, PyAV for the H.264 ones of the same shards
    route = choose_route("auto", {"vp9/yuv420p": 5, "h264/yuv420p": 1}, None)
    assert (route.main.name, route.host.name) == ("dali-cpu", "pyav") and route.per_clip
    assert choose_route("auto", {"h264": 5}, None).name == "pyav"  # nothing for DALI's CPU decoder: PyAV alone
    assert choose_route("pyav", {"vp9": 1}, h100).why == "requested"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        choose_route("dali-gpu", {"vp9": 1}, None)
    with pytest.raises(ValueError, match="decoder='auto' decodes those clips with pyav"):
        choose_route("dali-cpu", {"hevc": 1}, None)
    with pytest.raises(ValueError, match="decoder must be one of"):
        choose_route("nvdec", {"hevc": 1}, None)


def test_shards_of_two_codecs_decode_each_clip_with_its_own_decoder(tmp_path):
    """The CPU twin of AV1 on an H100: VP9 clips through DALI's decoder, H.264 clips (which it cannot read) through
    PyAV, in the same batches, every frame the right one."""
    for i in range(6):
        os.makedirs(tmp_path / "videos" / f"c{i}")
        write_video(tmp_path / "videos" / f"c{i}" / "clip.mp4", frames=40, codec="libx264" if i % 3 == 0 else
                    "libvpx-vp9", seed=i)
    from tools import build_shards

    out = str(tmp_path / "shards")
    assert build_shards.main(["--root", str(tmp_path / "videos"), "--out", out, "--codec", "copy", "--workers",
                              "1"]) == 0
    loader = whole_frame_loader(out, batch_size=3, repeats=2, num_frames=5, stride=3, seed=1, decoder="auto")
    assert loader.route.name == "dali-cpu + pyav for h264/yuv420p"
    labels = []
    for batch in loader:
        for clip in pixels(batch["video"]):
            indices = [read_index(frame) for frame in clip]
            assert np.diff(indices).tolist() == [3, 3, 3, 3], indices
        labels += batch["label"][:3].tolist()
    assert sorted(labels) == list(range(6))


def test_a_torch_out_of_memory_error_is_not_taken_for_a_bad_video(vp9_shards, monkeypatch):
    """torch.OutOfMemoryError is a RuntimeError: caught as DALI's, it started the clip-by-clip repair and ended in
    'every clip is undecodable'. Only a failed DALI run is repaired; DALI's own out-of-memory says so."""
    from dali_pipes import batch_assembler
    from dali_pipes.dali_errors import DaliOutOfMemory, VideoDecodeError, classify

    def out_of_memory(self, feed, parts):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(batch_assembler.BatchAssembler, "__call__", out_of_memory)
    loader = build_pretrain_loader(vp9_shards, batch_size=2, repeats=1, num_frames=2, crop_size=16)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        next(iter(loader))
    assert loader.skipped == 0
    assert isinstance(classify(RuntimeError("Error in GPU operator `nvidia.dali.fn.resize` encountered:\nCUDA "
                                            "allocation failed: out of memory")), DaliOutOfMemory)
    assert isinstance(classify(RuntimeError("Failed to create video decoder")), VideoDecodeError)


def test_pyav_path_reads_h264_shards(tmp_path, caplog):
    shards = make_shards(tmp_path, n=4, codec="h264")
    with caplog.at_level(logging.INFO, logger="dali_pipes"):
        loader = build_pretrain_loader(shards, batch_size=2, repeats=1, num_frames=5, stride=3, crop_size=48,
                                       scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), flip=False)
    assert loader.route.name == "pyav" and "dali-cpu reads none of ['h264/yuv420p']" in caplog.text
    for batch in loader:
        for clip in pixels(batch["video"]):
            indices = [read_index(f) for f in clip]
            assert np.diff(indices).tolist() == [3, 3, 3, 3]


def test_a_corrupt_video_is_skipped_logged_and_counted(tmp_path, caplog):
    """A shard holding a truncated video (built by hand: the shard builder would have refused it)."""
    out = tmp_path / "shards"
    writer = ShardWriter(str(out), "train", max_bytes=10**9, max_count=0)
    for i in range(6):
        data = open(write_video(tmp_path / f"{i}.mp4", frames=40, codec="libvpx-vp9", seed=i), "rb").read()
        if i == 2:
            data = data[: len(data) // 3]  # truncated
        writer.write(f"clip{i}", {"mp4": data, "info": pack_info(i, 40, 30, 48, 64)}, {"codec": "vp9"})
    writer.close()
    (out / "manifest.json").write_text(json.dumps({"label_map": {}, "splits": {"train": {
        "samples": 6, "codecs": {"vp9": 6}, "shards": [{"tar": "train-000000.tar", "index": "train-000000.idx"}]}}}))
    loader = build_pretrain_loader(str(out), batch_size=3, repeats=2, num_frames=4, crop_size=16, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="dali_pipes"):
        batches = [b for b in loader]
    assert len(batches) == 2 and all(b["video"].shape == (6, 3, 4, 16, 16) for b in batches)
    assert loader.skipped == 1 and "clip2.mp4" in caplog.text
    labels = torch.cat([b["label"][:3] for b in batches]).tolist()
    assert 2 not in labels and sorted(set(labels)) == [0, 1, 3, 4, 5]
    assert loader.state_dict()["repair"] == {"skipped": 1}


CLASS_COLOURS = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220), (220, 40, 220)]


def test_a_bad_clip_in_shards_of_two_decoder_routes_never_mispairs_a_view(tmp_path):
    """H.264 clips (PyAV on the host on a CPU; AV1 beside H.264 on an H100) and VP9 clips (DALI's decoder) in the same
    batches, two VP9 clips cut short. A failed encoded part used to leave its decoded part's outputs in DALI, so the
    lane's next batch got the previous batch's views under its own labels (or 'Shapes do not match'). Each class is
    one colour: every view of every batch, over many epochs, must show its label's colour."""
    out = tmp_path / "shards"
    writer = ShardWriter(str(out), "train", max_bytes=10**9, max_count=0)
    for i in range(12):
        label, h264 = i % 6, i % 2 == 1
        path = write_video(tmp_path / f"{i}.mp4", frames=16, width=32, height=32, texture=CLASS_COLOURS[label],
                           indexed=False, codec="libx264" if h264 else "libvpx-vp9")
        data = open(path, "rb").read()
        if i in (2, 8):
            data = data[: len(data) // 3]  # a VP9 clip cut short: DALI's decoder fails its batch
        record = {"codec": "h264" if h264 else "vp9", "pix_fmt": "yuv420p"}
        writer.write(f"clip{i:02d}", {"mp4": data, "info": pack_info(label, 16, 30, 32, 32),
                                      "json": json.dumps(record).encode()}, record)
    writer.close()
    (out / "manifest.json").write_text(json.dumps({"label_map": {}, "splits": {"train": {
        "samples": 12, "codecs": {"vp9": 6, "h264": 6}, "formats": {"vp9/yuv420p": 6, "h264/yuv420p": 6},
        "shards": [{"tar": "train-000000.tar", "index": "train-000000.idx"}]}}}))
    loader = build_pretrain_loader(str(out), batch_size=4, repeats=2, num_frames=4, stride=2, crop_size=16, seed=3)
    assert loader.route.name == "dali-cpu + pyav for h264/yuv420p"
    epochs, batches = 6, 0
    for _ in range(epochs):
        for batch in loader:
            batches += 1
            colours = pixels(batch["video"]).reshape(len(batch["label"]), -1, 3).mean(1)
            expected = np.array(CLASS_COLOURS)[batch["label"].numpy()]
            assert np.abs(colours - expected).max() < 30, (batches, batch["label"].tolist(), colours.round())
    assert batches == epochs * 3 and loader.skipped == epochs * 2


def test_eval_views_positions(tmp_path):
    """192x64 frames, a brightness ramp left to right: crops come out left, centre, right; clips spread in time."""
    shards = make_shards(tmp_path, n=2, frames=90, width=192, height=64, texture="gradient", split="val")
    loader = build_eval_loader(shards, batch_size=2, clips=3, crops=3, num_frames=4, stride=4, crop_size=64)
    batch = next(iter(loader))
    assert batch["video"].shape == (18, 3, 4, 64, 64) and batch["video_index"].tolist() == [0] * 9 + [1] * 9
    views = pixels(batch["video"][:9])
    brightness = views[:, :, 16:].mean(axis=(1, 2, 3, 4)).reshape(3, 3)  # below the index blocks
    assert np.all(np.diff(brightness, axis=1) > 30)  # left < centre < right, for each clip
    starts = [read_index(views[3 * k, 0]) for k in range(3)]  # the left crop holds the index blocks
    assert starts == [0, 38, 77]  # 90 frames, a 13-frame clip: starts 0 .. 77, evenly


def test_rand_augment_changes_each_view_alike_over_its_frames(tmp_path):
    """Square frames, crops of the whole frame, no flips: without RandAugment two loaders give the same views, so
    what differs with it is RandAugment's, and one view's frames get the same ops (the index blocks aside)."""
    shards = make_shards(tmp_path, n=4, frames=40, width=48, height=48, texture="gradient")
    fixed = dict(batch_size=4, repeats=2, num_frames=4, crop_size=48, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False,
                 shuffle=False)
    plain = [next(iter(build_pretrain_loader(shards, **fixed)))["video"] for _ in range(2)]
    assert torch.equal(plain[0], plain[1])
    augmented = next(iter(build_pretrain_loader(shards, rand_augment=(2, 9), **fixed)))["video"]
    assert augmented.shape == plain[0].shape == (8, 3, 4, 48, 48)
    below_blocks = (augmented - plain[0])[..., 16:, :].abs().mean(dim=(1, 3, 4))  # [views, frames]
    changed = below_blocks.amax(dim=1) > 0.05
    assert changed.sum() >= 4, below_blocks  # most views (an op drawn may change a gradient next to nothing)
    # the same ops on every frame of a view: its frames changed alike (a shift moves the index blocks a little)
    assert torch.all(below_blocks[changed].amin(dim=1) > 0.3 * below_blocks[changed].amax(dim=1)), below_blocks


def test_each_rank_takes_its_share_of_the_node_once(monkeypatch):
    """srun binds each of 8 tasks to 12 of a node's 96 CPUs: the share was divided again by the 8 processes per
    node, leaving 1 thread. A process allowed on the whole node still shares it with the node's other ranks."""
    from dali_pipes.config import default_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12, 24)))  # bound by the launcher
    assert default_threads(8) == 12 and default_threads(1) == 12
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))  # the whole node
    assert default_threads(8) == 12 and default_threads(1) == 96


def test_bad_arguments_fail_early_and_clearly(tmp_path, vp9_shards):
    with pytest.raises(FileNotFoundError, match="no shards folder"):
        build_pretrain_loader(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="batch_size 7 is larger than the 6 samples"):
        build_pretrain_loader(vp9_shards, batch_size=7, world_size=2)
    with pytest.raises(ValueError, match="has no 'val' split"):
        build_eval_loader(vp9_shards)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(vp9_shards):
        if not name.endswith(".idx") and not name.startswith("."):
            os.symlink(os.path.join(vp9_shards, name), broken / name)
    with pytest.raises(FileNotFoundError, match="train-000000.idx: missing"):
        build_pretrain_loader(str(broken))


def hand_made_shards(tmp_path, clips: dict, split="train"):
    """Shards written directly (bypassing the builder's checks): {key: (video bytes, label, frames claimed)}."""
    out = tmp_path / "shards"
    writer = ShardWriter(str(out), split, max_bytes=10**9, max_count=0)
    for key, (data, label, frames) in clips.items():
        writer.write(key, {"mp4": data, "info": pack_info(label, frames, 30, 48, 64)}, {"codec": "vp9"})
    writer.close()
    (out / "manifest.json").write_text(json.dumps({"label_map": {}, "splits": {split: {
        "samples": len(clips), "codecs": {"vp9": len(clips)},
        "shards": [{"tar": f"{split}-000000.tar", "index": f"{split}-000000.idx"}]}}}))
    return str(out)


def test_frames_past_what_the_decoder_counts_repeat_the_last_frame(tmp_path):
    """Clips that decode 40 frames but claim 60: frames past 39 must repeat frame 39, never come out black."""
    clips = {f"clip{i}": (open(write_video(tmp_path / f"{i}.mp4", frames=40, codec="libvpx-vp9", seed=i), "rb").read(),
                          i, 60) for i in range(4)}
    loader = whole_frame_loader(hand_made_shards(tmp_path, clips), batch_size=4, repeats=1, num_frames=8, stride=4)
    late = 0
    for clip in pixels(next(iter(loader))["video"]):  # starts anywhere in 0 .. 31, so frames up to 59
        expected = [min(39, i) for i in range(read_index(clip[0]), read_index(clip[0]) + 29, 4)]
        assert [read_index(f) for f in clip] == expected
        late += sum(i == 39 for i in expected)
        assert clip[-1][8:].mean() == pytest.approx(clip[0][8:].mean(), abs=3)  # the scene, not a black frame
    assert late > 0


def striped_clip(path, width=384, height=288, frames=8):
    """Vertical stripes 2 px wide: resampled 6x smaller without a filter, they alias into a strong pattern."""
    import av

    image = np.zeros((height, width, 3), np.uint8)
    image[:, (np.arange(width) // 2) % 2 == 0] = 255
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx-vp9", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "4", "b": "0"}
        for _ in range(frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return open(path, "rb").read()


def test_downscaled_crops_are_antialiased(tmp_path, monkeypatch):
    from dali_pipes import sampling

    assert not sampling.needs_antialias(np.array([0, 0, 1, 1]), 256, 320, 224)  # 256p shards to 224: 1.4x
    assert sampling.needs_antialias(np.array([0, 0, 1, 1]), 1080, 1920, 224)  # HD copy-shards: 8.6x
    data = striped_clip(tmp_path / "stripes.webm")
    out = tmp_path / "shards"
    writer = ShardWriter(str(out), "val", max_bytes=10**9, max_count=0)
    writer.write("stripes", {"webm": data, "info": pack_info(0, 8, 30, 288, 384)}, {"codec": "vp9"})
    writer.close()
    (out / "manifest.json").write_text(json.dumps({"label_map": {}, "splits": {"val": {
        "samples": 1, "codecs": {"vp9": 1}, "shards": [{"tar": "val-000000.tar", "index": "val-000000.idx"}]}}}))

    def contrast():
        loader = build_eval_loader(str(out), batch_size=1, clips=1, crops=1, num_frames=2, crop_size=48)
        return pixels(next(iter(loader))["video"])[0].astype(float).std()

    filtered = contrast()
    monkeypatch.setattr(sampling, "ANTIALIAS_ABOVE", 1e9)  # what the loader did before: never filter
    aliased = contrast()
    assert filtered < 10 and aliased > 4 * filtered, (filtered, aliased)  # stripes average to flat grey


def test_damaged_shards_are_named_and_can_be_left_out(tmp_path, vp9_shards, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(vp9_shards, copy)
    tars = sorted(p for p in os.listdir(copy) if p.endswith(".tar"))  # 12 clips: shards of 5, 5 and 2
    with open(copy / tars[0], "r+b") as f:  # a copy to the cluster that stopped half way
        f.truncate(os.path.getsize(copy / tars[0]) // 2)
    os.remove(copy / tars[2].replace(".tar", ".idx"))
    with pytest.raises(FileNotFoundError) as err:
        build_pretrain_loader(str(copy), batch_size=2)
    message = str(err.value)
    assert "2 of the 3 'train' shards" in message and "cut short" in message and "Copy them again" in message
    assert tars[0] in message and tars[2].replace(".tar", ".idx") + ": missing" in message
    with caplog.at_level(logging.WARNING, logger="dali_pipes"):
        loader = build_pretrain_loader(str(copy), batch_size=1, repeats=1, num_frames=4, crop_size=16,
                                       skip_damaged_shards=True)
    assert loader.members[0].shards.num_samples == 5 and "training WITHOUT 2 damaged 'train' shards (7 of 12 clips" in caplog.text
    labels = sorted(int(b["label"][0]) for b in loader)
    assert len(labels) == 5 and len(set(labels)) == 5


@pytest.mark.parametrize("codec,build", [("vp9", "copy"), ("h264", "copy"), ("vp9", "vp9")])
def test_phone_videos_come_out_upright(tmp_path, codec, build):
    """A clip stored 64x48 with a 90-degree flag is displayed 48x64: copy shards record the flag and the loader
    turns the views (after the crop, on the small square); re-encoded shards hold upright pixels already."""
    from dali_pipes.decoders.pyav import decode_frames
    from tools import build_shards

    os.makedirs(tmp_path / "videos" / "c0")
    source = write_video(tmp_path / "videos" / "c0" / "phone.mp4", frames=20, codec={"vp9": "libvpx-vp9",
                         "h264": "libx264"}[codec], rotation=90)
    out = tmp_path / "shards"
    assert build_shards.main(["--root", str(tmp_path / "videos"), "--out", str(out), "--codec", build,
                              "--short-side", "0", "--workers", "1"]) == 0
    assert unpack_info_of(out)["rotation"] == (90 if build == "copy" else 0)
    loader = build_pretrain_loader(str(out), batch_size=1, repeats=1, num_frames=1, stride=1, crop_size=32,
                                   scale=(1.0, 1.0), ratio=(48 / 64, 48 / 64), flip=False, shuffle=False)
    batch = next(iter(loader))
    got = pixels(batch["video"])[0, 0].astype(float)  # [32, 32, 3], the first frame sampled
    stored = decode_frames(open(source, "rb").read(), np.arange(20))[read_index(np.rot90(got, k=1))]

    def as_view(frame):
        video = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
        return torch.nn.functional.interpolate(video, size=(32, 32), mode="bilinear", antialias=True)[0].permute(
            1, 2, 0).numpy()

    upright, sideways = as_view(np.rot90(stored, k=-1)), as_view(stored)  # k=-1: clockwise
    assert np.abs(got - upright).mean() < 12 < np.abs(got - sideways).mean()
    assert np.abs(got - as_view(np.rot90(stored, k=1))).mean() > 12  # and not turned the wrong way


def unpack_info_of(shards) -> dict:
    import tarfile

    from dali_pipes.shard_format import unpack_info

    with tarfile.open(next(shards.glob("train-*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".info"))
        return unpack_info(tar.extractfile(member).read())


class ConstantFrames(HostDecoder):
    """A toy backend written outside dali_pipes: every frame mid-grey, whatever the clip."""

    name = "constant"

    def frames(self, encoded, indices):
        return np.full((len(indices), 48, 64, 3), 100, np.uint8)


def test_a_new_decoder_backend_plugs_in_without_touching_the_loader(vp9_shards):
    loader = build_pretrain_loader(vp9_shards, batch_size=2, repeats=2, num_frames=4, crop_size=16,
                                   decoder=ConstantFrames())
    assert loader.route.name == "constant"
    seen = 0
    for batch in loader:
        assert batch["video"].shape == (4, 3, 4, 16, 16)
        assert np.all(np.abs(pixels(batch["video"]).astype(int) - 100) <= 1)
        seen += 1
    assert seen == len(loader) == 6


def test_the_shuffle_buffer_holds_at_most_a_ranks_part_of_the_set(tmp_path, caplog):
    """A larger buffer shuffles no better, and DALI fills it before the first batch by reading the set round again."""
    shards = make_shards(tmp_path, n=10, frames=24)
    with caplog.at_level(logging.INFO, logger="dali_pipes"):
        loader = build_pretrain_loader(shards, batch_size=2, repeats=1, num_frames=2, crop_size=16, num_threads=1,
                                       world_size=3, rank=2)
    split = loader.members[0].shards
    assert split.rank_sizes(3) == [3, 3, 4]
    assert [split.shuffle_fill(n, 3) for n in (1024, 4, 2)] == [4, 4, 2]
    assert "shuffle buffer: 4 clips" in caplog.text and "shuffle_buffer=1024" in caplog.text
