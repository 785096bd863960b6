"""Features of a frozen encoder over each video of a shard set, through the loader's own DALI views, for probes
(tools/probe.py) and whatever else reads them.

    python tools/extract_features.py --checkpoint runs/demo_pt --data demo_data/shards --split val --out feats/val
    python tools/extract_features.py --checkpoint VIT_L_16x4_MAE_PT.pyth --data shards/k400 --split val \\
        --out feats/k400_val --blocks 12 final --clips 2 --crops 3              # the test views, two blocks
    python tools/extract_features.py ... --windows 8 --window-stride 16 --tokens   # a sliding window, token grids
    deepspeed --num_gpus 8 tools/extract_features.py ...    # (any launcher: the ranks split the videos)

--checkpoint takes whatever the project reads: a run folder (the model it trained, and its recipe's views), a
DeepSpeed checkpoint, an exported folder (models/hub.py), an mae_st or SlowFast file, a fine-tuned model. The encoder
runs on every token, no masking. Per view and block (1-based; "final": the last through the encoder's final norm):
the mean of its patch tokens, its class token, and with --tokens the grid of patch tokens (float16).

OUT/features.safetensors holds them ("final.mean" [V, D], "block4.cls", "final.tokens" [V, L, D], ...),
OUT/index.json one row per view (the sample's key, label, video, clip, crop, first frame), OUT/manifest.json the
checkpoint, the model, the layout and the preprocessing. Each rank writes its part every --part-batches batches with
the loader's position after it: a killed extraction started again goes on after its last whole part, and the parts
are merged when every rank is done.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import trainer.openmp  # noqa: E402,F401  (before torch: OpenMP reads how its threads wait when it loads)
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dali_pipes import EvalViews, LoaderConfig, VideoLoader, ViewSpec  # noqa: E402
from trainer.features import FINAL, block_names, load_encoder, view_features  # noqa: E402

PARTS = ".parts"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="any checkpoint the project reads (see above)")
    p.add_argument("--data", required=True, help="one shard set (a folder, or s3://, gs://, http(s)://)")
    p.add_argument("--split", default="val")
    p.add_argument("--out", required=True, help="the folder the features, index and manifest go to")
    p.add_argument("--blocks", nargs="+", default=[FINAL], help=f"1-based block numbers and/or {FINAL!r} (default)")
    p.add_argument("--tokens", action="store_true", help="also the token grid of each block (float16)")
    p.add_argument("--clips", type=int, default=1, help="temporal clips per video (spread over it)")
    p.add_argument("--crops", type=int, default=1, help="square crops per clip along the long side")
    p.add_argument("--windows", type=int, help="a sliding window instead: this many clips, --window-stride apart")
    p.add_argument("--window-stride", type=int, help="frames between the sliding windows' starts")
    p.add_argument("--stride", type=int, help="frames between a view's frames (default: the run's, else 4)")
    p.add_argument("--target-fps", type=float, help="the stride's frame rate (default: the run's, else 30; 0: the "
                                                    "video's own)")
    p.add_argument("--sampling", help="stride or segments (default: the run's, else stride)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch")
    p.add_argument("--part-batches", type=int, default=16, help="batches per part a rank writes (its resume point)")
    p.add_argument("--num-heads", type=int, help="for a file whose width is not an official size's")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher")
    args = p.parse_args(argv)
    if bool(args.windows) != bool(args.window_stride):
        p.error("--windows and --window-stride go together")
    for name in ("clips", "crops", "batch_size", "part_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def run_views(checkpoint: str) -> dict:
    """The views recipe of the run a checkpoint comes from: its run folder, or the run folder around its export
    (RUN_DIR/export/encoder); {} for anything else."""
    for folder in (checkpoint, os.path.join(checkpoint, "..", "..")):
        path = os.path.join(folder, "config.json")
        if os.path.isdir(checkpoint) and os.path.exists(path):
            with open(path) as f:
                resolved = json.load(f)
            if "recipe" in resolved:  # (an export's own config.json is the model's)
                return resolved["recipe"]["views"]
    return {}


def view_spec(args, encoder) -> ViewSpec:
    """The views: the encoder's frames and crop size; the flags, or the sampling of the run that trained it, or
    Kinetics' 16 x 4 at 30 fps."""
    views = run_views(args.checkpoint)
    chosen = {"sampling": args.sampling or views.get("sampling", "stride"),
              "stride": args.stride or views.get("stride", 4),
              "target_fps": (args.target_fps or None) if args.target_fps is not None else views.get("target_fps", 30.0)}
    return ViewSpec(num_frames=encoder.cfg.num_frames, crop_size=encoder.cfg.img_size, **chosen)  # (EvalViews: unflipped)


def rank_and_world() -> tuple:
    """(rank, world size, device, the process group's barrier) under whichever launcher started this."""
    from trainer.engine import init_distributed

    env = init_distributed()
    barrier = torch.distributed.barrier if env.world_size > 1 else (lambda: None)
    return env.rank, env.world_size, env.device, barrier


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        encoder = load_encoder(args.checkpoint, **({"num_heads": args.num_heads} if args.num_heads else {}))
        names = block_names(encoder, args.blocks)
        spec = view_spec(args, encoder)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rank, world, device, barrier = rank_and_world()
    encoder = encoder.to(device)
    clips = args.windows or args.clips
    views = EvalViews(spec, clips, args.crops, args.window_stride)
    loader = VideoLoader(LoaderConfig(args.data, views, split=args.split, batch_size=args.batch_size, rank=rank,
                                      world_size=world, device=device))
    parts = os.path.join(args.out, PARTS)
    os.makedirs(parts, exist_ok=True)
    finished = os.path.join(parts, f"rank{rank:05d}.done")
    if not os.path.exists(finished):
        count = extract(encoder, loader, names, args, parts, rank)
        with open(finished, "w") as f:
            f.write(str(count))
    loader.close()
    barrier()
    if rank == 0:
        merge(args, parts, world, names, spec, views)
    return 0


def extract(encoder, loader, names: list, args, parts: str, rank: int) -> int:
    """This rank's videos through the encoder, a part written every --part-batches batches (the first ones kept from
    a killed run); returns the number of parts."""
    part = resume(loader, parts, rank)
    if loader.cursor.epoch > 0:  # (killed after its last part, before it said so)
        return part
    bar = tqdm(total=len(loader), initial=loader.cursor.position, unit="batch", disable=rank != 0 or None,
               desc=f"features of {args.split}")
    features, rows, batches, waited, started = {}, [], 0, 0.0, time.perf_counter()
    stream = iter(loader)  # (the rest of the epoch: every video of this rank, once)
    while True:
        before = time.perf_counter()
        batch = next(stream, None)
        waited += time.perf_counter() - before
        if batch is not None:
            keep = (batch["video_index"] >= 0).nonzero().flatten().tolist()  # (-1: the epoch's padding)
            for key, value in view_features(encoder, batch["video"], names, args.tokens).items():
                half = key.endswith(".tokens")
                features.setdefault(key, []).append(value[keep].to("cpu", torch.float16 if half else torch.float32))
            per_video = loader.config.views.views_per_clip
            rows += [{"key": batch["name"][i].rsplit(":", 1)[-1].rsplit(".", 1)[0], "label": int(batch["label"][i]),
                      "clip": (i % per_video) // args.crops, "crop": i % args.crops,
                      "start_frame": int(batch["start_frame"][i])} for i in keep]
            batches += 1
            bar.update()
            bar.set_postfix(data_wait=f"{100 * waited / (time.perf_counter() - started):.0f}%", refresh=False)
        if batches and (batch is None or batches == args.part_batches):
            write_part(parts, rank, part, features, rows, loader.state_dict())
            part, features, rows, batches = part + 1, {}, [], 0
        if batch is None:
            bar.close()
            return part


def write_part(parts: str, rank: int, number: int, features: dict, rows: list, state: dict) -> None:
    """A rank's part: its features, index rows and the loader's position after them, the json last (the part is
    whole once it is there)."""
    stem = os.path.join(parts, f"rank{rank:05d}-{number:06d}")
    save_file({key: torch.cat(values) for key, values in features.items()}, f"{stem}.safetensors")
    with open(f"{stem}.tmp", "w") as f:
        json.dump({"rows": rows, "loader": state}, f)
    os.replace(f"{stem}.tmp", f"{stem}.json")


def resume(loader, parts: str, rank: int) -> int:
    """The number of this rank's whole parts (a part whose json was not written is redone); the loader goes on
    after the last of them."""
    done = 0
    while os.path.exists(os.path.join(parts, f"rank{rank:05d}-{done:06d}.json")):
        done += 1
    if done:
        with open(os.path.join(parts, f"rank{rank:05d}-{done - 1:06d}.json")) as f:
            loader.load_state_dict(json.load(f)["loader"])
    return done


def merge(args, parts: str, world: int, names: list, spec: ViewSpec, views: EvalViews) -> None:
    """Every rank's parts, in order, into OUT/features.safetensors, index.json and manifest.json."""
    features, rows = {}, []
    for rank in range(world):
        with open(os.path.join(parts, f"rank{rank:05d}.done")) as f:
            count = int(f.read())
        for number in range(count):
            stem = os.path.join(parts, f"rank{rank:05d}-{number:06d}")
            with open(f"{stem}.json") as f:
                rows += json.load(f)["rows"]
            for key, value in load_file(f"{stem}.safetensors").items():
                features.setdefault(key, []).append(value)
    save_file({key: torch.cat(values) for key, values in features.items()},
              os.path.join(args.out, "features.safetensors"))
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(rows, f)
    manifest = {"checkpoint": os.path.abspath(args.checkpoint), "data": args.data, "split": args.split,
                "views": len(rows), "videos": len({r["key"] for r in rows}), "blocks": names,
                "features": {key: list(value[0].shape) for key, value in features.items()},
                "layout": {"clips": views.clips, "crops": views.crops, "window_stride": views.window_stride},
                "preprocessing": {**dataclasses.asdict(spec), "normalization": "mean 0.45, std 0.225 (0-1 units)"}}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(parts)
    print(f"wrote {len(rows)} views of {manifest['videos']} videos ({', '.join(sorted(features))}) to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
