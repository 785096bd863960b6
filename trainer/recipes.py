"""Training recipes, each composed of the configs of the components it drives, so that a value reaches its component
by one path and is checked once, by the component's own config:

    model       ModelRecipe     the size, its constructor options (models/config.py names), weights to start from
    views       ViewSpec        (dali_pipes/sampling.py) frames, temporal sampling, crops, flips, repeated views
    loading     LoaderOptions   (dali_pipes/config.py) the split, decoder, threads, pipelines, shuffle buffer, ...
    optim       Optimization    the global batch, lr, AdamW, clipping, epochs, warmup, layer-wise lr decay
    run         Bookkeeping     seed, checkpoints, logging, pictures, the loss guard, compile
    masking     Masking         (pretraining) masking ratio and masks per view
    probe       Probing         (pretraining) probes of the encoder while it learns, on a labelled probe set
    augment     BatchAugment    (fine-tuning) mixup / cutmix, label smoothing, random erasing
    evaluation  Evaluation      (fine-tuning) the test split, clips x crops per video, validation every N epochs
Field names are unique across a recipe's sections, so an override may name a field alone.

Named after the seed's SlowFast configs (facebookresearch/SlowFast configs/masked_ssl) with the numbers of the MAE-ST
paper (arXiv 2205.09113), and the tiny CPU ones the demo and the tests run. Override any value on the command line
as field=value or section.field=value; model constructor options as model.<option>=value:
    deepspeed trainer/pretrain.py ... --recipe k400_VIT_L_16x4_MAE_PT blr=1e-3 optim.epochs=100 model.drop_path_rate=0.1
"""

import ast
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field

from dali_pipes import checks
from dali_pipes.config import LoaderOptions
from dali_pipes.sampling import ViewSpec
from models.config import MODEL_SIZES

# --- the sections -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRecipe:
    name: str = "vit_b"  # a key of models/config.py MODEL_SIZES
    options: dict = field(default_factory=dict)  # constructor overrides (models/config.py names), checked by its config
    init_from: str | None = None  # weights to start from (any checkpoint format load_pretrained reads)

    def __post_init__(self):
        checks.refuse("model choice", checks.problems(self, {
            "name": (lambda v: v in MODEL_SIZES, f"one of {', '.join(MODEL_SIZES)}"),
            "options": (lambda v: isinstance(v, dict), "a dict of constructor options"),
            "init_from": (checks.optional(lambda v: isinstance(v, str)), "a checkpoint's path, or None")}))


@dataclass(frozen=True)
class Optimization:
    """lr = blr x clips per optimizer step / 256, repeats not counted (the official code's choice); linear warmup,
    then a half-cycle cosine to min_lr, per step."""

    batch_size: int | None = None  # clips per optimizer step over all processes; None: the ds_config's micro batch
    blr: float = 1.6e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad: float = 0.02
    epochs: float = 200  # passes over the data (the paper counts epochs x repeats)
    warmup_epochs: float = 60
    layer_decay: float = 1.0  # lr x layer_decay^(blocks above): the embedding learns least (fine-tuning; 1: off)

    def __post_init__(self):
        checks.refuse("optimization", checks.problems(self, {
            "batch_size": (checks.optional(checks.integer(1)), "an integer >= 1, or None (the ds_config's)"),
            **{name: (checks.number(above=0), "a number > 0") for name in ("blr", "clip_grad", "epochs")},
            **{name: (checks.number(low=0), "a number >= 0") for name in ("min_lr", "weight_decay", "warmup_epochs")},
            "betas": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(map(checks.number(0, below=1), v)),
                      "two numbers in [0, 1), like (0.9, 0.95)"),
            "layer_decay": (checks.number(above=0, high=1), "a number in (0, 1]")}))


@dataclass(frozen=True)
class Bookkeeping:
    """Every *_every counts optimizer steps and 0 turns it off (a run still checkpoints at its end)."""

    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # the newest ones; older ones are deleted
    log_every: int = 10  # TensorBoard scalars (metrics.jsonl and the progress bar get every step)
    image_every: int = 500  # reconstruction pictures (pretraining)
    compile: bool = False  # torch.compile through the DeepSpeed engine
    explosion_factor: float | None = 2.0  # stop when the loss tops this x the mean of the last 5 (None: NaN/inf only)

    def __post_init__(self):
        checks.refuse("bookkeeping", checks.problems(self, {
            "seed": (checks.integer(0), "an integer >= 0"),
            "keep_checkpoints": (checks.integer(1), "an integer >= 1"),
            **{name: (checks.integer(0), "an integer >= 0: optimizer steps between them (0: off)")
               for name in ("checkpoint_every", "log_every", "image_every")},
            "compile": (checks.boolean, "True or False"),
            "explosion_factor": (checks.optional(checks.number(above=1)), "a number > 1, or None (NaN/inf only)")}))


@dataclass(frozen=True)
class Masking:
    mask_ratio: float = 0.9  # of the tubelets removed
    mask_repeats: int = 1  # masks per view in the model; views x masks = samples per decoded clip

    def __post_init__(self):
        checks.refuse("masking", checks.problems(self, {
            "mask_ratio": (checks.number(low=0, below=1), "a number in [0, 1)"),
            "mask_repeats": (checks.integer(1), "an integer >= 1")}))


@dataclass(frozen=True)
class Probing:
    """Pretraining's tracking of its encoder (trainer/tracking.py): before the first step and every probe_every
    epochs (0: never), kNN and a linear probe of the frozen encoder's pooled features, learning from the probe_train
    split of probe_data (None: the run's --data, its first set) and tested on its probe_test split."""

    probe_every: int = 0  # EPOCHS between probes (0: off)
    probe_data: str | None = None
    probe_train: str = "train"
    probe_test: str = "val"

    def __post_init__(self):
        checks.refuse("probing", checks.problems(self, {
            "probe_every": (checks.integer(0), "an integer >= 0: epochs between probes (0: off)"),
            "probe_data": (checks.optional(lambda v: isinstance(v, str) and v != ""), "a shards location, or None"),
            **{name: (lambda v: isinstance(v, str) and v != "", "a split name in the probe set's manifest")
               for name in ("probe_train", "probe_test")}}))


@dataclass(frozen=True)
class BatchAugment:
    """Fine-tuning's augmentations of whole batches, in torch after the loader (trainer/batch_augment.py)."""

    mixup: float = 0.8  # Beta(a, a) of mixup; 0 turns it off
    cutmix: float = 1.0  # Beta(a, a) of cutmix; 0 turns it off
    mixup_switch_prob: float = 0.5  # cutmix instead of mixup, when both are on
    label_smoothing: float = 0.1
    random_erasing: float = 0.25  # probability per view

    def __post_init__(self):
        checks.refuse("batch augmentation", checks.problems(self, {
            **{name: (checks.number(low=0), "a number >= 0") for name in ("mixup", "cutmix")},
            **{name: (checks.number(0, 1), "a number in [0, 1]") for name in ("mixup_switch_prob", "random_erasing")},
            "label_smoothing": (checks.number(low=0, below=1), "a number in [0, 1)")}))


@dataclass(frozen=True)
class Evaluation:
    eval_split: str = "val"
    eval_clips: int = 7  # final test: temporal clips x spatial crops per video, softmax averaged
    eval_crops: int = 3
    eval_every: int = 1  # EPOCHS between quick single-view validations (0: none)

    def __post_init__(self):
        checks.refuse("evaluation", checks.problems(self, {
            "eval_split": (lambda v: isinstance(v, str) and v != "", "a split name in the shards' manifest"),
            **{name: (checks.integer(1), "an integer >= 1") for name in ("eval_clips", "eval_crops")},
            "eval_every": (checks.integer(0), "an integer >= 0: epochs between validations (0: off)")}))


@dataclass(frozen=True)
class Recipe:
    """What the two trainers share."""

    model: ModelRecipe = ModelRecipe()
    views: ViewSpec = ViewSpec()
    loading: LoaderOptions = LoaderOptions()
    optim: Optimization = Optimization()
    run: Bookkeeping = Bookkeeping()


@dataclass(frozen=True)
class PretrainRecipe(Recipe):
    masking: Masking = Masking()
    probe: Probing = Probing()


@dataclass(frozen=True)
class FinetuneRecipe(Recipe):
    views: ViewSpec = ViewSpec(repeats=2, scale=(0.08, 1.0))  # repeated augmentation 2, crop scale 0.08-1
    loading: LoaderOptions = LoaderOptions(rand_augment=(2, 7))  # (ops, magnitude): DALI's, on the GPU
    optim: Optimization = Optimization(blr=2.4e-3, betas=(0.9, 0.999), min_lr=1e-6, clip_grad=5.0, epochs=75,
                                       warmup_epochs=5, layer_decay=0.65)
    # a small batch's cross-entropy legitimately doubles from step to step: the guard stops on NaN/inf only
    run: Bookkeeping = Bookkeeping(image_every=0, explosion_factor=None)
    augment: BatchAugment = BatchAugment()
    evaluation: Evaluation = Evaluation()


# --- the recipes ----------------------------------------------------------------------------------------------------

# the demo's tiny encoder: 64 x 64 x 8 frames in 8 x 8 x 2 tubelets (256 tokens), width 96, depth 4
DEMO_ENCODER = {"img_size": 64, "num_frames": 8, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}
DEMO_FRAMES = {"num_frames": 8, "stride": 4, "target_fps": None, "crop_size": 64}
DEMO_MAE = {**DEMO_ENCODER, "decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4, "pred_t_dim": 4}


def _paper_pretraining(size: str, epochs: int, warmup: int) -> PretrainRecipe:
    return PretrainRecipe(model=ModelRecipe(size, {"norm_pix_loss": True}),
                          optim=Optimization(batch_size=512, epochs=epochs, warmup_epochs=warmup))


PRETRAIN_RECIPES = {
    # SlowFast configs/masked_ssl: 200 / 200 / 400 passes with 60 / 30 / 60 of warmup, batch 512 clips x 4 repeats
    # (recomputing blocks in backward is decided from the memory estimate: trainer/memory_plan.py)
    "k400_VIT_B_16x4_MAE_PT": _paper_pretraining("vit_b", 200, 60),
    "k400_VIT_L_16x4_MAE_PT": _paper_pretraining("vit_l", 200, 30),
    "k400_VIT_H_16x4_MAE_PT": _paper_pretraining("vit_h", 400, 60),
    # the demo (tools/make_demo_data.py): the tiny model on the demo's pretraining split, read as unlabelled clips,
    # in minutes on 2 CPU cores; its encoder's kNN and linear probe (that split's labels -> val) before the first
    # step and every 10 epochs. Where it departs from the paper, measured on this set (README, "Use the encoder"): pixel
    # targets unnormalized (per-patch normalization turns the flat, noisy background patches into unit-variance
    # noise), 75% masking of its 256 tokens (64 visible), 16 clips per step at a higher blr. `make demo-learns`
    # runs it 120 epochs, as long as the effect on the encoder needs
    "demo_PT": PretrainRecipe(
        model=ModelRecipe("vit_tiny", {**DEMO_MAE, "norm_pix_loss": False}), views=ViewSpec(**DEMO_FRAMES, repeats=2),
        loading=LoaderOptions(split="pretrain"), masking=Masking(mask_ratio=0.75),
        optim=Optimization(batch_size=16, blr=2.5e-2, clip_grad=1.0, epochs=20, warmup_epochs=2),
        # the loss of a few clips x 2 views legitimately doubles from step to step: the guard stops on NaN/inf only
        run=Bookkeeping(checkpoint_every=200, log_every=20, image_every=200, explosion_factor=None),
        probe=Probing(probe_every=10, probe_train="pretrain"),
    ),
    # the same model at the paper's settings in steps of 4 clips, no probes: a step in a fraction of a second on a
    # CPU, for the suite and quick checks of the machinery (its encoder learns little in its few hundred steps)
    "tiny_PT": PretrainRecipe(
        model=ModelRecipe("vit_tiny", DEMO_MAE), views=ViewSpec(**DEMO_FRAMES, repeats=2),
        optim=Optimization(blr=1.5e-2, clip_grad=1.0, epochs=40, warmup_epochs=3),
        run=Bookkeeping(checkpoint_every=100, log_every=5, image_every=100, explosion_factor=None),
    ),
}
# each with decoder masking (ours, models/decoder_subsets.py): the decoder reconstructs half of the masked tokens,
# drawn per view (VideoMAE V2 reports ViT-B 1.79x faster at equal accuracy with its 50% decoder mask on tube masking;
# untested on K400 with MAE-ST's random masking: README, "Decoder masking")
PRETRAIN_RECIPES.update({
    f"{name}_DM50": dataclasses.replace(recipe, model=dataclasses.replace(
        recipe.model, options={**recipe.model.options, "decoder_keep": 0.5}))
    for name, recipe in PRETRAIN_RECIPES.items()
})


def _finetuning(size: str, options: dict, **changes) -> FinetuneRecipe:
    """FinetuneRecipe's defaults for model `size` with constructor `options`, and {section: {field: value}}."""
    base = FinetuneRecipe(model=ModelRecipe(size, options))
    return dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **fields)
                                        for section, fields in changes.items()})


# drop path, layer-wise lr decay and head dropout per size from the paper; SlowFast's base lr is per 8-GPU node of 64
# clips: blr = lr x 256 / 64 (mae_st's blr 2.4e-3 for ViT-B agrees)
FINETUNE_RECIPES = {
    "k400_VIT_B_16x4_FT": _finetuning("vit_b", {"drop_path_rate": 0.1, "dropout": 0.3},
                                      optim={"layer_decay": 0.65, "blr": 2.4e-3, "epochs": 75}),
    "k400_VIT_L_16x4_FT": _finetuning("vit_l", {"drop_path_rate": 0.2, "dropout": 0.3},
                                      optim={"layer_decay": 0.75, "blr": 1.2e-3, "epochs": 50}),
    "k400_VIT_H_16x4_FT": _finetuning("vit_h", {"drop_path_rate": 0.2, "dropout": 0.5},
                                      optim={"layer_decay": 0.8, "blr": 1.2e-3, "epochs": 75}, views={"repeats": 1}),
}
# the demo's few labels (its train split: 4 clips per class of 12) from the demo_PT model: no mixup, cutmix or
# RandAugment; one view per clip, crops of at least half the frame (the moving shape stays in view)
DEMO_CLASSIFIER = {**DEMO_ENCODER, "drop_path_rate": 0.0, "dropout": 0.0}
_DEMO_FT = dict(loading={"rand_augment": None}, augment={"mixup": 0.0, "cutmix": 0.0, "random_erasing": 0.0},
                optim={"layer_decay": 0.65, "blr": 5e-3, "clip_grad": 5.0, "epochs": 100, "warmup_epochs": 5},
                evaluation={"eval_clips": 2, "eval_crops": 3, "eval_every": 25},
                run={"checkpoint_every": 500, "log_every": 20})
FINETUNE_RECIPES["demo_FT"] = _finetuning("vit_tiny", DEMO_CLASSIFIER, views={**DEMO_FRAMES, "repeats": 1,
                                                                            "scale": (0.5, 1.0)}, **_DEMO_FT)

# Something-Something v2 (174 classes) from a Kinetics MAE-ST checkpoint. Direction is the class ("Pushing something
# from left to right" / "... from right to left" are mirror images): no flips, as SlowFast's SSv2 configs
# (DATA.RANDOM_FLIP: False) and VideoMAE do. 16 frames by segment sampling over the whole clip, each of the 2
# repeated views its own draw; testing 2 temporal clips x 3 crops (VideoMAE: --test_num_segment 2 --test_num_crop
# 3). Optimization after VideoMAE's SSv2 ViT-B fine-tuning script (MCG-NJU/VideoMAE scripts/ssv2/...epoch_2400/
# finetune.sh: AdamW (0.9, 0.999), lr 5e-4 per 256 samples, weight decay 0.05, repeated augmentation 2, RandAugment
# rand-m7-n4) with MAE-ST's Kinetics regularization per size (drop path, layer decay, head dropout).
_SSV2_VIEWS = {"sampling": "segments", "per_view_start": True, "flip": False, "target_fps": None, "repeats": 2}
_SSV2_OPTIM = {"blr": 5e-4, "betas": (0.9, 0.999), "epochs": 40, "warmup_epochs": 5}
FINETUNE_RECIPES.update({
    "ssv2_VIT_B_16x2_FT": _finetuning("vit_b", {"drop_path_rate": 0.1, "dropout": 0.3}, views=_SSV2_VIEWS,
                                      loading={"rand_augment": (4, 7)}, evaluation={"eval_clips": 2, "eval_crops": 3},
                                      optim={**_SSV2_OPTIM, "layer_decay": 0.65}),
    "ssv2_VIT_L_16x2_FT": _finetuning("vit_l", {"drop_path_rate": 0.2, "dropout": 0.3}, views=_SSV2_VIEWS,
                                      loading={"rand_augment": (4, 7)}, evaluation={"eval_clips": 2, "eval_crops": 3},
                                      optim={**_SSV2_OPTIM, "layer_decay": 0.75}),
    # the SSv2-shaped demo (tools/make_ssv2_demo.py): its classes are directions of motion, a mirrored pair among them.
    # Fine-tuned from `make demo`'s model (make demo-ssv2) on a few dozen clips: crops keep half the frame at least, so
    # the moving object stays in view
    "demo_ssv2_FT": _finetuning("vit_tiny", DEMO_CLASSIFIER, views={**_SSV2_VIEWS, **DEMO_FRAMES, "scale": (0.5, 1.0)},
                                **{**_DEMO_FT, "optim": {"layer_decay": 0.9, "blr": 0.1, "clip_grad": 5.0, "epochs": 40,
                                                         "warmup_epochs": 2},
                                   "evaluation": {"eval_clips": 2, "eval_crops": 3},
                                   "run": {"checkpoint_every": 500, "log_every": 5}}),
})


# --- overrides ------------------------------------------------------------------------------------------------------


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
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    allowed = tuple(typing.get_origin(kind) or kind for kind in (typing.get_args(annotation) if union else
                                                                 (annotation,)))  # (tuple[int, int] -> tuple)
    if value is None and type(None) in allowed:
        return None
    if str in allowed:
        return text
    if float in allowed and type(value) is int:
        return float(value)
    if tuple in allowed and isinstance(value, (list, tuple)):
        return tuple(value)
    if any(kind is object or type(value) is kind for kind in allowed):
        return value
    names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in allowed)
    raise ValueError(f"{key}={text!r} (must be {names})")


def sections(recipe) -> dict:
    """{section name: its config} of a recipe."""
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}


def _field_types(config) -> dict:
    hints = typing.get_type_hints(type(config))
    return {f.name: hints[f.name] for f in dataclasses.fields(config)}


def _place(key: str, recipe) -> tuple[str, str]:
    """(section, field) an override's key names: section.field, a field one section alone has, or model.<option>."""
    parts = sections(recipe)
    section, dot, name = key.partition(".")
    if dot:
        if section not in parts:
            raise ValueError(f"unknown recipe section {section!r} in {key!r}; sections are {sorted(parts)}")
        if section == "model" and name not in _field_types(parts["model"]):
            return "model.options", name
        if name not in _field_types(parts[section]):
            raise ValueError(f"{section} has no field {name!r}; its fields are {sorted(_field_types(parts[section]))}")
        return section, name
    owners = [s for s, config in parts.items() if key in _field_types(config)]
    if len(owners) == 1:
        return owners[0], key
    if owners:
        raise ValueError(f"{key!r} is a field of {' and '.join(owners)}: say which, e.g. {owners[0]}.{key}=...")
    if key == "lr":
        raise ValueError("'lr' is not set directly: lr = blr x clips per optimizer step / 256 (the paper's rule, "
                         "repeats not counted): set blr=...")
    known = sorted({f for config in parts.values() for f in _field_types(config)})
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    guess = f"did you mean {' or '.join(close)}? " if close else ""
    raise ValueError(f"unknown recipe field {key!r}; {guess}fields are {known} (or section.field), and "
                     "model.<option>")


def resolve_recipe(recipes: dict, name: str, overrides: list[str], problems: list | None = None):
    """The named recipe with key=value overrides applied, each section checking its own values: every bad override
    and value in one ValueError, or, given a `problems` list, appended to it (the sections that took their overrides
    have them, the others keep the recipe's values)."""
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(recipes)}")
    gather = problems is not None
    recipe, problems, changes = recipes[name], problems if gather else [], {}
    for item in overrides:
        key, sep, text = item.partition("=")
        try:
            if not sep:
                raise ValueError(f"override {item!r} is not key=value")
            section, field_name = _place(key, recipe)
            if section == "model.options":
                changes.setdefault("model", {}).setdefault("options", dict(recipe.model.options))[field_name] = \
                    _parse_value(key, text)
            else:
                typed = _parse_value(key, text, _field_types(getattr(recipe, section))[field_name])
                changes.setdefault(section, {})[field_name] = typed
        except ValueError as err:
            problems.append(str(err))
    replaced = {}
    for section, fields in changes.items():
        try:  # (each section refuses all of its bad values at once)
            replaced[section] = dataclasses.replace(getattr(recipe, section), **fields)
        except ValueError as err:
            problems.append(str(err))
    if not gather:
        checks.refuse("recipe overrides", problems)
    return dataclasses.replace(recipe, **replaced)


# --- resuming -------------------------------------------------------------------------------------------------------

# Values a resumed run may change without changing what it computes: bookkeeping, evaluation, the guard, and how the
# loader gets its work done (the order of its batches does not depend on them). Any other change makes a run that
# differs from one started with it, and is refused at resume unless asked for (--allow-changes).
CHANGEABLE_ON_RESUME = {"run.checkpoint_every", "run.keep_checkpoints", "run.log_every", "run.image_every",
                        "run.explosion_factor", "probe.probe_every", "probe.probe_data", "probe.probe_train",
                        "probe.probe_test", "evaluation.eval_split", "evaluation.eval_clips",
                        "evaluation.eval_crops", "evaluation.eval_every", "loading.num_threads",
                        "loading.decode_pipelines", "loading.prefetch", "loading.dont_use_mmap"}


def as_saved(recipe) -> dict:
    """The recipe as a checkpoint's meta.json records it: {"section.field": value}, in JSON's types."""
    flat = {f"{section}.{name}": value for section, config in sections(recipe).items()
            for name, value in dataclasses.asdict(config).items()}
    return json.loads(json.dumps(flat, default=str))


def _options_apart(flat: dict) -> dict:
    """The model's constructor options as fields of their own ("model.options.decoder_keep"), so that a change names
    the option, not the whole dict."""
    options = flat.get("model.options") or {}
    return {**{k: v for k, v in flat.items() if k != "model.options"},
            **{f"model.options.{name}": value for name, value in options.items()}}


def recipe_changes(saved: dict, recipe) -> dict:
    """{"section.field": (as saved, now)} for the values of `recipe` that differ from a saved one (a model option
    as "model.options.NAME")."""
    saved, now = _options_apart(saved), _options_apart(as_saved(recipe))
    return {name: (saved.get(name), now.get(name)) for name in {*saved, *now} if saved.get(name) != now.get(name)}


def recipe_kind(flat: dict) -> str:
    """"pretraining" or "fine-tuning", from a recipe as_saved (the sections it has)."""
    return "pretraining" if any(name.startswith("masking.") for name in flat) else "fine-tuning"
