"""Fine-tuning from an MAE checkpoint, and Kinetics multi-view testing.

    deepspeed --num_gpus 8 trainer/finetune.py --ds_config ds_configs/zero2_bf16.json --recipe k400_VIT_L_16x4_FT \\
        --data shards/k400 --pretrained runs/vit_l/export/mae_st_pretrain.pth --output runs/vit_l_ft
    python trainer/finetune.py --ds_config ds_configs/cpu.json --recipe demo_FT --data demo_data/shards \\
        --pretrained runs/demo_pt --output runs/demo_ft
--pretrained takes our runs (a run folder, DeepSpeed checkpoint or fp32 export), mae_st files and SlowFast model-zoo
files. --eval-only tests a fine-tuned model (the run's own checkpoint, or --pretrained) without training.
The final test prints a line starting with `top1:` and writes RUN_DIR/eval.json and RUN_DIR/per_class_accuracy.csv.
"""

import logging
import os
import sys

import torch.nn.functional as F

from dali_pipes import VideoLoader
from models import VideoClassifier, classifier_macs, load_pretrained
from models.config import ClassifierConfig, resolve_config
from trainer.batch_augment import mixup_cutmix, random_erasing
from trainer.checkpointing import read_weights
from trainer.data import eval_config
from trainer.evaluate import evaluate, write_report
from trainer.pretrain import check_model_fits_data
from trainer.recipes import FINETUNE_RECIPES
from trainer.run import Task, main

log = logging.getLogger("trainer")


def layer_decay_scale(name: str, depth: int, decay: float) -> float:
    """lr multiplier: 1 for the head and final norm, decay^k for the block k layers below them, the embeddings
    (patch, position, cls) one step below the first block."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = depth + 1
    return decay ** (depth + 1 - layer)


class Finetuning(Task):
    recipes = FINETUNE_RECIPES
    description = __doc__

    def __init__(self, pretrained: str | None = None, eval_only: bool = False):
        self.pretrained, self.trains = pretrained, not eval_only
        self.class_names, self.num_classes, self.eval_loaders = {}, 0, {}

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--pretrained", help="weights to start from (any format; see above)")
        parser.add_argument("--eval-only", action="store_true", help="test without training")

    @classmethod
    def from_args(cls, args):
        return cls(args.pretrained, args.eval_only)

    def model_config(self, recipe, manifest):
        if recipe.eval_split not in manifest["splits"]:  # fail now, not after training
            raise ValueError(f"the shards have no {recipe.eval_split!r} split to test on (they have "
                             f"{sorted(manifest['splits'])}): set eval_split=...")
        label_map = manifest["label_map"]
        self.class_names = {index: name for name, index in label_map.items()}
        self.num_classes = recipe.num_classes or len(label_map)
        cfg = resolve_config(ClassifierConfig, recipe.model, num_classes=self.num_classes,
                             drop_path_rate=recipe.drop_path, dropout=recipe.dropout, **recipe.model_options)
        check_model_fits_data(cfg, recipe)
        return cfg

    def build_model(self, recipe, cfg, env):
        model = VideoClassifier(cfg)
        source = self.pretrained or recipe.init_from
        if source:
            log.info("pretrained weights %s: %s", source, load_pretrained(model, read_weights(source)))
        elif env.is_main:
            log.warning("no --pretrained weights: training from a random initialization")
        return model

    def loss(self, engine, batch, recipe):
        video = random_erasing(batch["video"], recipe.random_erasing)
        video, targets = mixup_cutmix(video, batch["label"], self.num_classes, recipe.mixup, recipe.cutmix,
                                      recipe.mixup_switch_prob, recipe.label_smoothing)
        logits = engine(video)
        return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean(), None

    def train_flops_per_clip(self, model, recipe) -> float:
        return 3 * 2 * recipe.repeats * classifier_macs(model.cfg)

    def lr_scale_of(self, model, recipe):
        return lambda name: layer_decay_scale(name, model.cfg.depth, recipe.layer_decay)

    def test(self, run, clips: int, crops: int) -> dict:
        """Multi-view accuracy on the eval split (clips x crops views per video)."""
        key = (clips, crops)
        if key not in self.eval_loaders:
            self.eval_loaders[key] = VideoLoader(eval_config(run.loader.config, run.recipe.eval_split, clips, crops))
        run.engine.eval()
        report = evaluate(lambda video: run.engine(video), self.eval_loaders[key], self.class_names)
        run.engine.train()
        return report

    def after_epoch(self, run, epoch):
        if run.recipe.eval_every and epoch % run.recipe.eval_every == 0:
            report = self.test(run, 1, 1)
            if run.env.is_main:
                run.monitor.writer.add_scalar("eval/top1_single_view", report["top1"], run.step)
                run.monitor.writer.add_scalar("eval/top5_single_view", report["top5"], run.step)
                log.info("epoch %d: single-view validation top1 %.2f top5 %.2f (%d videos)", epoch, report["top1"],
                         report["top5"], report["videos"])

    def finish(self, run, tag):
        recipe = run.recipe
        report = self.test(run, recipe.eval_clips, recipe.eval_crops)
        if not run.env.is_main:
            return []
        views = f"{recipe.eval_clips}x{recipe.eval_crops}"
        line = write_report(report, run.run_dir, views)
        run.monitor.writer.add_scalar("eval/top1", report["top1"], run.step)
        run.monitor.writer.add_scalar("eval/top5", report["top5"], run.step)
        print(line, flush=True)
        lines = [f"  test ({views} views): {os.path.join(run.run_dir, 'eval.json')}, "
                 f"{os.path.join(run.run_dir, 'per_class_accuracy.csv')}"]
        if len(report["per_class"]) <= 12:  # a handful of classes (the demos): each one's accuracy here too
            lines += [f"    {row['top1']:6.2f}  {name} ({row['videos']} videos)"
                      for name, row in sorted(report["per_class"].items())]
        if tag and self.trains:
            export = os.path.join(run.run_dir, "export", "mae_st_finetune.pth")
            os.makedirs(os.path.dirname(export), exist_ok=True)
            run.checkpointer.export_mae_st(tag, export, epoch=run.step / run.steps_per_epoch)
            lines.append(f"  fp32 weights, mae_st format: {export}")
        return lines


if __name__ == "__main__":
    sys.exit(main(Finetuning))
