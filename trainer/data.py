"""The loaders a run uses, made from its recipe's sections without copying them field by field: the training loader
(the recipe's views and loading options, for this process), and for testing the same one with evaluation views on
the test split; and what the run reads of the data's manifests (one per set of a mixture)."""

import dataclasses

from dali_pipes import EvalViews, LoaderConfig, TrainViews
from dali_pipes.config import LoaderOptions
from dali_pipes.mixture import parse_data, required_single
from dali_pipes.shard_format import read_manifest


def manifests(data: str, loading: LoaderOptions) -> list[dict]:
    """The manifest of each set of --data (one location: its own), in the mixture's order."""
    return [read_manifest(source.location) for source in parse_data(data, loading.mixture)]


def task_manifest(data: str, loading: LoaderOptions, task) -> dict:
    """The manifest a task's model is configured from: --data's one set's. A mixture's labels are per set: a task
    that reads none (task.mixes_sets) gets its first set's, any other refuses it."""
    sources = parse_data(data, loading.mixture)
    if not task.mixes_sets:
        required_single(sources, type(task).__name__)
    return read_manifest(sources[0].location)


def pixels_median(data: str, loading: LoaderOptions) -> int | None:
    """The median clip's pixels per frame in the training split, the largest of the sets' (None: not recorded)."""
    found = [m["splits"].get(loading.split, {}).get("pixels_median") for m in manifests(data, loading)]
    return max((p for p in found if p is not None), default=None)


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
