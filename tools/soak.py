"""Soak test: many epochs, and nothing may grow. About 3 minutes on 2 CPU cores with the defaults.

    python tools/soak.py --out /tmp/soak                  # generated shards with a corrupt clip, then the demo run
    python tools/soak.py --out /tmp/soak --shards demo_data/shards --epochs 50 --train-steps 0

1. The pretraining loader runs --epochs epochs over shards that hold a corrupt clip (so every epoch repairs a batch)
   and reports, after each epoch, the process's resident memory, open file descriptors and threads.
2. A demo pretraining (trainer/pretrain.py, tiny_PT) runs --train-steps steps in a child process whose resident
   memory and descriptors are sampled every second.
Verdict: after the warm-up resident memory may grow by less than 5%, and descriptors not at all, from the first third
of the rest to the last third (medians). Exits 1 if either grows more. The loader's warm-up is the first quarter of
the epochs: its main pipelines fill their buffers and DALI's pools in the first epoch, but the repair's side pipeline
runs once an epoch (one bad clip) and takes about 20 epochs to see its largest shapes (measured over 400 epochs:
flat after that, 470-520 MB).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import trainer.openmp  # noqa: E402,F401  (before torch: OpenMP reads how its threads wait when it loads)

RSS_GROWTH_LIMIT = 0.05


def usage(pid: int | str = "self") -> dict:
    """Resident memory (MB), open descriptors and threads of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"])}


def soak_shards(folder: str, clips: int = 24) -> str:
    """Generated VP9 shards of `clips` clips, one of them corrupt (a video the decoder rejects every epoch)."""
    import av

    from dali_pipes.shard_format import pack_info
    from tools.shard_building.shard_writer import ShardWriter

    out = os.path.join(folder, "shards")
    writer = ShardWriter(out, "train", max_bytes=10**9, max_count=8)
    rng = np.random.default_rng(0)
    records = []
    for i in range(clips):
        path = os.path.join(folder, f"{i}.webm")
        with av.open(path, "w") as container:
            stream = container.add_stream("libvpx-vp9", rate=30)
            stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
            for t in range(48):
                frame = np.roll(rng.integers(0, 255, (64, 96, 3), np.uint8), t, axis=1)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))
        data = open(path, "rb").read()
        if i == clips // 2:  # its header kept, the rest garbage
            data = data[:200] + bytes(len(data) - 200)
        writer.write(f"clip{i}", {"webm": data, "info": pack_info(i % 4, 48, 30, 64, 96)}, {"codec": "vp9"})
    writer.close()
    for shard in writer.committed:
        records.append({"tar": shard["tar"], "index": shard["index"], "samples": len(shard["samples"]),
                        "bytes": shard["bytes"]})
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"label_map": {str(c): c for c in range(4)}, "splits": {"train": {
            "samples": clips, "codecs": {"vp9": clips}, "shards": records}}}, f)
    return out


def growth(rows: list[dict]) -> tuple[float, int]:
    """(relative resident-memory growth, descriptor growth) from the first third of the rows to the last third,
    each a median: a slow leak shows, a transient (a file open while a checkpoint is written, a buffer freed a
    moment later) does not."""
    third = max(1, len(rows) // 3)

    def median(part, key):
        return float(np.median([r[key] for r in part]))

    early, late = rows[:third], rows[-third:]
    return median(late, "rss_mb") / median(early, "rss_mb") - 1, round(median(late, "fds") - median(early, "fds"))


def loader_growth(rows: list[dict]) -> tuple[float, int]:
    """growth() of the loader's epochs after its warm-up, the first quarter of them (see the docstring)."""
    return growth(rows[max(1, len(rows) // 4):])


def soak_loader(shards: str, epochs: int, batch_size: int) -> list[dict]:
    from dali_pipes import build_pretrain_loader

    loader = build_pretrain_loader(shards, batch_size=batch_size, repeats=4, num_frames=16, stride=2, crop_size=64)
    rows = []
    for epoch in range(epochs):
        start = time.perf_counter()
        batches = sum(1 for _ in loader)
        rows.append({"epoch": epoch, "batches": batches, "seconds": round(time.perf_counter() - start, 2),
                     "skipped": loader.skipped, **usage()})
        print("loader  " + "  ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    loader.close()
    return rows


def soak_training(shards: str, steps: int, out: str) -> list[dict]:
    """The demo pretraining for `steps` steps in a child process, sampled every second (rows: each epoch's last)."""
    run_dir = os.path.join(out, "run")
    command = [sys.executable, os.path.join(ROOT, "trainer", "pretrain.py"), "--ds_config",
               os.path.join(ROOT, "ds_configs", "cpu.json"), "--recipe", "tiny_PT", "--data", shards, "--output",
               run_dir, "--max-steps", str(steps), "checkpoint_every=100", "image_every=0"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, errors = [], []
    threading.Thread(target=lambda: errors.append(child.stderr.read()), daemon=True).start()
    while child.poll() is None:
        try:
            samples.append({"t": round(time.perf_counter(), 1), **usage(child.pid)})
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(1.0)
    if child.wait() != 0:
        raise RuntimeError(f"the training run failed: {''.join(errors)[-2000:]}")
    steps_seen = [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    start, end = samples[0]["t"], samples[-1]["t"]
    for row in samples:  # the step reached at each sample, by linear interpolation over the run's wall time
        row["step"] = round(steps_seen[-1] * (row["t"] - start) / max(1e-9, end - start))
    print(f"training: {len(samples)} samples over {end - start:.0f} s, {steps_seen[-1]} steps", flush=True)
    return samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a scratch folder")
    p.add_argument("--shards", help="shards to soak the loader on (default: generated, with a corrupt clip)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=680, help="demo pretraining steps (0: skip that part)")
    p.add_argument("--demo-shards", default=os.path.join(ROOT, "demo_data", "shards"),
                   help="shards for the training part (make demo builds them)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.train_steps and not os.path.isfile(os.path.join(args.demo_shards, "manifest.json")):
        # (before the loader's part, not after it: the training part needs them)
        from tools import make_demo_data

        demo = os.path.dirname(os.path.abspath(args.demo_shards))
        print(f"the training part needs the demo shards, not in {args.demo_shards}: building them into {demo} first "
              "(tools/make_demo_data.py, about 10 s)", flush=True)
        if make_demo_data.main(["--out", demo]) != 0 or not os.path.isfile(os.path.join(args.demo_shards,
                                                                                         "manifest.json")):
            p.error(f"could not build the demo shards into {args.demo_shards}: give --demo-shards, or --train-steps 0")
    shards = args.shards or soak_shards(args.out)
    verdicts = {}
    rows = soak_loader(shards, args.epochs, args.batch_size)
    verdicts["loader"] = loader_growth(rows)
    if args.train_steps:
        samples = soak_training(args.demo_shards, args.train_steps, args.out)
        verdicts["training"] = growth(samples[len(samples) // 10:])  # after the first tenth (start-up, first epoch)
    failed = False
    for part, (rss, fds) in verdicts.items():
        ok = rss < RSS_GROWTH_LIMIT and fds <= 0
        failed |= not ok
        print(f"{part}: resident memory grew {100 * rss:+.1f}% and descriptors {fds:+d} after warm-up: "
              f"{'PASS' if ok else 'FAIL'} (limits: +{100 * RSS_GROWTH_LIMIT:.0f}%, +0)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
