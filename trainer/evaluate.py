"""Kinetics-style testing: every video seen as K temporal clips x 3 crops, the softmax averaged over its views,
top-1 / top-5 and per-class accuracy over all ranks; and the hook that validates every so many epochs."""

import csv
import json
import os

import logging

import torch
import torch.distributed as dist

from dali_pipes import VideoLoader
from trainer.data import eval_config
from trainer.cadence import due
from trainer.task import Hook

log = logging.getLogger("trainer")


@torch.no_grad()
def collect_video_scores(model_fn, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [V], probabilities [V, classes]) per video on this rank: softmax averaged over the views that share a
    'video_index' in the loader's batches."""
    labels, scores = [], []
    for batch in loader:
        probs = model_fn(batch["video"]).float().softmax(-1)  # [views, classes]
        real = batch["video_index"] >= 0  # (-1: the end of an epoch's padding)
        probs, label, index = probs[real], batch["label"][real], batch["video_index"][real]
        videos, inverse = torch.unique(index, return_inverse=True)
        total = torch.zeros(len(videos), probs.shape[1], device=probs.device).index_add_(0, inverse, probs)
        count = torch.zeros(len(videos), device=probs.device).index_add_(0, inverse, torch.ones_like(inverse,
                                                                                                  dtype=torch.float))
        label = torch.zeros(len(videos), dtype=torch.long, device=probs.device).scatter_(0, inverse, label)
        labels.append(label.cpu())  # (all views of a video carry its label)
        scores.append((total / count[:, None]).cpu())
    return torch.cat(labels), torch.cat(scores)


def accuracy_report(labels: torch.Tensor, scores: torch.Tensor, class_names: dict) -> dict:
    """top1, top5 (percent) and per-class top-1 of per-video scores."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit1, hit5 = top[:, 0] == labels, (top == labels[:, None]).any(1)
    per_class = {}
    for index in sorted(set(labels.tolist())):
        chosen = labels == index
        per_class[class_names.get(index, str(index))] = {"videos": int(chosen.sum()),
                                                          "top1": round(100 * hit1[chosen].float().mean().item(), 2)}
    return {"top1": round(100 * hit1.float().mean().item(), 2), "top5": round(100 * hit5.float().mean().item(), 2),
            "videos": len(labels), "per_class": per_class}


def evaluate(model_fn, loader, class_names: dict) -> dict:
    """The report over the videos of every rank (each rank's loader reads its own part)."""
    labels, scores = collect_video_scores(model_fn, loader)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (labels, scores))
        labels, scores = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return accuracy_report(labels, scores, class_names)


def write_report(report: dict, run_dir: str, views: str) -> str:
    """RUN_DIR/eval.json and RUN_DIR/per_class_accuracy.csv; returns the summary line."""
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump({**report, "views": views}, f, indent=1)
    with open(os.path.join(run_dir, "per_class_accuracy.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "videos", "top1"])
        for name, row in sorted(report["per_class"].items()):
            writer.writerow([name, row["videos"], row["top1"]])
    return f"top1: {report['top1']:.2f}  top5: {report['top5']:.2f}  ({report['videos']} videos, {views} views)"


class Validation(Hook):
    """The model's multi-view accuracy on the test split: a quick single-view one every `every` epochs (0: never;
    TensorBoard eval/top1_single_view), and the full clips x crops test at the end (final_test). Every rank takes
    part (each tests its own part of the videos)."""

    def __init__(self, model, train_config, evaluation, class_names: dict, monitor):
        self.model, self.train_config, self.evaluation = model, train_config, evaluation
        self.class_names, self.monitor = class_names, monitor
        self._loaders = {}  # (clips, crops) -> its loader, made on first use

    def test(self, clips: int, crops: int) -> dict:
        key = (clips, crops)
        if key not in self._loaders:
            self._loaders[key] = VideoLoader(eval_config(self.train_config, self.evaluation.eval_split, clips, crops))
        self.model.eval()
        report = evaluate(lambda video: self.model(video), self._loaders[key], self.class_names)
        self.model.train()
        return report

    def after_epoch(self, epoch: int, step: int) -> None:
        if not due(epoch, self.evaluation.eval_every):
            return
        report = self.test(1, 1)
        if self.monitor.enabled:
            self.monitor.scalars("eval", {"top1_single_view": report["top1"], "top5_single_view": report["top5"]},
                                 step)
            log.info("epoch %d: single-view validation top1 %.2f top5 %.2f (%d videos)", epoch, report["top1"],
                     report["top5"], report["videos"])

    def final_test(self, step: int) -> list[str]:
        """The full test (eval_clips x eval_crops views per video): RUN_DIR/eval.json and per_class_accuracy.csv on
        rank 0, its line printed; the lines for the run's summary."""
        clips, crops = self.evaluation.eval_clips, self.evaluation.eval_crops
        report = self.test(clips, crops)
        if not self.monitor.enabled:
            return []
        views = f"{clips}x{crops}"
        print(write_report(report, self.monitor.run_dir, views), flush=True)
        self.monitor.scalars("eval", {"top1": report["top1"], "top5": report["top5"]}, step)
        lines = [f"  test ({views} views): {os.path.join(self.monitor.run_dir, 'eval.json')}, "
                 f"{os.path.join(self.monitor.run_dir, 'per_class_accuracy.csv')}"]
        if len(report["per_class"]) <= 12:  # a handful of classes (the demos): each one's accuracy here too
            lines += [f"    {row['top1']:6.2f}  {name} ({row['videos']} videos)"
                      for name, row in sorted(report["per_class"].items())]
        return lines
