"""Small generated videos for the tests. Frames carry their own index as 8 black/white blocks (binary), which
survives lossy codecs, so a test can read back exactly which source frames a pipeline returned.

`make test` runs the suite in pytest-xdist workers, each pinned here to its own share of the cores: a test's
trainers, DALI pipelines and the processes it starts all size themselves from the cores they may run on, so two
workers never oversubscribe a machine. Tests marked `long` are dealt out among the workers and start first."""

import os
import pathlib
import shutil

import trainer.openmp  # noqa: F401  (first: OpenMP reads how its threads wait when torch loads it)
import av
import numpy as np
import pytest
from filelock import FileLock

from tools import build_shards
from tools.bench.loopback_store import free_port  # noqa: F401  (the tests' too)

BLOCK = 8  # pixels per bit block
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "CROSS_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def process_env(**variables) -> dict:
    """This environment without any launcher's variables (an in-process trainer start writes torch's), plus
    `variables`, for a process a test starts as a launcher would."""
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith(("SLURM_", "OMPI_",
                                                                                                      "PMI_", "MV2_"))}
    return {**clean, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in variables.items()}}


def indexed_frames(frames: int, width: int = 64, height: int = 48, seed: int = 0, texture: str = "noise",
                   indexed: bool = True) -> np.ndarray:
    """[frames, H, W, 3] uint8 over a static background (texture "noise"; "gradient": brightness grows with x; an
    (R, G, B) tuple: that one colour); if indexed, rows 0..BLOCK-1 hold the frame index in 8 binary blocks."""
    if texture == "noise":
        background = np.random.default_rng(seed).integers(60, 200, (height, width, 3), dtype=np.uint8)
    elif isinstance(texture, tuple):
        background = np.broadcast_to(np.array(texture, np.uint8), (height, width, 3))
    else:
        background = np.broadcast_to(np.linspace(20, 235, width, dtype=np.uint8)[None, :, None], (height, width, 3))
    video = np.repeat(background[None], frames, axis=0)
    for t in range(frames if indexed else 0):
        for bit in range(8):
            video[t, :BLOCK, bit * BLOCK:(bit + 1) * BLOCK] = 255 if (t >> bit) & 1 else 0
    return video


def read_index(frame: np.ndarray, source_width: int = 64) -> int:
    """The index written by indexed_frames into a source_width-wide clip, from an [H, W, 3] frame of it resized
    (uniformly) to any size."""
    scale = frame.shape[1] / source_width
    index = 0
    for bit in range(8):
        x = int((bit + 0.5) * BLOCK * scale)
        if frame[int(BLOCK * scale / 2), x].mean() > 128:
            index |= 1 << bit
    return index


ENCODER_OPTIONS = {"libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0"},
                   "libsvtav1": {"preset": "12"}, "libx265": {"x265-params": "log-level=none"}}


def write_video(path, frames=40, codec="libx264", width=64, height=48, fps=30, seed=0, audio=False,
                texture="noise", indexed=True, gop=8, pix_fmt=None, rotation=0):
    """A clip from indexed_frames in the container its extension names; codec libx264 | libvpx-vp9 | mjpeg |
    libsvtav1 (AV1) | libx265 (HEVC) | mpeg4 (MPEG-4 part 2); audio adds an AAC track. rotation (0, 90, 180, 270)
    flags it as a phone does: the degrees clockwise that turn the stored frames upright (a portrait phone clip: 90)."""
    video = indexed_frames(frames, width, height, seed, texture, indexed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt or ("yuvj420p" if codec == "mjpeg" else "yuv420p")
        stream.options = dict(ENCODER_OPTIONS.get(codec, {}))
        if codec != "mjpeg":
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(-rotation)  # PyAV takes (and VideoFrame.rotation reads) counter-clockwise
        sound = out.add_stream("aac", rate=16000) if audio else None
        for frame in video:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
        if sound:
            out.mux(sound.encode(None))
    return str(path)


def write_cut_clip(path, frames=30, gop=5, codec="libvpx-vp9"):
    """A clip cut out of a longer one without re-encoding: the packet of its first keyframe is missing, so frames
    1 .. gop-1 reference a frame it does not hold. With libvpx-vp9 (no B-frames) they are the packets before the next
    keyframe; with libx265 (an open GOP) they follow that keyframe in decode order but are displayed before it.
    The container is the one the extension names: mp4, mov, mkv or webm."""
    whole = os.path.join(os.path.dirname(str(path)), "whole.mp4")  # mp4 gives every packet its decode time
    write_video(whole, frames, codec=codec, gop=gop)
    with av.open(whole) as source, av.open(str(path), "w") as out:
        stream = source.streams.video[0]
        copy = out.add_stream_from_template(stream, opaque=True)  # the decoder's codec (libdav1d for AV1)
        for number, packet in enumerate(p for p in source.demux(stream) if p.size):
            if number:
                packet.stream = copy
                out.mux(packet)
    os.remove(whole)
    return str(path)


def write_audio_only(path):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return str(path)


@pytest.fixture
def bad_videos(tmp_path):
    """One file per skip reason the shard builder must recognise: {reason: path}."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good = write_video(folder / "good_for_truncation.mp4", frames=60)
    data = open(good, "rb").read()
    os.remove(good)
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "text.mp4").write_text("this is not a video\n" * 50)
    (folder / "empty.mp4").write_bytes(b"")
    return {
        "truncated": str(folder / "truncated.mp4"),
        "not_a_video": str(folder / "text.mp4"),
        "empty": str(folder / "empty.mp4"),
        "no_video_stream": write_audio_only(folder / "audio.mp4"),
        "too_short": write_video(folder / "two_frames.mp4", frames=2),
    }


CODECS = {"vp9": "libvpx-vp9", "h264": "libx264"}


def make_shards(root, n=12, codec="vp9", frames=80, split="train", **video):
    """n clips, one per class c00, c01, ... (so a clip's label is its id), stored as they are (copy)."""
    for i in range(n):
        os.makedirs(root / "videos" / f"c{i:02d}", exist_ok=True)
        write_video(root / "videos" / f"c{i:02d}" / "clip.mp4", frames=frames, codec=CODECS[codec], seed=i, **video)
    out = root / "shards"
    assert build_shards.main(["--root", str(root / "videos"), "--out", str(out), "--split", split, "--codec", "copy",
                              "--max-per-shard", "5", "--min-frames", "2", "--workers", "1"]) == 0
    return str(out)


MAX_WORKERS = 4  # beyond it, the suite's few long tests bound its time, not the cores


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core, at most MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def pytest_configure(config):
    """In worker `gwI` of N: pin the process to the I-th of N equal shares of the cores (what it starts inherits it)."""
    config.addinivalue_line("markers", "long: one of the suite's longest tests (started first)")
    config.addinivalue_line("markers", "learning: needs a long pretraining (make demo-learns; pytest -m learning)")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    cores = sorted(os.sched_getaffinity(0))
    if worker and count > 1 and len(cores) >= count:
        index = int(worker.removeprefix("gw"))
        os.sched_setaffinity(0, cores[index::count])


def pytest_collection_modifyitems(items):
    """Long tests first, dealt out among the workers: pytest-xdist's worksteal hands worker i the i-th contiguous
    share of the collection (remaining // workers left), and idle workers steal from the end of the others' shares,
    so each share starts with its own long tests and the short ones balance the rest."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    long = [item for item in items if item.get_closest_marker("long")]
    short = [item for item in items if not item.get_closest_marker("long")]
    ordered, left = [], len(items)
    for i in range(workers):
        share = left // (workers - i)
        mine = long[i::workers]
        ordered += mine + short[:share - len(mine)]
        short, left = short[share - len(mine):], left - share
    items[:] = ordered + short


def once_per_run(tmp_path_factory, name: str, build) -> pathlib.Path:
    """The folder `name`, filled by build(folder) once per test run: by the first worker that needs it, while any
    other waits for it (pytest-xdist's workers share the run's base folder)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with FileLock(f"{folder}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The README's demo data set (tools/make_demo_data.py) with 3 / 1 / 1 clips per class in its pretrain / train /
    val splits (and the real clips in pretrain), built once per test run: its shards folder."""
    from tools import make_demo_data

    def build(out):
        assert make_demo_data.main(["--out", str(out), "--pretrain-per-class", "3", "--train-per-class", "1",
                                    "--val-per-class", "1", "--workers", str(len(os.sched_getaffinity(0)))]) == 0

    return str(once_per_run(tmp_path_factory, "demo", build) / "shards")
