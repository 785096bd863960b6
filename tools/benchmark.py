"""Throughput benchmark: our loader and trainer against what users would run instead and against the limits, on the
same shards and cores, measured so that the ratios hold still on a noisy machine; then which part limits
throughput, and a projection for one GPU.

    python tools/benchmark.py all --shards demo_data/shards --json bench.json      # CPU: about 5 minutes
    python tools/benchmark.py loader --shards shards/k400 --preset full             # a GPU node
    python tools/benchmark.py loader --shards ssv2_demo/shards --sampling segments   # SSv2's sampling
    python tools/benchmark.py loader --shards "k400=demo_data/shards:0.7,ssv2=ssv2_demo/shards:0.3:sampling=segments"

Modes:
    loader        the pretraining loader, per decoder path available here, for R = 1, 2, 4 views per clip, batches
                  made ready for the model (normalized on the device)
    baselines     a hand-written PyTorch DataLoader (PyAV, just the needed frames, torch augmentation) and the
                  mae_st way (decode the whole video, then cut the R clips), both with R = 4
    decode-limit  decoding the same frames and nothing else, batches read beforehand: the loader's ceiling
    stages        the views pipeline taken apart (decode; + resizes; + the rest; + the copy to torch) at R = 1, 4
    model         one MAE training step: clips/s and MFU against the same round's matmul peak; SDPA vs plain
                  attention; mask_repeats 4 vs 1; fused vs torch's default (foreach) AdamW; decoder masking
                  (decoder_keep 0.5 and 0.25 vs 1: step time, peak memory; the analytic FLOPs of ViT-B/L/H); and
                  where the step's time goes (encoder, decoder, loss, ...)
    e2e           the real trainer: clips/s and the share of time waiting for data
    share         two real trainers on the same cores: each one's clips/s at once against its own alone
    store         the real trainer from local disk against a loopback S3 store that waits --latencies before each
                  answer: through the shard window (a cap of --window-share of the set) and DALI's ranged GETs;
                  clips/s, data wait, bytes fetched per epoch (tools/bench/store.py; needs moto[server])
    all           the loader at R = 1 and 4, bare decoding and the baselines (the headline ratios), the stages, the
                  model step (SDPA, M=1) and its parts, and e2e; then the verdict

How it holds still: every measurement lives in its own process for the whole run (set up once, warm), and the
measurements of a group take turns round after round (A B C, B C A, ...), each round after its own warm-up batches
and once the previous contender's processes have gone idle; a ratio is the median of its per-round ratios, with
their spread. The MFU's peak is measured in the same round as the step. The machine's load is reported before and
after, with a warning when something else was running.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import trainer.openmp  # noqa: E402,F401  (before torch: OpenMP reads how its threads wait when it loads)
from dali_pipes.mixture import parse_data  # noqa: E402
from tools.bench.contender import Contender  # noqa: E402
from tools.bench.gpu_projection import ACCELERATORS, print_projection, projection  # noqa: E402
from tools.bench.sharing import e2e_trainer, share  # noqa: E402
from tools.bench.store import group_store, store_ratios  # noqa: E402

PRESETS = {
    # small: the demo shards and ViT-B's step on a 2-core CPU, `all` in about 5 minutes
    "small": dict(batch_size=4, num_frames=16, sampling="stride", stride=4, crop_size=112, batches=12, warmup=4,
                  rounds=9, model="vit_b", model_batch=1, model_steps=2, e2e_recipe="tiny_PT", e2e_steps=10,
                  e2e_ds_config="ds_configs/cpu.json", e2e_overrides="", share_steps=60,
                  latencies="0,0.03,0.1", window_share=0.1, store_bandwidth=100e6, ranged_latency=0.03,
                  store_overrides="shuffle_buffer=16"),
    # full: a GPU node and Kinetics shards
    "full": dict(batch_size=8, num_frames=16, sampling="stride", stride=4, crop_size=224, batches=20, warmup=4,
                 rounds=5, model="vit_l", model_batch=8, model_steps=5, e2e_recipe="k400_VIT_L_16x4_MAE_PT",
                 e2e_steps=50, e2e_ds_config="ds_configs/zero2_bf16.json",
                 # one GPU: an optimizer step of one micro-batch (the paper's 512 clips would accumulate 64 of them)
                 e2e_overrides="batch_size=8", share_steps=50,
                 latencies="0,0.03,0.1", window_share=0.1, store_bandwidth=100e6, ranged_latency=0.03,
                 store_overrides="shuffle_buffer=64"),
}


# --- the groups of contenders that take turns ------------------------------------------------------------------------


def group_data(cfg: dict, parts: set) -> list[Contender]:
    """The loader measurements of `parts`; "ratios" is the smallest set the headline ratios need (`all`)."""
    from tools.bench.loaders import available_decoders, torchcodec_missing

    decoders = available_decoders(cfg)
    auto = decoders[0]
    loaders = [(d, r) for d in decoders for r in (1, 2, 4)] if "loader" in parts else []
    if "ratios" in parts:
        loaders = [(auto, 1), (auto, 4)] + [(d, 4) for d in decoders[1:]]
    found = [Contender(f"loader {d} R={r}", "tools.bench.loaders:loader", cfg, r, decoder=d, repeats=r)
             for d, r in loaders]
    if parts & {"decode-limit", "ratios"}:
        found += [Contender(f"decode-limit {d}", "tools.bench.loaders:decode_limit", cfg, decoder=d) for d in decoders]
        missing = torchcodec_missing()
        if missing:
            print(f"decode-limit torchcodec (a candidate host decoder) not measured here: {missing}")
        else:
            found.append(Contender("decode-limit torchcodec", "tools.bench.loaders:decode_limit", cfg,
                                   decoder="torchcodec"))
    if parts & {"baselines", "ratios"}:
        found += [Contender(f"baseline {name} R=4", "tools.bench.loaders:baseline", cfg, 4, whole_video=whole,
                            repeats=4) for name, whole in (("hand-written torch", False), ("mae_st-style", True))]
    if "stages" in parts and auto != "pyav":
        found += [Contender(f"stages {auto} R={r}", "tools.bench.loaders:stages", cfg, r, decoder=auto, repeats=r)
                  for r in (1, 4)]
    return found


DECODER_KEEPS = (0.5, 0.25)  # the decoder-masking variants the model mode measures against keep 1


def group_model(cfg: dict, variants: set) -> list[Contender]:
    """The step with SDPA at M=1 (the MFU), where its time goes, and with `variants`: plain attention, M=4, torch's
    default (foreach) AdamW instead of the fused one, decoder masking."""
    size, batch = cfg["model"], cfg["model_batch"]
    runs = [("sdpa", 1, True, 1.0)] + [("math", 1, True, 1.0)] * ("attention" in variants) \
        + [("sdpa", 4, True, 1.0)] * ("repeats" in variants) + [("sdpa", 1, False, 1.0)] * ("optimizer" in variants) \
        + [("sdpa", 1, True, keep) for keep in DECODER_KEEPS if "decoder_keep" in variants]
    steps = [Contender(f"model {size} step {attn} M={m}" + ("" if fused else " foreach AdamW")
                       + ("" if keep == 1 else f" keep={keep}"), "tools.bench.model:model_step", cfg, m, size=size,
                       batch=batch, attn_impl=attn, mask_repeats=m, fused_adamw=fused, decoder_keep=keep)
             for attn, m, fused, keep in runs]
    return steps + [Contender(f"model {size} parts sdpa M=1", "tools.bench.model:model_parts", cfg, 1, size=size,
                              batch=batch, attn_impl="sdpa", mask_repeats=1)]


def group_e2e(cfg: dict, _=None) -> list[Contender]:
    return [Contender(f"e2e trainer {cfg['e2e_recipe']}", "tools.bench.model:e2e", cfg, recipe=cfg["e2e_recipe"],
                      ds_config=os.path.join(ROOT, cfg["e2e_ds_config"]), steps=cfg["e2e_steps"],
                      overrides=cfg["e2e_overrides"].split())]


MODES = {mode: [(group_data, {mode})] for mode in ("decode-limit", "loader", "baselines", "stages")}  # groups, in turn
MODES.update({"model": [(group_model, {"attention", "repeats", "optimizer", "decoder_keep"})],
              "e2e": [(group_e2e, None)], "share": [],  # (two trainers at once: tools/bench/sharing.py)
              "store": [(group_store, None)],
              "all": [(group_data, {"ratios"}), (group_data, {"stages"}), (group_model, set()), (group_e2e, None)]})


def take_turns(make_group, rounds: int) -> list[dict]:
    """Every contender of the group runs `rounds` rounds, in an order that rotates each round; then their rows. The
    contenders set up side by side (imports, models, loaders: nothing is measured then), the rounds one at a time."""
    contenders = []
    try:
        contenders = make_group()
        for c in contenders:
            c.wait_until_set_up()
        for r in range(rounds):
            for i in range(len(contenders)):
                contenders[(i + r) % len(contenders)].round()
        return [row(c, c.stop()) for c in contenders]
    finally:  # (an interrupted benchmark leaves no process behind)
        for c in contenders:
            c.stop()


def row(c: Contender, peak_mb) -> dict:
    base = {"name": c.name, "views_per_clip": c.views, **c.kwargs, "peak_mb": peak_mb}
    if c.error or not c.results:
        return {**base, "error": c.error or "no round finished"}
    rates = [r["items"] / r["seconds"] for r in c.results]
    out = {**base, "unit": "clips/s", "rounds": rates, "median": statistics.median(rates), "min": min(rates),
           "max": max(rates), "views_per_s": statistics.median(rates) * c.views}
    for key in ("mfu", "achieved_flops", "peak_flops", "data_wait_share", "store_fetched_per_epoch"):
        if key in c.results[0]:
            out[key] = statistics.median(r[key] for r in c.results)
    if "mfu" in c.results[0]:
        out["mfu_rounds"] = [r["mfu"] for r in c.results]
    for key in ("stages", "parts"):  # seconds per batch (stages) or per step (parts), medians over the rounds
        if key in c.results[0]:
            out[key] = {name: statistics.median(r[key][name] for r in c.results) for name in c.results[0][key]}
    return out


# --- what the numbers say ------------------------------------------------------------------------------------------


def per_round_ratio(rows: dict, a: str, b: str, views: bool = False) -> dict | None:
    """Median and spread of a's rate over b's, round by round (views: views/s instead of clips/s)."""
    if a not in rows or b not in rows or "rounds" not in rows[a] or "rounds" not in rows[b]:
        return None
    scale = rows[a]["views_per_clip"] / rows[b]["views_per_clip"] if views else 1
    values = [x / y * scale for x, y in zip(rows[a]["rounds"], rows[b]["rounds"])]
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "rounds": len(values)}


def ratios(rows: list[dict], cfg: dict) -> dict:
    by_name = {r["name"]: r for r in rows}
    # the decoder the loader picks by itself here (dali_pipes/decoders prefers them in this order)
    auto = next((d for d in ("dali-gpu", "dali-cpu", "pyav") if f"loader {d} R=1" in by_name), "dali-cpu")
    found = {
        "loader_vs_decode_limit": per_round_ratio(by_name, f"loader {auto} R=1", f"decode-limit {auto}"),
        "r4_vs_r1_views": per_round_ratio(by_name, f"loader {auto} R=4", f"loader {auto} R=1", views=True),
        "loader_vs_baseline_torch": per_round_ratio(by_name, f"loader {auto} R=4", "baseline hand-written torch R=4"),
        "loader_vs_baseline_mae_st": per_round_ratio(by_name, f"loader {auto} R=4", "baseline mae_st-style R=4"),
    }
    if "pyav" != auto:
        found["pyav_loader_vs_baseline_torch"] = per_round_ratio(by_name, "loader pyav R=4",
                                                                 "baseline hand-written torch R=4")
    step = f"model {cfg['model']} step"
    # the step's clips/s, SDPA against plain attention and fused AdamW against foreach; M=4 against 1 in views/s
    found.update({
        "model_sdpa_vs_math": per_round_ratio(by_name, f"{step} sdpa M=1", f"{step} math M=1"),
        "model_m4_vs_m1_views": per_round_ratio(by_name, f"{step} sdpa M=4", f"{step} sdpa M=1", views=True),
        "model_fused_vs_foreach_adamw": per_round_ratio(by_name, f"{step} sdpa M=1", f"{step} sdpa M=1 foreach AdamW"),
    })
    for keep in DECODER_KEEPS:  # step time at this keep over keep 1's: keep 1's rate over this one's
        found[f"model_step_time_keep_{keep}_vs_1"] = per_round_ratio(by_name, f"{step} sdpa M=1",
                                                                     f"{step} sdpa M=1 keep={keep}")
    model = by_name.get(f"{step} sdpa M=1")
    if model and "mfu_rounds" in model:
        values = model["mfu_rounds"]
        found["model_mfu"] = {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                              "max": round(max(values), 3), "rounds": len(values)}
    found.update(store_ratios(by_name, per_round_ratio))
    return {k: v for k, v in found.items() if v}


def decoder_masking(rows: list[dict], cfg: dict) -> dict:
    """Decoder masking at each measured keep against keep 1: the step's peak memory (this benchmark's processes),
    and the analytic multiply-adds per clip of ViT-B/L/H at 90% masking (models/flops.py)."""
    from models import pretrain_macs
    from models.config import MAEConfig, resolve_config

    by_name = {r["name"]: r for r in rows}
    step = f"model {cfg['model']} step sdpa M=1"
    found = {"flops_vs_keep_1": {size: {str(keep): round(pretrain_macs(resolve_config(
        MAEConfig, size, decoder_keep=keep)) / pretrain_macs(resolve_config(MAEConfig, size)), 3)
        for keep in DECODER_KEEPS} for size in ("vit_b", "vit_l", "vit_h")}}
    if step in by_name and by_name[step].get("peak_mb"):
        found["peak_mb"] = {"1.0": by_name[step]["peak_mb"], **{str(keep): by_name[f"{step} keep={keep}"]["peak_mb"]
                                                              for keep in DECODER_KEEPS
                                                              if by_name.get(f"{step} keep={keep}", {}).get("peak_mb")}}
    return found


def stage_costs(rows: list[dict]) -> dict:
    """Per-batch seconds of each stage at R=1 and R=4, and what they imply: the cost of one view, and the ceiling
    views/s R=4 / R=1 can reach when decoding and views share the same cores."""
    stages = {r["views_per_clip"]: r["stages"] for r in rows if "stages" in r}
    if 1 not in stages or 4 not in stages:
        return {}
    decode = statistics.median([stages[1]["decode"], stages[4]["decode"]])
    per_view = (stages[4]["views pipeline"] - decode) / 4
    copy = {r: stages[r]["views + copy to torch"] - stages[r]["views pipeline"] for r in stages}
    total = {r: stages[r]["views + copy to torch"] for r in stages}
    return {"decode_s_per_batch": decode, "view_s_per_batch": per_view,
            "copy_s_per_batch": {str(r): c for r, c in copy.items()},
            "ceiling_r4_vs_r1_views": round(4 * total[1] / total[4], 3)}


def verdict(rows: list[dict], found: dict, costs: dict) -> list[str]:
    """Which part limits throughput here, and by how much."""
    lines = []
    e2e = next((r for r in rows if r["name"].startswith("e2e") and "median" in r), None)
    if e2e:
        wait = e2e["data_wait_share"]
        side = "data loading limits it" if wait > 0.2 else "the model step limits it"
        lines.append(f"end to end the trainer waits for data {100 * wait:.0f}% of each step: {side}")
    if "loader_vs_decode_limit" in found:
        share = found["loader_vs_decode_limit"]["median"]
        lines.append(f"at R=1 the loader runs at {share:.2f} of bare decoding: "
                     + ("decoding is its bottleneck" if share >= 0.8 else
                        f"views and copies cost {100 * (1 / share - 1):.0f}% on top of decoding here"))
    if costs:
        lines.append(f"per batch of clips: decoding {1e3 * costs['decode_s_per_batch']:.1f} ms, each view "
                     f"{1e3 * costs['view_s_per_batch']:.1f} ms: on shared cores views/s at R=4 can reach "
                     f"{costs['ceiling_r4_vs_r1_views']:.2f}x R=1's")
    if "loader_vs_baseline_torch" in found:
        lines.append(f"at R=4 the loader is {found['loader_vs_baseline_torch']['median']:.2f}x the hand-written "
                     "DataLoader" + (f" and {found['loader_vs_baseline_mae_st']['median']:.2f}x the mae_st way"
                                     if "loader_vs_baseline_mae_st" in found else ""))
    model = next((r for r in rows if r["name"].startswith("model") and "step" in r["name"] and "median" in r), None)
    loader4 = max((r for r in rows if r["name"].startswith("loader") and r["name"].endswith("R=4") and "median" in r),
                  key=lambda r: r["median"], default=None)
    if model and loader4:
        need = model["median"] / 4  # decoded clips/s the step consumes at 4 views per clip
        lines.append(f"the {model['name'].split()[1]} step takes {model['median']:.2f} views/s, i.e. "
                     f"{need:.2f} decoded clips/s at R=4; the loader delivers {loader4['median']:.1f} "
                     f"({loader4['median'] / need:.0f}x): here the model limits, the loader idles")
    return lines


# --- the machine -----------------------------------------------------------------------------------------------------


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


def load(seconds: float = 1.0) -> dict:
    """The 1-minute load average, and over `seconds` the busy and stolen shares of all cores (/proc/stat)."""
    def ticks():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4], values[7] if len(values) > 7 else 0  # total, idle+iowait, steal

    try:
        first = ticks()
        time.sleep(seconds)
        last = ticks()
        with open("/proc/loadavg") as f:
            loadavg = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    total = max(1, last[0] - first[0])
    return {"loadavg_1min": loadavg, "busy_share": round(1 - (last[1] - first[1]) / total, 3),
            "steal_share": round((last[2] - first[2]) / total, 3)}


def busy_warning(before: dict, after: dict, cores: int) -> str | None:
    if before.get("busy_share", 0) > 0.25 or max(before.get("steal_share", 0), after.get("steal_share", 0)) > 0.05:
        return (f"warning: the machine was busy (before: {before}, after: {after}); with {cores} cores every figure "
                "suffers, the per-round ratios less so. Rerun on a quiet machine, or with more --rounds")
    return None


# --- report ----------------------------------------------------------------------------------------------------------


def print_report(rows: list[dict], found: dict, costs: dict) -> None:
    print(f"{'measurement':44s} {'clips/s':>9s} {'spread':>15s} {'views/s':>9s} {'peak MB':>8s}  notes")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:44s} failed: {r['error']}")
            continue
        notes = []
        if "achieved_flops" in r:
            notes.append(f"{r['achieved_flops'] / 1e9:.0f} GFLOP/s, MFU {100 * r['mfu']:.1f}% of the round's "
                         f"{r['peak_flops'] / 1e9:.0f}")
        if "data_wait_share" in r:
            notes.append(f"data wait {100 * r['data_wait_share']:.0f}%, MFU {100 * r['mfu']:.1f}%")
        if "store_fetched_per_epoch" in r:
            notes.append(f"fetched {r['store_fetched_per_epoch']:.2f}x the set per epoch")
        for key, unit in (("stages", "ms/batch"), ("parts", "ms/step")):
            if key in r:
                notes.append(", ".join(f"{name} {1e3 * s:.1f}" for name, s in r[key].items()) + f" ({unit})")
        spread = f"{r['min']:.2f}-{r['max']:.2f}"
        peak = r["peak_mb"] if r["peak_mb"] is not None else -1
        print(f"{r['name']:44s} {r['median']:9.2f} {spread:>15s} {r['views_per_s']:9.2f} {peak:8d}  "
              + "; ".join(notes))
    for key, value in found.items():
        print(f"{key}: {value['median']:.3f} (per-round {value['min']:.3f}-{value['max']:.3f}, {value['rounds']} "
              "rounds)")
    if costs:
        print(f"stage costs: decode {1e3 * costs['decode_s_per_batch']:.1f} ms/batch, one view "
              f"{1e3 * costs['view_s_per_batch']:.1f} ms/batch; ceiling of views/s R=4 / R=1 on shared cores "
              f"{costs['ceiling_r4_vs_r1_views']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--shards", default="demo_data/shards", help="shards built by tools/build_shards.py (the loader "
                   "mode also takes a mixture, as trainer --data: NAME=LOCATION:WEIGHT[:option=value...],...)")
    p.add_argument("--split", default="train")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="DALI threads / DataLoader workers (default: the cores available)")
    p.add_argument("--accelerator", choices=sorted(ACCELERATORS), default="H100 SXM", help="for the GPU projection")
    p.add_argument("--assumed-mfu", type=float, default=0.4, help="the projection's model FLOP utilisation")
    p.add_argument("--json", help="also write the measurements, ratios and machine here")
    for key, value in PRESETS["small"].items():
        extra = " (recipe overrides, space-separated key=value)" if key == "e2e_overrides" else ""
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), help=f"override the preset's {key}{extra}")
    args = p.parse_args(argv)
    cfg = {**PRESETS[args.preset], "shards": args.shards, "split": args.split, "workers": args.workers}
    cfg.update({k: v for k in PRESETS["small"] if (v := getattr(args, k)) is not None})
    if cfg["rounds"] < 1:
        p.error("--rounds must be at least 1")
    if args.mode != "loader" and len(parse_data(args.shards)) > 1:
        p.error(f"--shards names a mixture: only the loader mode reads one ({args.mode} measures one set)")
    info = machine()
    cfg["device"] = "cuda" if info["gpu"] else "cpu"
    print(f"machine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}; torch {info['torch']}, "
          f"DALI {info['dali']}, PyAV {info['av']}")
    frames = (f"{cfg['num_frames']} frames, one per segment" if cfg["sampling"] == "segments"
              else f"{cfg['num_frames']}x{cfg['stride']} frames")
    print(f"shards {cfg['shards']} ({cfg['split']}); batches of {cfg['batch_size']} clips of {frames}, crop "
          f"{cfg['crop_size']}; {cfg['rounds']} rounds of {cfg['batches']} batches after "
          f"{cfg['warmup']} warm-up, the measurements of a group in turn; {cfg['workers']} workers", flush=True)
    before, start = load(), time.perf_counter()
    rows, found = [], {}
    for make_group, parts in MODES[args.mode]:
        rows += take_turns(lambda: make_group(cfg, parts), cfg["rounds"])
    if args.mode == "share":
        command = e2e_trainer(cfg, cfg["e2e_recipe"], os.path.join(ROOT, cfg["e2e_ds_config"]),
                              cfg["e2e_overrides"].split())
        rows, found = share(cfg, command, cfg["rounds"])
    after = load()
    found, costs = {**found, **ratios(rows, cfg)}, stage_costs(rows)
    print_report(rows, found, costs)
    warning = busy_warning(before, after, info["cores"])
    print(f"machine load before {before}, after {after}; {time.perf_counter() - start:.0f} s")
    if warning:
        print(warning)
    lines = verdict(rows, found, costs) if args.mode == "all" else []
    if lines:
        print("verdict:\n  " + "\n  ".join(lines))
    masking = decoder_masking(rows, cfg) if args.mode == "model" else {}
    if masking:
        print("decoder masking, analytic multiply-adds per clip against keep 1 (90% masking): " + "; ".join(
            f"{size} " + ", ".join(f"{ratio:.3f} at keep {keep}" for keep, ratio in by_keep.items())
            for size, by_keep in masking["flops_vs_keep_1"].items()))
        if "peak_mb" in masking:
            print("decoder masking, peak memory of the step's process (MB): " + ", ".join(
                f"keep {keep} {mb}" for keep, mb in masking["peak_mb"].items()))
    gpu = projection(args.accelerator, args.assumed_mfu, repeats=4, crop_size=224, short_side=256)
    if args.mode in ("all", "model"):
        print_projection(gpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "config": cfg, "load": {"before": before, "after": after, "warning": warning},
                       "measurements": rows, "ratios": found, "stage_costs": costs, "verdict": lines,
                       "decoder_masking": masking,
                       "gpu_projection": gpu}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
