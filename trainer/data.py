"""The loaders a run uses, configured once from its recipe: the training loader, and for testing the same one with
evaluation views on the test split."""

from dataclasses import replace

from dali_pipes import EvalViews, LoaderConfig, TrainViews, ViewSpec


def loader_config(recipe, data: str, env, micro_batch: int, dtype) -> LoaderConfig:
    """The training loader of a recipe (pretraining or fine-tuning) for this process."""
    spec = ViewSpec(num_frames=recipe.num_frames, sampling=recipe.sampling, stride=recipe.stride,
                    target_fps=recipe.target_fps, repeats=recipe.repeats, per_view_start=recipe.per_view_start,
                    crop_size=recipe.crop_size, scale=tuple(recipe.scale), flip=recipe.flip)
    return LoaderConfig(
        data, TrainViews(spec), split=recipe.split, batch_size=micro_batch, rank=env.rank,
        world_size=env.world_size, seed=recipe.seed, decoder=recipe.decoder, device=env.device, dtype=dtype,
        num_threads=recipe.loader_threads, processes_per_node=env.local_world_size,
        decode_pipelines=recipe.decode_pipelines, rand_augment=getattr(recipe, "rand_augment", None),
        skip_damaged_shards=recipe.skip_damaged_shards, dont_use_mmap=recipe.dont_use_mmap,
        shuffle_buffer=recipe.shuffle_buffer)


def eval_config(train: LoaderConfig, split: str, clips: int, crops: int) -> LoaderConfig:
    """The test loader beside a training one: clips x crops views of every video of `split`, in order, about as
    many views per batch as the training batch has clips."""
    spec = replace(train.views.spec, repeats=1, per_view_start=False, flip=False)
    return replace(train, views=EvalViews(spec, clips, crops), split=split,
                   batch_size=max(1, train.batch_size // (clips * crops)), rand_augment=None)
