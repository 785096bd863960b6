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
import sys

import trainer.openmp  # noqa: F401  (first: OpenMP reads how its threads wait when torch loads it)
import torch.nn.functional as F

from models import VideoClassifier, classifier_macs, load_pretrained, training_flops
from models.config import ClassifierConfig, resolve_config
from trainer.batch_augment import mixup_cutmix, random_erasing
from trainer.checkpointing import Checkpointer, read_weights
from trainer.cli import main
from trainer.data import check_model_fits_views
from trainer.evaluate import Validation
from trainer.recipes import FINETUNE_RECIPES
from trainer.task import Task

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
    export_name = "mae_st_finetune.pth"

    def __init__(self, recipe, pretrained: str | None = None, eval_only: bool = False):
        super().__init__(recipe)
        self.pretrained, self.trains = pretrained, not eval_only
        self.class_names, self.num_classes, self.validation = {}, 0, None

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--pretrained", help="weights to start from (any format; see above)")
        parser.add_argument("--eval-only", action="store_true", help="test without training")

    @classmethod
    def from_args(cls, args, recipe):
        if args.eval_only and not args.pretrained and not Checkpointer.saved_meta(args.output):
            raise ValueError(f"--eval-only: nothing to test: {args.output} holds no checkpoint of a run, and no "
                             "--pretrained was given (a random model would be tested): give the run folder of a "
                             "fine-tuning run as --output, or the weights to test as --pretrained")
        return cls(recipe, args.pretrained, args.eval_only)

    def model_config(self, manifest):
        split = self.recipe.evaluation.eval_split
        if split not in manifest["splits"]:  # fail now, not after training
            raise ValueError(f"the shards have no {split!r} split to test on (they have {sorted(manifest['splits'])}): "
                             "set eval_split=...")
        label_map = manifest["label_map"]
        self.class_names = {index: name for name, index in label_map.items()}
        options = {"num_classes": len(label_map), **self.recipe.model.options}  # (model.num_classes=... overrides)
        cfg = resolve_config(ClassifierConfig, self.recipe.model.name, **options)
        check_model_fits_views(cfg, self.recipe.views)
        self.num_classes = cfg.num_classes
        return cfg

    def build_model(self, cfg):
        model = VideoClassifier(cfg)
        source = self.pretrained or self.recipe.model.init_from
        if source:
            log.info("pretrained weights %s: %s", source, load_pretrained(model, read_weights(source)))
        else:
            log.warning("no --pretrained weights: training from a random initialization")
        return model

    def loss(self, model, batch):
        augment = self.recipe.augment
        video = random_erasing(batch["video"], augment.random_erasing)
        video, targets = mixup_cutmix(video, batch["label"], self.num_classes, augment.mixup, augment.cutmix,
                                      augment.mixup_switch_prob, augment.label_smoothing)
        logits = model(video)
        return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean(), None

    def flops_per_clip(self, cfg) -> float:
        return self.views_per_clip() * training_flops(classifier_macs(cfg))

    def lr_scale_of(self, model):
        depth, decay = model.cfg.depth, self.recipe.optim.layer_decay
        return lambda name: layer_decay_scale(name, depth, decay)

    def hooks(self, model, loader_config, monitor, last_step):
        self.validation = Validation(model, loader_config, self.recipe.evaluation, self.class_names, monitor)
        return [self.validation]

    def finish(self, step: int) -> list[str]:
        return self.validation.final_test(step)


if __name__ == "__main__":
    sys.exit(main(Finetuning))
