"""MAE-ST pretraining: DALI-decoded video shards -> DeepSpeed ZeRO (bf16 on GPUs) -> checkpoints, logs, pictures.

    deepspeed --num_gpus 8 trainer/pretrain.py --ds_config ds_configs/zero2_bf16.json \\
        --recipe k400_VIT_L_16x4_MAE_PT --data shards/k400 --output runs/vit_l
    python trainer/pretrain.py --ds_config ds_configs/cpu.json --recipe demo_PT --data demo_data/shards \\
        --output runs/demo_pt --max-steps 300
Recipe values can be overridden as key=value (blr=1e-3 repeats=2 mask_repeats=2 model.drop_path_rate=0.1).
Starting again with the same --output resumes from its latest checkpoint.
"""

import dataclasses
import logging
import sys

import trainer.openmp  # noqa: F401  (first: OpenMP reads how its threads wait when torch loads it)
from dali_pipes.mixture import parse_data
from dali_pipes.shard_format import read_manifest
from models import MaskedAutoencoder, checkpoint_layout, load_pretrained, pretrain_macs, training_flops
from models.config import MAEConfig, resolve_config
from trainer.checkpointing import read_weights
from trainer.cli import main
from trainer.data import check_model_fits_views
from trainer.recipes import PRETRAIN_RECIPES
from trainer.task import Task
from trainer.tracking import ProbeTracking
from trainer.visualize import ReconstructionPictures

log = logging.getLogger("trainer")


class Pretraining(Task):
    recipes = PRETRAIN_RECIPES
    description = __doc__
    export_name = "mae_st_pretrain.pth"
    mixes_sets = True  # (labels unread)

    def model_config(self, manifest):
        probing = self.recipe.probe
        if probing.probe_every:  # fail now, not at the first probe
            probed = read_manifest(probing.probe_data) if probing.probe_data else manifest
            missing = sorted({probing.probe_train, probing.probe_test} - set(probed["splits"]))
            if missing:
                raise ValueError(f"probe_every={probing.probe_every}: the probe set "
                                 f"({probing.probe_data or 'the first set of --data'}) has no {missing} split (it has "
                                 f"{sorted(probed['splits'])}): set probe_train=... / probe_test=..., probe_data=..., "
                                 "or probe_every=0")
        model = self.recipe.model
        cfg = resolve_config(MAEConfig, model.name, **model.options)
        check_model_fits_views(cfg, self.recipe.views)
        if model.init_from:  # a SlowFast file's decoder has SlowFast's layout: the model is built with it
            cfg = dataclasses.replace(cfg, **checkpoint_layout(read_weights(model.init_from)))
        return cfg

    def build_model(self, cfg):
        model = MaskedAutoencoder(cfg)
        if self.recipe.model.init_from:
            log.info("initial weights: %s", load_pretrained(model, read_weights(self.recipe.model.init_from)))
        return model

    def loss(self, model, batch):
        masking = self.recipe.masking
        loss, pred, mask = model(batch["video"], mask_ratio=masking.mask_ratio, mask_repeats=masking.mask_repeats)
        return loss, (pred, mask)

    def flops_per_clip(self, cfg) -> float:
        masking = self.recipe.masking
        return self.views_per_clip() * training_flops(pretrain_macs(cfg, masking.mask_ratio,
                                                                    mask_repeats=masking.mask_repeats))

    def hooks(self, model, loader_config, monitor, last_step):
        found = []
        if monitor.enabled:  # (pictures are rank 0's)
            found.append(ReconstructionPictures(model, monitor, self.recipe.run.image_every, last_step,
                                                self.recipe.masking.mask_repeats))
        probing = self.recipe.probe
        if probing.probe_every:  # (every rank extracts its part of the probe set)
            data = probing.probe_data or parse_data(loader_config.shards, loader_config.mixture)[0].location
            found.append(ProbeTracking(model, loader_config, probing, data, monitor))
        return found


if __name__ == "__main__":
    sys.exit(main(Pretraining))
