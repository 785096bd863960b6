"""Probes of a frozen encoder on features cached by tools/extract_features.py: trained on one split's features and
labels, tested on another's; kNN, a linear probe and an attentive probe, per block, each top-1 with its 95% interval
from the number of test videos (trainer/probes.py).

    python tools/extract_features.py --checkpoint runs/demo_pt --data demo_data/shards --split pretrain --out f/pt \\
        --blocks 2 4 final --tokens
    python tools/extract_features.py --checkpoint runs/demo_pt --data demo_data/shards --split val --out f/val ...
    python tools/probe.py --train f/pt --test f/val                      # every probe on every block
    python tools/probe.py --train f/pt --test f/val --probes knn linear --json probes.json

A video with several views (clips x crops) is one query: kNN and the linear probe take the mean of its views'
pooled features (the mean of the patch tokens; --pooled cls: the class token), the attentive probe trains on every
view's token grid and averages a video's scores. MAE's best frozen features are often in middle blocks.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import trainer.openmp  # noqa: E402,F401  (before torch: OpenMP reads how its threads wait when it loads)
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from trainer.probes import PROBES, score  # noqa: E402


def read_features(folder: str) -> tuple[dict, list]:
    """(the tensors of features.safetensors, the rows of index.json) of an extraction's output folder."""
    for name in ("features.safetensors", "index.json"):
        if not os.path.exists(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder} has no {name}: write it with tools/extract_features.py --out {folder}")
    with open(os.path.join(folder, "index.json")) as f:
        return load_file(os.path.join(folder, "features.safetensors")), json.load(f)


def by_video(rows: list) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(each view's video number, each video's label, the videos' keys), videos in order of first appearance."""
    keys = list(dict.fromkeys(r["key"] for r in rows))
    number = {key: i for i, key in enumerate(keys)}
    labels = {r["key"]: r["label"] for r in rows}
    return torch.tensor([number[r["key"]] for r in rows]), torch.tensor([labels[k] for k in keys]), keys


def per_video(values: torch.Tensor, video: torch.Tensor, videos: int) -> torch.Tensor:
    """The mean over each video's views of [views, ...] values."""
    total = torch.zeros(videos, *values.shape[1:]).index_add_(0, video, values.float())
    return total / torch.bincount(video, minlength=videos).clamp(min=1).view(-1, *[1] * (values.dim() - 1))


def run_probe(name: str, block: str, train: tuple, test: tuple, pooled: str, classes: int) -> dict:
    """One probe on one block: its score on the test videos."""
    (train_features, train_rows), (test_features, test_rows) = train, test
    train_video, train_labels, _ = by_video(train_rows)
    test_video, test_labels, _ = by_video(test_rows)
    if name == "attentive":
        key = f"{block}.tokens"
        if key not in train_features or key not in test_features:
            raise ValueError(f"the attentive probe reads token grids: extract {block} with --tokens")
        logits = PROBES[name](train_features[key], train_labels[train_video], test_features[key], classes)
        logits = per_video(logits.softmax(-1), test_video, len(test_labels))
    else:
        key = f"{block}.{pooled}"
        logits = PROBES[name](per_video(train_features[key], train_video, len(train_labels)), train_labels,
                              per_video(test_features[key], test_video, len(test_labels)), classes)
    return {"probe": name, "block": block, **score(logits, test_labels)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="features of the labelled videos the probes learn from")
    p.add_argument("--test", required=True, help="features of the videos they are tested on")
    p.add_argument("--probes", nargs="+", choices=sorted(PROBES), default=sorted(PROBES))
    p.add_argument("--blocks", nargs="+", help="blocks to probe (default: every one both extractions hold)")
    p.add_argument("--pooled", choices=("mean", "cls"), default="mean", help="kNN's and the linear probe's feature")
    p.add_argument("--json", help="also write the scores here")
    args = p.parse_args(argv)
    try:
        train, test = read_features(args.train), read_features(args.test)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    blocks = args.blocks or sorted({k.split(".")[0] for k in train[0]} & {k.split(".")[0] for k in test[0]})
    classes = 1 + max(r["label"] for r in train[1] + test[1])
    results = []
    for block in blocks:
        for name in args.probes:
            try:
                found = run_probe(name, block, train, test, args.pooled, classes)
            except (ValueError, KeyError) as err:
                print(f"{block:8s} {name:9s} skipped: {err}")
                continue
            results.append(found)
            low, high = found["top1_interval"]
            print(f"{block:8s} {name:9s} top1 {found['top1']:6.2f} (95%: {low:.1f}-{high:.1f}, {found['queries']} "
                  f"videos)  top5 {found['top5']:6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train": args.train, "test": args.test, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
