"""Throughput benchmark: our loader and trainer against what users would run instead and against the limits, in one
run, on the same shards and cores; then which part limits throughput, and a projection for one GPU.

    python tools/benchmark.py all --shards demo_data/shards --json bench.json      # CPU: about 3 minutes
    python tools/benchmark.py loader --shards shards/k400 --preset full             # a GPU node

Modes:
    loader        the DALI pretraining loader, per decoder path available here, for R = 1, 2, 4 views per clip
    baselines     a hand-written PyTorch DataLoader (PyAV, just the needed frames, torch augmentation) and the
                  mae_st way (decode the whole video, then cut the R clips), both with R = 4
    decode-limit  decoding the same frames and nothing else, batches read beforehand: the loader's ceiling
    model         one MAE training step: clips/s, achieved FLOP/s, MFU against this run's matmul peak;
                  SDPA vs plain attention; mask_repeats 1 vs 4
    e2e           the real trainer for some steps: clips/s and the share of time waiting for data
    all           everything, then the verdict
Each measurement runs in its own process (clean peak memory), warms up, then times `reps` runs; tables give the
median and the spread (min-max). Every ratio compares two measurements of this run.
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import sys

from tools.bench.gpu_projection import ACCELERATORS, print_projection, projection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    # small: the demo shards and ViT-B's step on a 2-core CPU, `all` in about 3 minutes
    "small": dict(batch_size=4, num_frames=16, stride=4, crop_size=112, batches=5, warmup=1, reps=3,
                  model="vit_b", model_batch=1, model_steps=1, e2e_recipe="demo_PT", e2e_steps=40,
                  e2e_ds_config="ds_configs/cpu.json"),
    # full: a GPU node and Kinetics shards
    "full": dict(batch_size=8, num_frames=16, stride=4, crop_size=224, batches=30, warmup=5, reps=5,
                 model="vit_l", model_batch=8, model_steps=10, e2e_recipe="k400_VIT_L_16x4_MAE_PT", e2e_steps=200,
                 e2e_ds_config="ds_configs/zero2_bf16.json"),
}


# --- one measurement per child process ------------------------------------------------------------------------------


def _child(queue, module: str, function: str, cfg: dict, kwargs: dict):
    try:
        result = getattr(__import__(module, fromlist=[function]), function)(cfg, **kwargs)
    except Exception as err:  # reported in the table, not a crash of the whole benchmark
        result = {"error": f"{type(err).__name__}: {err}"}
    # Leave without interpreter teardown, workers first: DataLoader workers and DALI threads were seen to abort in
    # their C++ destructors at exit ("terminate called without an active exception"), after the measurement.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the workers' deaths
    for worker in mp.active_children():
        worker.kill()
        worker.join()  # (a waited-for child counts in RUSAGE_CHILDREN's peak)
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    queue.put({**result, "peak_mb": round(peak_kb / 1024)})
    queue.close()
    queue.join_thread()
    os._exit(0)


def measure(name: str, target: str, cfg: dict, views: int = 1, **kwargs) -> dict:
    """Run module:function(cfg, **kwargs) in a fresh process; a row with rates in clips/s (median, min, max)."""
    module, function = target.split(":")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, module, function, cfg, kwargs))
    child.start()
    result = queue.get()
    child.join()
    row = {"name": name, "views_per_clip": views, **kwargs}
    if "error" in result:
        return {**row, "error": result["error"]}
    items = result.pop("items")
    rates = sorted(items / s for s in result.pop("seconds"))
    median = statistics.median(rates)
    return {**row, **result, "unit": "clips/s", "median": median, "min": rates[0], "max": rates[-1],
            "views_per_s": median * views}


# --- modes ----------------------------------------------------------------------------------------------------------


def mode_loader(cfg):
    from tools.bench.loaders import available_decoders

    return [measure(f"loader {decoder} R={r}", "tools.bench.loaders:measure_loader", cfg, r, decoder=decoder,
                    repeats=r) for decoder in available_decoders(cfg) for r in (1, 2, 4)]


def mode_baselines(cfg):
    return [measure(f"baseline {name} R=4", "tools.bench.loaders:measure_baseline", cfg, 4, whole_video=whole,
                    repeats=4) for name, whole in (("hand-written torch", False), ("mae_st-style", True))]


def mode_decode_limit(cfg):
    from tools.bench.loaders import available_decoders

    return [measure(f"decode-limit {decoder}", "tools.bench.loaders:measure_decode_limit", cfg, decoder=decoder)
            for decoder in available_decoders(cfg)]


def mode_model(cfg):
    size, batch = cfg["model"], cfg["model_batch"]
    return [measure(f"model {size} step {attn} M={m}", "tools.bench.model:measure_model_step", cfg, m, size=size,
                    batch=batch, attn_impl=attn, mask_repeats=m)
            for attn, m in (("sdpa", 1), ("math", 1), ("sdpa", 4))]


def mode_e2e(cfg):
    return [measure(f"e2e trainer {cfg['e2e_recipe']}", "tools.bench.model:measure_e2e", cfg,
                    recipe=cfg["e2e_recipe"], ds_config=os.path.join(ROOT, cfg["e2e_ds_config"]),
                    steps=cfg["e2e_steps"])]


MODES = {"loader": [mode_loader], "baselines": [mode_baselines], "decode-limit": [mode_decode_limit],
         "model": [mode_model], "e2e": [mode_e2e],
         "all": [mode_decode_limit, mode_loader, mode_baselines, mode_model, mode_e2e]}


# --- report ---------------------------------------------------------------------------------------------------------


def ratios(rows: list[dict], cfg: dict) -> dict:
    rate = {r["name"]: r["median"] for r in rows if "median" in r}
    views = {r["name"]: r["views_per_s"] for r in rows if "median" in r}
    # the decoder the loader picks by itself here (dali_pipes/decoder_choice.py prefers them in this order)
    auto = next((d for d in ("dali-gpu", "dali-cpu", "pyav") if f"loader {d} R=1" in rate), "dali-cpu")
    pairs = {
        "loader_vs_decode_limit": (rate, f"loader {auto} R=1", f"decode-limit {auto}"),
        "r4_vs_r1_views": (views, f"loader {auto} R=4", f"loader {auto} R=1"),
        "loader_vs_baseline_torch": (rate, f"loader {auto} R=4", "baseline hand-written torch R=4"),
        "loader_vs_baseline_mae_st": (rate, f"loader {auto} R=4", "baseline mae_st-style R=4"),
    }
    found = {k: round(t[a] / t[b], 3) for k, (t, a, b) in pairs.items() if a in t and b in t}
    model = next((r for r in rows if r["name"] == f"model {cfg['model']} step sdpa M=1" and "mfu" in r), None)
    if model:
        found["model_mfu"] = round(model["mfu"], 3)
    return found


def verdict(rows: list[dict], found: dict) -> list[str]:
    """Which part limits throughput here, and by how much."""
    lines = []
    e2e = next((r for r in rows if r["name"].startswith("e2e") and "median" in r), None)
    if e2e:
        wait = e2e["data_wait_share"]
        side = "data loading limits it" if wait > 0.2 else "the model step limits it"
        lines.append(f"end to end the trainer waits for data {100 * wait:.0f}% of each step: {side}")
    if "loader_vs_decode_limit" in found:
        share = found["loader_vs_decode_limit"]
        lines.append(f"the loader runs at {share:.2f} of bare decoding: "
                     + ("decoding is its bottleneck" if share >= 0.8 else
                        f"augmentation and copies cost {100 * (1 / share - 1):.0f}% on top of decoding here"))
    if "loader_vs_baseline_torch" in found:
        lines.append(f"at R=4 the loader is {found['loader_vs_baseline_torch']:.2f}x the hand-written DataLoader"
                     + (f" and {found['loader_vs_baseline_mae_st']:.2f}x the mae_st way"
                        if "loader_vs_baseline_mae_st" in found else ""))
    model = next((r for r in rows if r["name"].startswith("model") and "median" in r), None)
    loader4 = max((r for r in rows if r["name"].startswith("loader") and r["name"].endswith("R=4") and "median" in r),
                  key=lambda r: r["median"], default=None)
    if model and loader4:
        need = model["median"] / 4  # decoded clips/s the step consumes at 4 views per clip
        lines.append(f"the {model['name'].split()[1]} step takes {model['median']:.2f} views/s, i.e. "
                     f"{need:.2f} decoded clips/s at R=4; the loader delivers {loader4['median']:.1f} "
                     f"({loader4['median'] / need:.0f}x): here the model limits, the loader idles")
    return lines


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
    print(f"{'measurement':36s} {'clips/s':>9s} {'spread':>15s} {'views/s':>9s} {'peak MB':>8s}  notes")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:36s} failed: {r['error']}")
            continue
        notes = []
        if "mfu" in r and "achieved_flops" in r:
            notes.append(f"{r['achieved_flops'] / 1e9:.0f} GFLOP/s, MFU {100 * r['mfu']:.1f}% of "
                         f"{r['peak_flops'] / 1e9:.0f}")
        if "data_wait_share" in r:
            notes.append(f"data wait {100 * r['data_wait_share']:.0f}%, MFU {100 * r['mfu']:.1f}%")
        spread = f"{r['min']:.2f}-{r['max']:.2f}"
        print(f"{r['name']:36s} {r['median']:9.2f} {spread:>15s} {r['views_per_s']:9.2f} {r['peak_mb']:8d}  "
              + "; ".join(notes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--shards", default="demo_data/shards", help="shards built by tools/build_shards.py")
    p.add_argument("--split", default="train")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="DALI threads / DataLoader workers (default: the cores available)")
    p.add_argument("--accelerator", choices=sorted(ACCELERATORS), default="H100", help="for the GPU projection")
    p.add_argument("--assumed-mfu", type=float, default=0.4, help="the projection's model FLOP utilisation")
    p.add_argument("--json", help="also write the measurements, ratios and machine here")
    for key, value in PRESETS["small"].items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), help=f"override the preset's {key}")
    args = p.parse_args(argv)
    cfg = {**PRESETS[args.preset], "shards": args.shards, "split": args.split, "workers": args.workers}
    cfg.update({k: v for k in PRESETS["small"] if (v := getattr(args, k)) is not None})
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}; torch {info['torch']}, "
          f"DALI {info['dali']}, PyAV {info['av']}")
    print(f"shards {cfg['shards']} ({cfg['split']}); batches of {cfg['batch_size']} clips of {cfg['num_frames']}x"
          f"{cfg['stride']} frames, crop {cfg['crop_size']}; {cfg['reps']} x {cfg['batches']} batches after "
          f"{cfg['warmup']} warm-up; {cfg['workers']} workers")
    rows = [row for mode in MODES[args.mode] for row in mode(cfg)]
    print_table(rows)
    found = ratios(rows, cfg)
    for key, value in found.items():
        print(f"{key}: {value:.3f}")
    lines = verdict(rows, found) if args.mode == "all" else []
    if lines:
        print("verdict:\n  " + "\n  ".join(lines))
    gpu = projection(args.accelerator, args.assumed_mfu, repeats=4, crop_size=224, short_side=256)
    if args.mode in ("all", "model"):
        print_projection(gpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "config": cfg, "measurements": rows, "ratios": found, "verdict": lines,
                       "gpu_projection": gpu}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
