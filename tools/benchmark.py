"""Throughput benchmark: our loader against what users would run instead and against the decoding ceiling, in
one run, on the same shards and cores.

    python tools/benchmark.py loader --shards demo_data/shards
    python tools/benchmark.py all --shards demo_data/shards --json bench.json

Modes:
    loader        the DALI pretraining loader, per decoder path available here, for R = 1, 2, 4 views per clip
    baselines     a hand-written PyTorch DataLoader (PyAV, just the needed frames, torch augmentation) and the
                  mae_st way (decode the whole video, then cut the R clips), both with R = 4
    decode-limit  DALI decoding the same frames and nothing else, batches read beforehand: the loader's ceiling
    all           everything, then which part limits throughput
Each measurement runs in its own process (clean peak memory), warms up, then times `--reps` runs of `--batches`
batches; the table gives the median and the spread (min-max) of those runs. Ratios compare measurements of this run.
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time

PRESETS = {  # small: the CPU demo shards in about a minute per mode; full: real hardware
    "small": dict(batch_size=4, num_frames=16, stride=4, crop_size=112, batches=6, warmup=2, reps=3),
    "full": dict(batch_size=8, num_frames=16, stride=4, crop_size=224, batches=30, warmup=5, reps=5),
}


# --- measurements (each runs in a child process) --------------------------------------------------------------------


def _time_batches(next_batch, batches: int, warmup: int, reps: int) -> list[float]:
    """Seconds per rep of `batches` calls, after `warmup` calls."""
    for _ in range(warmup):
        next_batch()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(batches):
            next_batch()
        times.append(time.perf_counter() - start)
    return times


def _repeat(loader):
    while True:
        yield from loader


def measure_loader(cfg: dict, decoder: str, repeats: int) -> list[float]:
    from dali_pipes import build_pretrain_loader

    loader = build_pretrain_loader(cfg["shards"], batch_size=cfg["batch_size"], repeats=repeats,
                                   num_frames=cfg["num_frames"], stride=cfg["stride"], crop_size=cfg["crop_size"],
                                   decoder=decoder, num_threads=cfg["workers"], split=cfg["split"])
    stream = _repeat(loader)
    seconds = _time_batches(lambda: next(stream), cfg["batches"], cfg["warmup"], cfg["reps"])
    loader.close()
    return seconds


def measure_baseline(cfg: dict, whole_video: bool, repeats: int) -> list[float]:
    from dali_pipes.sampling import ViewSpec
    from dali_pipes.shard_set import open_shard_set
    from tools.baseline_loaders import build_baseline_loader

    spec = ViewSpec(num_frames=cfg["num_frames"], stride=cfg["stride"], repeats=repeats, crop_size=cfg["crop_size"])
    loader = build_baseline_loader(open_shard_set(cfg["shards"], cfg["split"]).tars, spec, cfg["batch_size"],
                                   cfg["workers"], whole_video)
    stream = iter(loader)
    seconds = _time_batches(lambda: next(stream), cfg["batches"], cfg["warmup"], cfg["reps"])
    stream._shutdown_workers()  # the documented way out of a persistent-worker DataLoader is not having one
    return seconds


def measure_decode_limit(cfg: dict, decoder: str) -> list[float]:
    """Decoding alone, of the loader's own reads and frame plans prepared beforehand; outputs never copied out."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    from dali_pipes.pyav_decoder import decode_frames
    from dali_pipes.reader import ShardReader
    from dali_pipes.sampling import ViewSpec, plan_train_sample
    from dali_pipes.shard_format import unpack_info
    from dali_pipes.shard_set import open_shard_set

    shards = open_shard_set(cfg["shards"], cfg["split"])
    reader = ShardReader(shards, cfg["batch_size"], 0, 1, 0, True, 1024, cfg["workers"])
    spec = ViewSpec(num_frames=cfg["num_frames"], stride=cfg["stride"], repeats=1, crop_size=cfg["crop_size"])
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(min(cfg["batches"], 16)):  # recycled: enough distinct batches to defeat any caching
        encoded, info, _, _ = reader.next_batch()
        metas = [unpack_info(row.tobytes()) for row in info]
        frames = [plan_train_sample(m["num_frames"], m["fps_milli"] / 1000, m["height"], m["width"], spec, rng).frames
                  for m in metas]
        batches.append((encoded, frames))
    count = [0]

    def next_inputs():
        count[0] += 1
        return batches[count[0] % len(batches)]

    if decoder == "pyav":
        pool = ThreadPoolExecutor(cfg["workers"])
        return _time_batches(lambda: list(pool.map(decode_frames, *next_inputs())), cfg["batches"], cfg["warmup"],
                             cfg["reps"])

    @pipeline_def(batch_size=cfg["batch_size"], num_threads=cfg["workers"], device_id=None if decoder == "dali-cpu"
                  else 0, prefetch_queue_depth=1)
    def decode_only():
        data = fn.external_source(name="data", dtype=types.UINT8)
        frames = fn.external_source(name="frames", dtype=types.INT32)
        return fn.decoders.video(data, device="cpu" if decoder == "dali-cpu" else "mixed", frames=frames)

    pipe = decode_only()
    pipe.build()

    def next_batch():
        encoded, frames = next_inputs()
        pipe.feed_input("data", encoded)
        pipe.feed_input("frames", frames)
        pipe.run()

    return _time_batches(next_batch, cfg["batches"], cfg["warmup"], cfg["reps"])


def _child(queue, fn_name, cfg, kwargs):
    try:
        seconds = globals()[fn_name](cfg, **kwargs)
        peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        queue.put({"seconds": seconds, "peak_mb": peak_kb / 1024})
    except Exception as err:  # reported in the table, not a crash of the whole benchmark
        queue.put({"error": f"{type(err).__name__}: {err}"})


def run_measurement(name: str, fn_name: str, cfg: dict, views: int, **kwargs) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, fn_name, cfg, kwargs))
    child.start()
    result = queue.get()
    child.join()
    clips = cfg["batches"] * cfg["batch_size"]
    row = {"name": name, "views_per_clip": views, **kwargs}
    if "error" in result:
        return {**row, "error": result["error"]}
    rates = sorted(clips / s for s in result["seconds"])
    return {**row, "unit": "clips/s", "median": statistics.median(rates), "min": rates[0], "max": rates[-1],
            "views_per_s": statistics.median(rates) * views, "peak_mb": round(result["peak_mb"])}


# --- modes ----------------------------------------------------------------------------------------------------------


def available_decoders(cfg: dict) -> list[str]:
    from dali_pipes.decoder_choice import choose_decoder, gpu_available
    from dali_pipes.shard_set import open_shard_set

    codecs, gpu = open_shard_set(cfg["shards"], cfg["split"]).codecs, gpu_available()
    found = []
    for decoder in ("dali-gpu", "dali-cpu", "pyav"):
        try:
            choose_decoder(decoder, codecs, gpu)
            found.append(decoder)
        except ValueError:
            pass
    return found


def mode_loader(cfg):
    return [run_measurement(f"loader {decoder} R={r}", "measure_loader", cfg, r, decoder=decoder, repeats=r)
            for decoder in available_decoders(cfg) for r in (1, 2, 4)]


def mode_baselines(cfg):
    return [run_measurement(f"baseline {name} R=4", "measure_baseline", cfg, 4, whole_video=whole, repeats=4)
            for name, whole in (("hand-written torch", False), ("mae_st-style", True))]


def mode_decode_limit(cfg):
    return [run_measurement(f"decode-limit {decoder}", "measure_decode_limit", cfg, 1, decoder=decoder)
            for decoder in available_decoders(cfg)]


def ratios(rows: list[dict]) -> dict:
    rate = {r["name"]: r["median"] for r in rows if "median" in r}
    views = {r["name"]: r["views_per_s"] for r in rows if "median" in r}
    best = "dali-gpu" if any("dali-gpu" in n for n in rate) else "dali-cpu"
    pairs = {
        "loader_vs_decode_limit": (rate, f"loader {best} R=1", f"decode-limit {best}"),
        "r4_vs_r1_views": (views, f"loader {best} R=4", f"loader {best} R=1"),
        "loader_vs_baseline_torch": (rate, f"loader {best} R=4", "baseline hand-written torch R=4"),
        "loader_vs_baseline_mae_st": (rate, f"loader {best} R=4", "baseline mae_st-style R=4"),
    }
    return {k: round(t[a] / t[b], 3) for k, (t, a, b) in pairs.items() if a in t and b in t}


def machine() -> dict:
    import av
    import nvidia.dali
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "dali": nvidia.dali.__version__, "av": av.__version__}


def print_table(rows: list[dict]) -> None:
    print(f"{'measurement':36s} {'clips/s':>9s} {'spread':>15s} {'views/s':>9s} {'peak MB':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:36s} failed: {r['error']}")
        else:
            spread = f"{r['min']:.1f}-{r['max']:.1f}"
            print(f"{r['name']:36s} {r['median']:9.1f} {spread:>15s} {r['views_per_s']:9.1f} {r['peak_mb']:8d}")


MODES = {"loader": [mode_loader], "baselines": [mode_baselines], "decode-limit": [mode_decode_limit],
         "all": [mode_decode_limit, mode_loader, mode_baselines]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--shards", default="demo_data/shards", help="shards built by tools/build_shards.py")
    p.add_argument("--split", default="train")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="DALI threads / DataLoader workers (default: the cores available)")
    p.add_argument("--json", help="also write the measurements, ratios and machine here")
    for key, value in PRESETS["small"].items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), help=f"override the preset's {key}")
    args = p.parse_args(argv)
    cfg = {**PRESETS[args.preset], "shards": args.shards, "split": args.split, "workers": args.workers}
    cfg.update({k: v for k in PRESETS["small"] if (v := getattr(args, k)) is not None})
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}; torch {info['torch']}, "
          f"DALI {info['dali']}, PyAV {info['av']}")
    print(f"shards {cfg['shards']} ({cfg['split']}); batch {cfg['batch_size']} clips of {cfg['num_frames']}x"
          f"{cfg['stride']} frames, crop {cfg['crop_size']}; {cfg['reps']} x {cfg['batches']} batches after "
          f"{cfg['warmup']} warm-up; {cfg['workers']} workers")
    rows = [row for mode in MODES[args.mode] for row in mode(cfg)]
    print_table(rows)
    found = ratios(rows)
    for key, value in found.items():
        print(f"{key}: {value:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "config": cfg, "measurements": rows, "ratios": found}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
