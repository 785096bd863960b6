"""What pretraining tracks of its encoder while it learns: before its first step, every `probe_every` epochs and
after its last step, the encoder as it is then, frozen, on a labelled probe set (kNN and a linear probe of its
pooled features, trained on one split and tested on another: trainer/probes.py), to TensorBoard (probe/knn_top1,
probe/linear_top1) and the log, with the time it took. Every rank extracts its part of the videos (ZeRO-3's forward
needs them all); rank 0 probes. A probe set that fits in VIEWS_IN_MEMORY is decoded once and kept in host memory
(bf16, as every probe reads it): later probes only run the encoder."""

import dataclasses
import logging
import time

import torch
import torch.distributed as dist

from dali_pipes import VideoLoader
from trainer.data import eval_config
from trainer.features import FINAL, view_features
from trainer.probes import knn, linear, score
from trainer.cadence import due
from trainer.task import Hook

log = logging.getLogger("trainer")

VIEWS_IN_MEMORY = 2 * 2**30  # bytes of decoded probe views a process keeps rather than decoding them again


class ProbeTracking(Hook):
    def __init__(self, model, train_config, probing, data: str, monitor):
        """model: the engine (its module's encoder is probed); train_config: the run's training LoaderConfig;
        probing: the recipe's Probing section; data: its probe_data, or the run's --data."""
        self.model, self.probing, self.monitor = model, probing, monitor
        self._configs = {split: dataclasses.replace(eval_config(train_config, split, 1, 1), shards=data)
                         for split in (probing.probe_train, probing.probe_test)}
        self._kept = {}  # split -> [(views, labels)] decoded once
        self.seconds, self.scores = 0.0, []  # [(step, {probe: score})]

    def begin(self, step: int) -> None:
        self.probe(step)

    def after_epoch(self, epoch: int, step: int) -> None:
        if due(epoch, self.probing.probe_every):
            self.probe(step)

    def end(self, step: int) -> None:
        self.probe(step)

    def probe(self, step: int) -> None:
        """kNN and the linear probe of the encoder now, logged by rank 0."""
        if self.scores and self.scores[-1][0] == step:
            return
        start = time.perf_counter()
        train, train_labels = self._features(self.probing.probe_train)
        test, test_labels = self._features(self.probing.probe_test)
        if train is not None:
            classes = 1 + int(max(train_labels.max(), test_labels.max()))
            scores = {"knn": score(knn(train, train_labels, test, classes), test_labels),
                      "linear": score(linear(train, train_labels, test, classes), test_labels)}
            self.scores.append((step, scores))
            self.monitor.scalars("probe", {f"{name}_top1": s["top1"] for name, s in scores.items()}, step)
        self.seconds += time.perf_counter() - start
        if train is not None:
            low, high = scores["knn"]["top1_interval"]
            log.info("step %d: the encoder's probes (%s -> %s, %d videos): kNN top1 %.1f (95%%: %.1f-%.1f), "
                     "linear %.1f; %.1f s of probing so far", step, self.probing.probe_train,
                     self.probing.probe_test, scores["knn"]["queries"], scores["knn"]["top1"], low, high,
                     scores["linear"]["top1"], self.seconds)

    def _views(self, split: str):
        """[(views, labels)] of this rank's videos of `split`: kept from the first reading when they fit."""
        if split in self._kept:
            yield from self._kept[split]
            return
        loader, kept, size = VideoLoader(self._configs[split]), [], 0
        for batch in loader:
            keep = batch["video_index"] >= 0
            views, labels = batch["video"][keep].to("cpu", torch.bfloat16), batch["label"][keep].cpu()
            size += views.numel() * views.element_size()
            if kept is not None:
                kept = kept + [(views, labels)] if size <= VIEWS_IN_MEMORY else None
            yield views, labels
        loader.close()
        if kept is not None:
            self._kept[split] = kept

    @torch.no_grad()
    def _features(self, split: str):
        """(pooled features [V, D], labels [V]) of every video of `split`, gathered on rank 0 (None elsewhere)."""
        module = self.model.module
        weight = next(module.parameters())
        module.eval()
        found, labels = [], []
        for views, view_labels in self._views(split):
            features = view_features(module, views.to(weight.device, weight.dtype), [FINAL])[f"{FINAL}.mean"]
            found.append(features.float().cpu())
            labels.append(view_labels)
        module.train()
        features, labels = torch.cat(found), torch.cat(labels)
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (features, labels))
            features, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return (features, labels) if self.monitor.enabled else (None, None)

    def summary(self) -> list[str]:
        if not self.scores:
            return []
        lines = [f"  the encoder's probes ({self.probing.probe_train} -> {self.probing.probe_test}, "
                 f"{self.scores[0][1]['knn']['queries']} videos; {self.seconds:.0f} s of probing):"]
        for step, scores in (self.scores[0], self.scores[-1]) if len(self.scores) > 1 else self.scores:
            low, high = scores["knn"]["top1_interval"]
            lines.append(f"    step {step}: kNN top1 {scores['knn']['top1']:.1f} (95%: {low:.1f}-{high:.1f}), "
                         f"linear {scores['linear']['top1']:.1f}")
        return lines
