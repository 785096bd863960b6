"""The loaders a run uses, made from its recipe's sections without copying them field by field: the training loader
(the recipe's views and loading options, for this process), and for testing the same one with evaluation views on
the test split; and what the run reads of the data's manifests (one per set of a mixture)."""

import dataclasses
import json

from dali_pipes import EvalViews, LoaderConfig, TrainViews
from dali_pipes.config import LoaderOptions
from dali_pipes.mixture import parse_data, required_single
from dali_pipes.shard_format import read_manifest, split_fingerprint


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


def data_facts(data: str, loading: LoaderOptions) -> list[dict]:
    """What a run reads, as its checkpoints record it: per set its name, location, weight, plan options and the
    fingerprint of its split (the same shards copied or moved elsewhere keep it)."""
    return [{"name": s.name, "location": s.location, "weight": round(s.weight, 6), "plan": s.plan,
             "fingerprint": split_fingerprint(read_manifest(s.location), loading.split)}
            for s in parse_data(data, loading.mixture)]


def data_change(saved: list | None, now: list) -> str | None:
    """What differs between the data a checkpoint was written on (its data_facts, None for a checkpoint older than
    them) and `now`, in words; None when it is the same data (the same shards moved elsewhere count as the same)."""
    if saved is None:
        return None
    same = [{k: v for k, v in s.items() if k != "location"} for s in saved] == \
        [{k: v for k, v in s.items() if k != "location"} for s in json.loads(json.dumps(now))]
    if same:
        return None

    def describe(facts):
        return ",".join(f"{f['name']}={f['location']}" + (f":{f['weight']:g}" if len(facts) > 1 else "") +
                        "".join(f":{k}={v}" for k, v in sorted(f["plan"].items())) for f in facts)

    content = {f["name"] for f in saved if f["fingerprint"] not in {g["fingerprint"] for g in now}}
    detail = f" (other shards in {', '.join(sorted(content))})" if content and describe(saved) == describe(now) else ""
    return f"{describe(saved)} -> {describe(now)}{detail}"


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
    return dataclasses.replace(train, views=EvalViews(train.views.spec, clips, crops), split=split,
                               batch_size=max(1, train.batch_size // (clips * crops)), rand_augment=None)


def check_model_fits_views(model_cfg, views) -> None:
    """The clips the loader makes are the ones the model takes."""
    if (model_cfg.num_frames, model_cfg.img_size) != (views.num_frames, views.crop_size):
        raise ValueError(f"the loader makes clips of {views.num_frames} frames at {views.crop_size}px but the model "
                         f"takes {model_cfg.num_frames} at {model_cfg.img_size}: set num_frames/crop_size or "
                         "model.num_frames/model.img_size to agree")
