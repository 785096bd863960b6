"""Training recipes, named after the seed's SlowFast configs (facebookresearch/SlowFast configs/masked_ssl), with the
numbers of the MAE-ST paper (arXiv 2205.09113), and the tiny CPU ones the demo and the tests run.

Any field can be overridden on the command line as key=value (model constructor options as model.key=value):
    deepspeed trainer/pretrain.py ... --recipe k400_VIT_L_16x4_MAE_PT blr=1e-3 epochs=100 model.drop_path_rate=0.1
"""

import ast
import dataclasses
import json
import typing
from dataclasses import dataclass, field

from dali_pipes.sampling import SAMPLINGS


@dataclass(frozen=True)
class Recipe:
    """What the two trainers share: model, data, optimization, bookkeeping."""

    model: str = "vit_b"
    model_options: dict = field(default_factory=dict)  # constructor overrides (models/config.py names)
    init_from: str | None = None  # weights to start from (any checkpoint format load_pretrained reads)
    # data
    split: str = "train"
    num_frames: int = 16
    sampling: str = "stride"  # stride: num_frames x stride from a random start; segments: one frame per segment
    stride: int = 4
    target_fps: float | None = 30.0  # mae_st / SlowFast sample at 30 fps whatever the source rate
    crop_size: int = 224
    repeats: int = 4  # views per decoded clip
    per_view_start: bool = False  # each view its own frames (its own start, or its own draw in each segment)
    flip: bool = True  # horizontal flips; off where direction is the class (Something-Something v2)
    decoder: str = "auto"
    loader_threads: int | None = None
    decode_pipelines: int | None = None  # DALI pipelines taking turns per process (None: 4 on a GPU, 1 on a CPU)
    dont_use_mmap: bool = False  # True on network filesystems (NFS, Lustre, GPFS): plain reads instead of mmap
    shuffle_buffer: int = 1024  # clips in DALI's shuffle buffer per process (host memory: the log says how much)
    skip_damaged_shards: bool = False  # train without shards that are cut short or lack their index (logged)
    # optimization: lr = blr x clips per step / 256, repeats not counted (the official code's choice)
    batch_size: int | None = None  # clips per optimizer step over all ranks; None: whatever the ds_config gives
    blr: float = 1.6e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad: float = 0.02
    epochs: float = 200  # passes over the data (the paper counts epochs x repeats)
    warmup_epochs: float = 60
    # bookkeeping; every *_every counts optimizer steps but eval_every, which counts epochs; 0 turns it off (a run
    # still checkpoints at its end)
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10  # TensorBoard scalars (metrics.jsonl and the progress bar get every step)
    image_every: int = 500  # reconstruction pictures
    compile: bool = False  # torch.compile through the DeepSpeed engine
    explosion_factor: float | None = 2.0  # stop when the loss tops this x the mean of the last 5 (None: NaN/inf only)


@dataclass(frozen=True)
class PretrainRecipe(Recipe):
    mask_ratio: float = 0.9
    mask_repeats: int = 1  # masks per view in the model; views x masks = samples per decoded clip
    scale: tuple = (0.5, 1.0)


_PAPER_PT = dict(batch_size=512, model_options={"norm_pix_loss": True})
# the demo's tiny encoder: 64 x 64 x 8 frames in 8 x 8 x 2 tubelets (256 tokens), width 96, depth 4
DEMO_ENCODER = {"img_size": 64, "num_frames": 8, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}
PRETRAIN_RECIPES = {
    # SlowFast configs/masked_ssl: 200 / 200 / 400 passes with 60 / 30 / 60 of warmup, batch 512 clips x 4 repeats
    "k400_VIT_B_16x4_MAE_PT": PretrainRecipe(model="vit_b", epochs=200, warmup_epochs=60, **_PAPER_PT),
    "k400_VIT_L_16x4_MAE_PT": PretrainRecipe(model="vit_l", epochs=200, warmup_epochs=30, **_PAPER_PT),
    # (recomputing blocks in backward is decided from the memory estimate: trainer/memory_plan.py)
    "k400_VIT_H_16x4_MAE_PT": PretrainRecipe(model="vit_h", epochs=400, warmup_epochs=60, **_PAPER_PT),
    # a few hundred steps of a tiny model on the demo shards, in minutes on two CPU cores
    "demo_PT": PretrainRecipe(
        model="vit_tiny", model_options={**DEMO_ENCODER, "decoder_embed_dim": 64, "decoder_depth": 2,
                                         "decoder_num_heads": 4, "pred_t_dim": 4},
        num_frames=8, stride=4, target_fps=None, crop_size=64, repeats=2, blr=1.5e-2, clip_grad=1.0,
        epochs=40, warmup_epochs=3, checkpoint_every=100, log_every=5, image_every=100,
        explosion_factor=None,  # the loss of 4 clips x 2 views legitimately doubles from step to step: NaN/inf only
    ),
}


def _parse_value(key: str, text: str, annotation=None):
    """The override's text as a value of the field's declared type (`epochs=2.5` for a float field, `seed=3` for an
    int, `target_fps=None` where None is allowed, a bare word for a string); without an annotation (model options,
    checked by the model's config) the literal it reads as."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if annotation is None:
        return value
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None and type(None) in allowed:
        return None
    if str in allowed:
        return text
    if float in allowed and type(value) is int:
        return float(value)
    if tuple in allowed and isinstance(value, (list, tuple)):
        return tuple(value)
    if any(type(value) is kind for kind in allowed):
        return value
    names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in allowed)
    raise ValueError(f"{key}={text!r} (must be {names})")


def resolve_recipe(recipes: dict, name: str, overrides: list[str]):
    """The named recipe with key=value overrides applied; every bad override in one ValueError."""
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(recipes)}")
    recipe = recipes[name]
    fields = {f.name: f.type for f in dataclasses.fields(recipe)}
    changes, model_options, problems = {}, dict(recipe.model_options), []
    for item in overrides:
        key, sep, text = item.partition("=")
        try:
            if not sep:
                raise ValueError(f"override {item!r} is not key=value")
            if key.startswith("model."):
                model_options[key[len("model."):]] = _parse_value(key, text)
            elif key in fields and key != "model_options":
                changes[key] = _parse_value(key, text, fields[key])
            else:
                raise ValueError(f"unknown recipe field {key!r}; fields are {sorted(set(fields) - {'model_options'})} "
                                 "and model.<option>")
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("invalid overrides: " + "; ".join(problems))
    return dataclasses.replace(recipe, model_options=model_options, **changes)


@dataclass(frozen=True)
class FinetuneRecipe(Recipe):
    num_classes: int | None = None  # None: from the shards' label map
    drop_path: float = 0.1
    dropout: float = 0.3  # before the head
    layer_decay: float = 0.65  # lr x layer_decay^(blocks above): the embedding learns least
    scale: tuple = (0.08, 1.0)
    repeats: int = 2  # repeated augmentation
    rand_augment: tuple | None = (2, 7)  # (ops, magnitude), DALI's RandAugment on the GPU
    mixup: float = 0.8  # Beta(a, a) of mixup; 0 turns it off
    cutmix: float = 1.0  # Beta(a, a) of cutmix; 0 turns it off
    mixup_switch_prob: float = 0.5  # cutmix instead of mixup, when both are on
    label_smoothing: float = 0.1
    random_erasing: float = 0.25  # probability per view
    blr: float = 2.4e-3
    betas: tuple = (0.9, 0.999)
    min_lr: float = 1e-6
    clip_grad: float = 5.0
    epochs: float = 75
    warmup_epochs: float = 5
    eval_split: str = "val"
    eval_clips: int = 7  # final test: temporal clips x spatial crops per video, softmax averaged
    eval_crops: int = 3
    eval_every: int = 1  # EPOCHS between quick single-view validations (0: none)
    image_every: int = 0
    explosion_factor: float | None = None  # a small batch's cross-entropy legitimately doubles: NaN/inf only


# SlowFast's base lr is per 8-GPU node of 64 clips: blr = lr x 256 / 64 (mae_st's blr 2.4e-3 for ViT-B agrees).
FINETUNE_RECIPES = {
    "k400_VIT_B_16x4_FT": FinetuneRecipe(model="vit_b", drop_path=0.1, layer_decay=0.65, blr=2.4e-3, epochs=75,
                                         dropout=0.3, repeats=2),
    "k400_VIT_L_16x4_FT": FinetuneRecipe(model="vit_l", drop_path=0.2, layer_decay=0.75, blr=1.2e-3, epochs=50,
                                         dropout=0.3, repeats=2),
    "k400_VIT_H_16x4_FT": FinetuneRecipe(model="vit_h", drop_path=0.2, layer_decay=0.8, blr=1.2e-3, epochs=75,
                                         dropout=0.5, repeats=1),
    # the demo's motion classes from the demo_PT model: no mixup, cutmix or RandAugment on 68 clips
    "demo_FT": FinetuneRecipe(
        model="vit_tiny", model_options=DEMO_ENCODER,
        num_frames=8, stride=4, target_fps=None, crop_size=64, repeats=2, rand_augment=None, mixup=0.0, cutmix=0.0,
        random_erasing=0.0, drop_path=0.0, dropout=0.0, layer_decay=0.9, blr=0.1, clip_grad=5.0, epochs=25,
        warmup_epochs=2, eval_clips=2, eval_crops=3, checkpoint_every=200, log_every=5,
    ),
}

# Something-Something v2 (174 classes) from a Kinetics MAE-ST checkpoint. Direction is the class ("Pushing something
# from left to right" / "... from right to left" are mirror images): no flips, as SlowFast's SSv2 configs
# (DATA.RANDOM_FLIP: False) and VideoMAE do. 16 frames by segment sampling over the whole clip, each of the 2
# repeated views its own draw; testing 2 temporal clips x 3 crops (VideoMAE: --test_num_segment 2 --test_num_crop
# 3). Optimization after VideoMAE's SSv2 ViT-B fine-tuning script (MCG-NJU/VideoMAE scripts/ssv2/...epoch_2400/
# finetune.sh: AdamW (0.9, 0.999), lr 5e-4 per 256 samples, weight decay 0.05, repeated augmentation 2, RandAugment
# rand-m7-n4) with MAE-ST's Kinetics regularization per size (drop path, layer decay, head dropout).
_SSV2 = dict(sampling="segments", per_view_start=True, flip=False, target_fps=None, repeats=2, blr=5e-4,
             betas=(0.9, 0.999), rand_augment=(4, 7), epochs=40, warmup_epochs=5, eval_clips=2, eval_crops=3)
FINETUNE_RECIPES.update({
    "ssv2_VIT_B_16x2_FT": FinetuneRecipe(model="vit_b", drop_path=0.1, layer_decay=0.65, dropout=0.3, **_SSV2),
    "ssv2_VIT_L_16x2_FT": FinetuneRecipe(model="vit_l", drop_path=0.2, layer_decay=0.75, dropout=0.3, **_SSV2),
    # the SSv2-shaped demo (tools/make_ssv2_demo.py): its classes are directions of motion, a mirrored pair among them.
    # Fine-tuned from `make demo`'s model (make demo-ssv2) on a few dozen clips: crops keep half the frame at least, so
    # the moving object stays in view
    "demo_ssv2_FT": FinetuneRecipe(
        model="vit_tiny", model_options=DEMO_ENCODER, num_frames=8, crop_size=64, scale=(0.5, 1.0), sampling="segments",
        per_view_start=True, flip=False, target_fps=None, repeats=2, rand_augment=None, mixup=0.0, cutmix=0.0,
        random_erasing=0.0, drop_path=0.0, dropout=0.0, layer_decay=0.9, blr=0.1, clip_grad=5.0, epochs=40,
        warmup_epochs=2, eval_clips=2, eval_crops=3, checkpoint_every=500, log_every=5,
    ),
})


def _positive_int(v):
    return type(v) is int and v >= 1


def _count(v):
    return type(v) is int and v >= 0


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pair(low, high, v):
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(x) and low <= x <= high for x in v) \
        and v[0] <= v[1]


# field -> (test, the allowed values in words); fields a recipe class lacks are skipped
_RULES = {
    **{name: (_positive_int, "an integer >= 1") for name in (
        "num_frames", "stride", "crop_size", "repeats", "keep_checkpoints", "mask_repeats", "eval_clips",
        "eval_crops", "shuffle_buffer")},
    **{name: (_count, "an integer >= 0: optimizer steps between them (0: off)") for name in (
        "checkpoint_every", "log_every", "image_every")},
    "eval_every": (_count, "an integer >= 0: epochs between validations (0: off)"),
    **{name: (lambda v: v is None or _positive_int(v), "an integer >= 1, or None (automatic)") for name in (
        "loader_threads", "decode_pipelines", "batch_size", "num_classes")},
    "seed": (lambda v: type(v) is int, "an integer"),
    "blr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "clip_grad": (lambda v: _number(v) and v > 0, "a number > 0"),
    "epochs": (lambda v: _number(v) and v > 0, "a number > 0"),
    **{name: (lambda v: _number(v) and v >= 0, "a number >= 0") for name in (
        "min_lr", "weight_decay", "warmup_epochs", "mixup", "cutmix")},
    **{name: (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)") for name in (
        "mask_ratio", "label_smoothing", "drop_path", "dropout")},
    **{name: (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]") for name in (
        "random_erasing", "mixup_switch_prob")},
    "layer_decay": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "target_fps": (lambda v: v is None or (_number(v) and v > 0), "a number > 0, or None (the video's own rate)"),
    "explosion_factor": (lambda v: v is None or (_number(v) and v > 1), "a number > 1, or None (NaN/inf only)"),
    "betas": (lambda v: _pair(0, 0.999999, v), "two numbers in [0, 1), like (0.9, 0.95)"),
    "scale": (lambda v: _pair(1e-9, 1, v) and v[0] > 0, "(low, high) area fractions with 0 < low <= high <= 1"),
    "rand_augment": (lambda v: v is None or (isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_count, v))),
                     "None, or (number of ops, magnitude) as two integers >= 0"),
    "split": (lambda v: isinstance(v, str) and v != "", "a split name in the shards' manifest"),
    "sampling": (lambda v: v in SAMPLINGS, " or ".join(SAMPLINGS)),
    **{name: (lambda v: type(v) is bool, "True or False") for name in (
        "flip", "per_view_start", "compile", "dont_use_mmap", "skip_damaged_shards")},
    "eval_split": (lambda v: isinstance(v, str) and v != "", "a split name in the shards' manifest"),
}


# Fields a resumed run may change without changing what it computes: bookkeeping, evaluation, the guard, and how the
# loader gets its work done (the order of its batches does not depend on them). Any other change makes a run that
# differs from one started with it, and is refused at resume unless asked for (--allow-changes).
CHANGEABLE_ON_RESUME = {"checkpoint_every", "keep_checkpoints", "log_every", "image_every", "eval_every", "eval_split",
                        "eval_clips", "eval_crops", "explosion_factor", "loader_threads", "decode_pipelines",
                        "dont_use_mmap"}


def as_saved(recipe) -> dict:
    """The recipe as a checkpoint's meta.json records it (JSON's types: tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(recipe), default=str))


def recipe_changes(saved: dict, recipe) -> dict:
    """{field: (as saved, now)} for the fields of `recipe` that differ from a saved one."""
    now = as_saved(recipe)
    return {name: (saved.get(name), value) for name, value in now.items() if saved.get(name) != value}


def recipe_problems(recipe) -> list[str]:
    """Every value outside its allowed range, one phrase each naming it and what it may be ([] if all are fine)."""
    from dali_pipes.decoders import DECODER_NAMES

    problems = [f"{name}={getattr(recipe, name)!r} (must be {allowed})" for name, (test, allowed) in _RULES.items()
                if hasattr(recipe, name) and not test(getattr(recipe, name))]
    if recipe.decoder not in DECODER_NAMES:
        problems.append(f"decoder={recipe.decoder!r} (must be one of {', '.join(DECODER_NAMES)})")
    return problems
