"""The loaders a run uses, made from its recipe's sections without copying them field by field: the training loader
(the recipe's views and loading options, for this process), and for testing the same one with evaluation views on
the test split."""

import dataclasses

from dali_pipes import EvalViews, LoaderConfig, TrainViews
from dali_pipes.config import LoaderOptions


def loader_config(recipe, data: str, env, micro_batch: int, dtype) -> LoaderConfig:
    """The training loader of a recipe (pretraining or fine-tuning) for this process."""
    options = {f.name: getattr(recipe.loading, f.name) for f in dataclasses.fields(LoaderOptions)}
    return LoaderConfig(data, TrainViews(recipe.views), batch_size=micro_batch, rank=env.rank,
                        world_size=env.world_size, seed=recipe.run.seed, device=env.device, dtype=dtype,
                        processes_per_node=env.local_world_size, **options)


def eval_config(train: LoaderConfig, split: str, clips: int, crops: int) -> LoaderConfig:
    """The test loader beside a training one: clips x crops views of every video of `split`, in order, about as
    many views per batch as the training batch has clips."""
    spec = dataclasses.replace(train.views.spec, repeats=1, per_view_start=False, flip=False)
    return dataclasses.replace(train, views=EvalViews(spec, clips, crops), split=split,
                               batch_size=max(1, train.batch_size // (clips * crops)), rand_augment=None)


def check_model_fits_views(model_cfg, views) -> None:
    """The clips the loader makes are the ones the model takes."""
    if (model_cfg.num_frames, model_cfg.img_size) != (views.num_frames, views.crop_size):
        raise ValueError(f"the loader makes clips of {views.num_frames} frames at {views.crop_size}px but the model "
                         f"takes {model_cfg.num_frames} at {model_cfg.img_size}: set num_frames/crop_size or "
                         "model.num_frames/model.img_size to agree")
