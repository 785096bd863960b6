"""Builds an offline Something-Something-v2-shaped demo set: webm VP9 clips at 12 fps whose class is the direction an
object moves (a mirrored pair among them, which a model trained with flips could not tell apart), the official label
files' layout, and shards built from them by tools/build_shards.py --ssv2. About 20 s on 2 cores.

    python tools/make_ssv2_demo.py --out ssv2_demo
    -> ssv2_demo/labels/something-something-v2-{labels,train,validation,test}.json, ssv2_demo/videos/<id>.webm,
       ssv2_demo/shards/
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools import build_shards  # noqa: E402
from tools.make_demo_data import write_video  # noqa: E402
from tools.shard_building.video_sources import SSV2_FILES, SSV2_LABELS, ssv2_class  # noqa: E402

# real SSv2 templates; velocity (x, y) in pixels per frame. Left-to-right and right-to-left are mirror images.
TEMPLATES = {
    "Pushing [something] from left to right": (1, 0),
    "Pushing [something] from right to left": (-1, 0),
    "Moving [something] up": (0, -1),
    "Moving [something] down": (0, 1),
}
MIRRORED_PAIR = ("Pushing something from left to right", "Pushing something from right to left")
THINGS = ["a red block", "a blue cup", "a green ball", "a yellow box"]
FPS, HEIGHT = 12, 96  # SSv2 clips are 12 fps and 240 px high; smaller here, for CPUs


def clip(velocity, rng: np.random.Generator) -> np.ndarray:
    """[frames, HEIGHT, width, 3] uint8: a coloured object crossing a static texture along `velocity`."""
    frames, width = int(rng.integers(30, 49)), int(rng.choice([112, 128, 144]))
    yy, xx = np.mgrid[0:HEIGHT, 0:width]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.15)
    background = (rng.uniform(50, 120, 3) + 35 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq)[..., None]
                  + rng.normal(0, 6, (HEIGHT, width, 3))).clip(0, 255)
    speed, size, colour = rng.uniform(1.6, 2.4), int(rng.integers(16, 24)), rng.uniform(160, 255, 3)
    travel = np.array(velocity) * speed * (frames - 1)
    start = np.array([rng.uniform(size, width - size), rng.uniform(size, HEIGHT - size)])
    start = np.where(travel > 0, size, np.where(travel < 0, np.array([width, HEIGHT]) - size, start))
    video = np.empty((frames, HEIGHT, width, 3), np.uint8)
    for t in range(frames):
        cx, cy = start + np.array(velocity) * speed * t
        frame = background.copy()
        frame[(np.abs(xx - cx) < size / 2) & (np.abs(yy - cy) < size / 2)] = colour
        video[t] = frame
    return video


def write_webm(path: str, video: np.ndarray) -> None:
    # a fixed speed and one thread: the same encoded frames every build (realtime at +8 adapts to the clock)
    write_video(path, video, "libvpx-vp9", FPS, {"deadline": "realtime", "cpu-used": "-8", "crf": "30", "b": "0"}, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for labels/, videos/ and shards/")
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--test", type=int, default=4, help="unlabelled test clips")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    labels_dir, videos_dir = os.path.join(args.out, "labels"), os.path.join(args.out, "videos")
    os.makedirs(labels_dir, exist_ok=True)
    os.makedirs(videos_dir, exist_ok=True)
    rng, entries, next_id = np.random.default_rng(0), {"train": [], "val": [], "test": []}, 1000
    for template, velocity in TEMPLATES.items():
        for i in range(args.train_per_class + args.val_per_class):
            thing = THINGS[int(rng.integers(len(THINGS)))]
            write_webm(os.path.join(videos_dir, f"{next_id}.webm"), clip(velocity, rng))
            entries["train" if i < args.train_per_class else "val"].append({
                "id": str(next_id), "label": template.replace("[something]", thing).lower(), "template": template,
                "placeholders": [thing]})
            next_id += 1
    for _ in range(args.test):
        write_webm(os.path.join(videos_dir, f"{next_id}.webm"), clip(list(TEMPLATES.values())[next_id % 4], rng))
        entries["test"].append({"id": str(next_id)})
        next_id += 1
    with open(os.path.join(labels_dir, SSV2_LABELS), "w") as f:  # class name -> index as a string, as released
        json.dump({ssv2_class(t): str(i) for i, t in enumerate(TEMPLATES)}, f, indent=1)
    for split, name in SSV2_FILES.items():
        with open(os.path.join(labels_dir, name), "w") as f:
            json.dump(entries[split], f, indent=1)
    print(f"wrote {sum(map(len, entries.values()))} clips and the label files to {args.out}")
    return build_shards.main(["--ssv2", labels_dir, "--videos", videos_dir, "--out", os.path.join(args.out, "shards"),
                              "--codec", "copy", "--max-per-shard", "32", "--workers", str(args.workers)])


if __name__ == "__main__":
    sys.exit(main())
