"""Does pretraining make a better encoder? The demo's answer, end to end on 2 CPU cores in about 20 minutes
(`make demo-learns`):

1. pretrains demo_PT on the pretraining split, read as unlabelled clips, as long as the effect needs (120 epochs), its encoder's
   kNN and linear probe tracked every 20 epochs (trainer/tracking.py);
2. fine-tunes demo_FT on the few-label split ("train": 4 clips per class) from that encoder and from scratch, each with
   the same recipe and --seeds, and tests each on the 144 held-out videos (2 clips x 3 crops);
3. extracts the frozen encoders' token grids (tools/extract_features.py) of the pretrained encoder and of as
   many random initializations, and probes them (tools/probe.py): attentive, linear and kNN, trained on the
   pretraining split's labels (those pretraining ignored: MAE's linear-probe protocol), tested on val.

Each step is skipped when its result is there (a rerun after a kill goes on); OUT/summary.json holds every figure.

    python tools/demo_learns.py --data demo_data/shards --out runs/demo_learns
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import trainer.openmp  # noqa: E402,F401  (before torch: OpenMP reads how its threads wait when it loads)
import torch  # noqa: E402

from models import save_pretrained  # noqa: E402
from models.config import VideoViTConfig  # noqa: E402
from models.encoder import VideoViT  # noqa: E402
from tools import extract_features, probe  # noqa: E402
from trainer.recipes import DEMO_ENCODER  # noqa: E402

DS_CONFIG = os.path.join(ROOT, "ds_configs", "cpu.json")
PROBE_LINE = re.compile(r"step (\d+): the encoder's probes .*: kNN top1 ([\d.]+) .* linear ([\d.]+)")


def run(command: list, log: str) -> None:
    """A trainer as its own process (as a user starts it), its output in `log`; exits on failure."""
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, *command], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        sys.exit(f"error: {' '.join(command[:1])} exited {code}: see {log}")


def pretrain(args) -> list:
    """The pretraining run (skipped when finished); its tracking curve [(step, kNN, linear)]."""
    folder = os.path.join(args.out, "pretrain")
    if not os.path.exists(os.path.join(folder, "export", "encoder")):
        print(f"pretraining demo_PT for {args.epochs} epochs (about 11 minutes on 2 cores) -> {folder}", flush=True)
        run(["trainer/pretrain.py", "--ds_config", DS_CONFIG, "--recipe", "demo_PT", "--data", args.data,
             "--output", folder, f"epochs={args.epochs}", "warmup_epochs=5", "probe_every=20",
             "checkpoint_every=1000", "image_every=1000"], os.path.join(args.out, "pretrain.log"))
    with open(os.path.join(folder, "train.log")) as f:
        return [(int(m[1]), float(m[2]), float(m[3])) for m in PROBE_LINE.finditer(f.read())]


def finetune(args) -> dict:
    """{start: [top-1 per seed]} of demo_FT from the pretrained encoder and from scratch."""
    found = {"pretrained": [], "scratch": []}
    for seed in args.seeds:
        for start in found:
            folder = os.path.join(args.out, f"finetune_{start}_{seed}")
            if not os.path.exists(os.path.join(folder, "eval.json")):
                print(f"fine-tuning demo_FT from {start}, seed {seed} (about a minute)", flush=True)
                pretrained = ["--pretrained", os.path.join(args.out, "pretrain")] if start == "pretrained" else []
                run(["trainer/finetune.py", "--ds_config", DS_CONFIG, "--recipe", "demo_FT", "--data", args.data,
                     "--output", folder, f"seed={seed}", *pretrained], os.path.join(args.out, f"{start}_{seed}.log"))
            with open(os.path.join(folder, "eval.json")) as f:
                found[start].append(json.load(f)["top1"])
    return found


def probes(args) -> dict:
    """{encoder: {probe: score}} of the pretrained encoder and random initializations (one per seed)."""
    encoders = {"pretrained": os.path.join(args.out, "pretrain", "export", "encoder")}
    for seed in args.seeds:
        encoders[f"random_{seed}"] = folder = os.path.join(args.out, f"random_{seed}")
        if not os.path.exists(folder):
            torch.manual_seed(seed)
            save_pretrained(VideoViT(VideoViTConfig(**DEMO_ENCODER)), folder)
    found = {}
    for name, encoder in encoders.items():
        features = {}
        for split in ("pretrain", "val"):
            features[split] = os.path.join(args.out, "features", f"{name}_{split}")
            if not os.path.exists(os.path.join(features[split], "manifest.json")):
                extract_features.main(["--checkpoint", encoder, "--data", args.data, "--split", split, "--out",
                                       features[split], "--tokens", "--batch-size", "16", "--stride", "4",
                                       "--target-fps", "0"])  # (demo_PT's views)
        scores = os.path.join(args.out, "features", f"{name}_probes.json")
        if not os.path.exists(scores):
            print(f"probing the {name} encoder", flush=True)
            probe.main(["--train", features["pretrain"], "--test", features["val"], "--blocks", "final",
                        "--json", scores])
        with open(scores) as f:
            found[name] = {r["probe"]: r for r in json.load(f)["results"]}
    return found


def spread(values: list) -> str:
    return f"{statistics.mean(values):.1f} +- {statistics.stdev(values) if len(values) > 1 else 0:.1f}"


def report(curve: list, tuned: dict, probed: dict) -> list[str]:
    lines = ["", "tracking (the pretraining split's labels -> val, 144 videos): step, kNN top-1, linear top-1"]
    lines += [f"  {step:5d}  {knn:5.1f}  {linear:5.1f}" for step, knn, linear in curve]
    lines += ["", "few-label fine-tuning (4 clips per class), val top-1 over seeds (mean +- sd):",
              f"  from the pretrained encoder {spread(tuned['pretrained'])}  {tuned['pretrained']}",
              f"  from scratch                {spread(tuned['scratch'])}  {tuned['scratch']}",
              f"  difference {statistics.mean(tuned['pretrained']) - statistics.mean(tuned['scratch']):+.1f} points",
              "", "frozen encoders, final block (the pretraining split's labels -> val): top-1 (95% interval)"]
    for name in ("attentive", "linear", "knn"):
        pretrained = probed["pretrained"][name]
        randoms = [v[name]["top1"] for k, v in probed.items() if k.startswith("random")]
        lines.append(f"  {name:9s} pretrained {pretrained['top1']:5.1f} ({pretrained['top1_interval'][0]:.1f}-"
                     f"{pretrained['top1_interval'][1]:.1f})  random inits {spread(randoms)}  {randoms}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo_data/shards", help="the demo's shards (tools/make_demo_data.py)")
    p.add_argument("--out", default="runs/demo_learns")
    p.add_argument("--epochs", type=int, default=120, help="pretraining epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    curve = pretrain(args)
    tuned, probed = finetune(args), probes(args)
    lines = report(curve, tuned, probed)
    print("\n".join(lines))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"tracking": curve, "finetuning": tuned, "probes": probed, "epochs": args.epochs,
                   "seeds": args.seeds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
