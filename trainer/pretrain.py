"""MAE-ST pretraining: DALI-decoded video shards -> DeepSpeed ZeRO (bf16 on GPUs) -> checkpoints, logs, pictures.

    deepspeed --num_gpus 8 trainer/pretrain.py --ds_config ds_configs/zero2_bf16.json \\
        --recipe k400_VIT_L_16x4_MAE_PT --data shards/k400 --output runs/vit_l
    python trainer/pretrain.py --ds_config ds_configs/cpu.json --recipe demo_PT --data demo_data/shards \\
        --output runs/demo_pt --max-steps 300
Recipe values can be overridden as key=value (blr=1e-3 repeats=2 mask_repeats=2 model.drop_path_rate=0.1).
Starting again with the same --output resumes from its latest checkpoint.
"""

import logging
import os
import sys

from models import MaskedAutoencoder, checkpoint_layout, load_pretrained, pretrain_macs
from models.config import MAEConfig, resolve_config, with_options
from trainer.checkpointing import read_weights
from trainer.recipes import PRETRAIN_RECIPES
from trainer.run import Task, main
from trainer.visualize import reconstruction_grid

log = logging.getLogger("trainer")


def check_model_fits_data(model_cfg, recipe) -> None:
    if (model_cfg.num_frames, model_cfg.img_size) != (recipe.num_frames, recipe.crop_size):
        raise ValueError(f"the loader makes clips of {recipe.num_frames} frames at {recipe.crop_size}px but the model "
                         f"takes {model_cfg.num_frames} at {model_cfg.img_size}: set num_frames/crop_size or "
                         "model.num_frames/model.img_size to agree")


class Pretraining(Task):
    recipes = PRETRAIN_RECIPES
    description = __doc__

    def __init__(self):
        self.picture = None

    def model_config(self, recipe, manifest):
        cfg = resolve_config(MAEConfig, recipe.model, **recipe.model_options)
        check_model_fits_data(cfg, recipe)
        if recipe.init_from:  # a SlowFast file's decoder has SlowFast's layout: the model is built with it
            cfg = with_options(cfg, **checkpoint_layout(read_weights(recipe.init_from)))
        return cfg

    def build_model(self, recipe, cfg, env):
        model = MaskedAutoencoder(cfg)
        if recipe.init_from:
            log.info("initial weights: %s", load_pretrained(model, read_weights(recipe.init_from)))
        return model

    def loss(self, engine, batch, recipe):
        loss, pred, mask = engine(batch["video"], mask_ratio=recipe.mask_ratio, mask_repeats=recipe.mask_repeats)
        return loss, (pred, mask)

    def train_flops_per_clip(self, model, recipe) -> float:
        return 3 * 2 * recipe.repeats * pretrain_macs(model.cfg, recipe.mask_ratio, mask_repeats=recipe.mask_repeats)

    def wants_outputs(self, step, run):
        every = run.recipe.image_every
        return run.env.is_main and bool(every) and (step % every == 0 or step == run.stop_at)

    def after_step(self, run, step, batch, outputs):
        if batch is not None:
            grid = reconstruction_grid(run.engine.module, batch["video"], *outputs, run.recipe.mask_repeats)
            self.picture = run.monitor.picture(step, grid)

    def finish(self, run, tag):
        lines = []
        if run.env.is_main:
            export = os.path.join(run.run_dir, "export", "mae_st_pretrain.pth")
            os.makedirs(os.path.dirname(export), exist_ok=True)
            run.checkpointer.export_mae_st(tag, export, epoch=run.step / run.steps_per_epoch)
            lines.append(f"  fp32 weights, mae_st format: {export} (fine-tune with --pretrained {export})")
            if self.picture:
                lines.append(f"  reconstructions (target / masked input / reconstruction): {self.picture}")
        return lines


if __name__ == "__main__":
    sys.exit(main(Pretraining))
