"""Official MAE-ST checkpoints in and out: mae_st files, SlowFast model-zoo files (the seed's links) and our own.

The formats (as saved by facebookresearch/mae_st's util/misc.py save_model and facebookresearch/SlowFast's
slowfast/utils/checkpoint.py save_checkpoint; key/shape lists of every released variant: tests/data/checkpoint_keys/):
- ours: fused `attn.qkv`, decoder as decoder_blocks / decoder_norm / decoder_pred, classifier head `head`.
- mae_st: {'model': state_dict, 'optimizer', 'epoch', 'scaler', 'args'}; separate attn.q / attn.k / attn.v linears.
- slowfast: {'model_state': state_dict, 'epoch', 'optimizer_state', 'cfg'}; fused qkv; decoder blocks under
  pred_head.transforms.0.{i}, the decoder norm at pred_head.transforms.0.{depth}, the prediction at
  pred_head.projections.0; classifier head at head.projection. Its decoder layout differs too (config.SLOWFAST_LAYOUT).

Loading is strict: a missing, unexpected or misshapen tensor is an error that names it, except the classifier head,
which fine-tuning re-initializes when the file has none (or one for another number of classes).
"""

import argparse
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from models.config import MAE_ST_LAYOUT, SLOWFAST_LAYOUT
from models.mae import MaskedAutoencoder

FORMATS = ("ours", "mae_st", "slowfast")
CONTAINER_KEYS = {"ours": "model", "mae_st": "model", "slowfast": "model_state"}  # where each format's file keeps it
PRETRAIN_ONLY_PREFIXES = ("decoder_", "mask_token")  # tensors the classifier has no use for
HEAD_KEYS = ("head.weight", "head.bias")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model; the message names them."""


# --- reading --------------------------------------------------------------------------------------------------------


def _torch_load(path: str) -> Mapping:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    # weights_only keeps a downloaded file from running code; mae_st files also pickle their argparse.Namespace.
    # mmap reads tensors only when they are used (the decoder layout is known from the keys alone); files in torch's
    # legacy format cannot be mapped and are read whole.
    with torch.serialization.safe_globals([argparse.Namespace]):
        for mmap in (True, False):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError by failure kind
                if mmap and "mmap" in str(err):
                    continue
                raise ValueError(f"{path} is not a checkpoint this project reads: {_load_failure(err)}") from err


def _load_failure(err: Exception) -> str:
    """What torch.load's failure says of the file, without its advice to load it unsafely (weights_only=False runs
    whatever code the file holds)."""
    text = str(err)
    if "Weights only load failed" in text:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return ("it holds more than tensors and plain values (torch's safe loader refused it" +
                (f": {detail[1].strip()}" if detail else "") + "); a model checkpoint holds a state dict of tensors")
    return f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else 'unreadable'}"


def read_state_dict(source) -> tuple[dict, str]:
    """A file or a dict -> (flat state dict, format). Unwraps 'model_state' / 'model' / 'module' / 'state_dict'."""
    if isinstance(source, (str, os.PathLike)):
        if os.path.isdir(source):
            raise ValueError(f"{source} is a folder: DeepSpeed checkpoints and run folders are read by "
                             "trainer.checkpointing.read_weights (the trainers and tools/convert_checkpoint.py do it)")
        obj = _torch_load(source)
    else:
        obj = source
    container = None
    for wrapper in (*dict.fromkeys(CONTAINER_KEYS.values()), "module", "state_dict"):  # and other trainers' keys
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj, container = obj[wrapper], wrapper
            break
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError("not a model checkpoint: expected a state dict of tensors (bare, or under 'model' or "
                         "'model_state')")
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}  # DDP / torch.compile prefixes
    if "patch_embed.proj.weight" not in state:
        raise ValueError(
            f"not an MAE-ST video ViT checkpoint: it has no patch_embed.proj.weight (first keys: {list(state)[:5]})"
        )
    return state, detect_format(state, container)


def detect_format(state: Mapping, container: str | None = None) -> str:
    """The format of a state dict, from its names, and from its file's container key where the names cannot tell (a
    SlowFast encoder has neither pred_head nor head.projection: 'model_state' says it)."""
    if any(re.search(r"\.attn\.q\.weight$", k) for k in state):
        return "mae_st"
    if any(k.startswith(("pred_head.", "head.projection.")) for k in state) or container == CONTAINER_KEYS["slowfast"]:
        return "slowfast"
    return "ours"


# --- converting -----------------------------------------------------------------------------------------------------


def _count_blocks(state: Mapping, prefix: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.attn\.", k))}
    return len(found)


def _slowfast_names(decoder_depth: int) -> list[tuple[str, str]]:
    """(our prefix, SlowFast prefix) pairs."""
    pairs = [(f"decoder_blocks.{i}.", f"pred_head.transforms.0.{i}.") for i in range(decoder_depth)]
    return pairs + [
        ("decoder_norm.", f"pred_head.transforms.0.{decoder_depth}."),
        ("decoder_pred.", "pred_head.projections.0."),
        ("head.", "head.projection."),
    ]


def _rename_prefixes(state: Mapping, pairs: list[tuple[str, str]]) -> dict:
    renamed = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def _fuse_qkv(state: Mapping) -> dict:
    fused = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(.*\.attn)\.q\.(weight|bias)", key):
            base, kind = m[1], m[2]
            fused[f"{base}.qkv.{kind}"] = torch.cat([value, state[f"{base}.k.{kind}"], state[f"{base}.v.{kind}"]])
        elif not re.fullmatch(r".*\.attn\.[kv]\.(weight|bias)", key):
            fused[key] = value
    return fused


def _split_qkv(state: Mapping) -> dict:
    split = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(.*\.attn)\.qkv\.(weight|bias)", key):
            for name, part in zip("qkv", value.chunk(3)):
                split[f"{m[1]}.{name}.{m[2]}"] = part.clone()
        else:
            split[key] = value
    return split


def to_ours(state: Mapping, fmt: str) -> dict:
    """A state dict in `fmt` -> our names and fused qkv."""
    if fmt == "mae_st":
        return _fuse_qkv(state)
    if fmt == "slowfast":
        pairs = _slowfast_names(_count_blocks(state, "pred_head.transforms.0."))
        return _rename_prefixes(state, [(theirs, ours) for ours, theirs in pairs])
    return dict(state)


def from_ours(state: Mapping, fmt: str) -> dict:
    """Our state dict -> `fmt` (its decoder layout must exist there: mae_st has no joint decoder table, SlowFast no
    decoder cls token)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    foreign = {"mae_st": "decoder_pos_embed", "slowfast": "decoder_cls_token"}.get(fmt)
    if foreign in state:
        own = "slowfast" if fmt == "mae_st" else "mae_st"
        raise ValueError(f"this model's MAE decoder has {own}'s layout ({foreign!r}), which the {fmt} format cannot "
                         f"hold: the official decoders differ in their position table and cls input, so a pretraining "
                         f"model converts whole only to its own layout's format ({own}, or ours); its encoder converts "
                         f"to every format (--encoder-only)")
    if fmt == "mae_st":
        return _split_qkv(state)
    if fmt == "slowfast":
        return _rename_prefixes(state, _slowfast_names(_count_blocks(state, "decoder_blocks.")))
    return dict(state)


def infer_options(state: Mapping) -> dict:
    """Constructor arguments the tensor shapes reveal (our names), for error messages and tools."""
    weight = state["patch_embed.proj.weight"]  # [D, C, t, p, p]
    dim, chans, t_patch, patch = weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3]
    options = dict(embed_dim=dim, in_chans=chans, t_patch_size=t_patch, patch_size=patch,
                   depth=_count_blocks(state, "blocks."))
    if "pos_embed_temporal" in state:
        options["num_frames"] = state["pos_embed_temporal"].shape[1] * t_patch
    if "pos_embed_spatial" in state:
        options["img_size"] = math.isqrt(state["pos_embed_spatial"].shape[1]) * patch
    if "decoder_embed.weight" in state:
        options["decoder_embed_dim"] = state["decoder_embed.weight"].shape[0]
        options["decoder_depth"] = _count_blocks(state, "decoder_blocks.")
    if "decoder_pred.weight" in state and "pos_embed_temporal" in state:
        frames_per_token = state["decoder_pred.weight"].shape[0] // (patch * patch * chans)
        options["pred_t_dim"] = frames_per_token * state["pos_embed_temporal"].shape[1]
    if "head.weight" in state:
        options["num_classes"] = state["head.weight"].shape[0]
    return options


# --- loading into a model -------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    source_format: str
    loaded: int = 0
    converted: list = field(default_factory=list)
    fresh: list = field(default_factory=list)
    ignored: list = field(default_factory=list)

    def __str__(self) -> str:
        source = {"ours": "this project's", "mae_st": "an mae_st", "slowfast": "a SlowFast"}[self.source_format]
        parts = [f"loaded {self.loaded} tensors from {source} checkpoint"]
        if self.converted:
            parts.append("converted: " + "; ".join(self.converted))
        if self.fresh:
            parts.append("freshly initialized: " + ", ".join(self.fresh))
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} pretraining-only tensors ({_summarize(self.ignored)})")
        return "; ".join(parts)


def _summarize(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def checkpoint_layout(source) -> dict:
    """The decoder layout (config.MAE_ST_LAYOUT or SLOWFAST_LAYOUT) a pretraining checkpoint (file or state dict)
    was saved with, to build the model that loads it: build_pretrain_model("vit_l", **checkpoint_layout(path)).
    {} for a checkpoint without a decoder."""
    state = to_ours(*read_state_dict(source))
    if "decoder_pos_embed" in state:
        return dict(SLOWFAST_LAYOUT)
    if "decoder_cls_token" in state:
        return dict(MAE_ST_LAYOUT)
    return {}


def _mismatch_message(model, missing, unexpected, misshapen, state) -> str:
    lines = ["checkpoint does not fit the model:"]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {_summarize(missing)}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {_summarize(unexpected)}")
    for key in sorted(misshapen)[:6]:
        lines.append(f"  {key}: checkpoint {list(state[key].shape)} vs model {list(model.state_dict()[key].shape)}")
    differing = {k: v for k, v in infer_options(state).items() if getattr(model.cfg, k, v) != v}
    if differing:
        overrides = ", ".join(f"{k}={v}" for k, v in differing.items())
        lines.append(f"  the checkpoint was built with {overrides}: build the model with these overrides")
    elif missing and all(k.startswith(PRETRAIN_ONLY_PREFIXES) for k in missing):
        lines.append("  the checkpoint has no MAE decoder (a fine-tuned model?): load it into build_classifier(...)")
    return "\n".join(lines)


def load_pretrained(model, source) -> LoadReport:
    """Load a checkpoint file or state dict of any format into a MaskedAutoencoder or a VideoClassifier.

    An MAE model must have been built with the file's decoder layout (checkpoint_layout); the classifier drops the
    pretraining decoder and keeps its fresh head unless the file has one of the right shape."""
    state, fmt = read_state_dict(source)
    report = LoadReport(fmt)
    state = to_ours(state, fmt)
    if fmt == "mae_st":
        report.converted.append("fused attn.q/k/v into attn.qkv")
    elif fmt == "slowfast":
        report.converted.append("renamed SlowFast pred_head.* / head.projection.* to decoder_* / head.*")

    if isinstance(model, MaskedAutoencoder):
        layout = checkpoint_layout(state)
        differs = {k: v for k, v in layout.items() if getattr(model.cfg, k) != v}
        if differs:
            overrides = ", ".join(f"{k}={v!r}" for k, v in layout.items())
            raise CheckpointMismatchError(
                f"the checkpoint's decoder has another layout than the model ({differs}): build the model with "
                f"it, build_pretrain_model(..., {overrides}), i.e. **checkpoint_layout(file) (the trainer does this "
                "for init_from)")
    else:
        report.ignored = [k for k in state if k.startswith(PRETRAIN_ONLY_PREFIXES)]
        state = {k: v for k, v in state.items() if k not in report.ignored}
        own = model.state_dict()
        if any(k not in state or state[k].shape != own[k].shape for k in HEAD_KEYS):
            state = {k: v for k, v in state.items() if k not in HEAD_KEYS}
            report.fresh = list(HEAD_KEYS)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in report.fresh]
    unexpected = [k for k in state if k not in expected]
    misshapen = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or misshapen:
        raise CheckpointMismatchError(_mismatch_message(model, missing, unexpected, misshapen, state))
    model.load_state_dict(state, strict=not report.fresh)
    report.loaded = len(state)
    return report


# --- writing --------------------------------------------------------------------------------------------------------


def to_container(state: Mapping, fmt: str = "mae_st", **extra) -> dict:
    """An already-converted state dict in the dict its format's files hold (with extra entries, e.g. epoch), ready
    for torch.save."""
    return {CONTAINER_KEYS[fmt]: dict(state), **extra}
