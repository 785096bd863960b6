"""Model sizes and the constructor arguments of the official MAE-ST models.

Field names follow facebookresearch/mae_st's constructors (img_size, patch_size, num_frames, ...) so that
`build_pretrain_model("vit_l", num_frames=32)` reads like the official code. The three `decoder_*`/`target_frames`
options are how the two official releases (mae_st and SlowFast's MaskMViT) differ; defaults follow mae_st.

Every config checks its options when it is made (and again on dataclasses.replace): all problems of one config
are reported together in one ValueError, before anything is built.
"""

import math
import numbers
from dataclasses import dataclass, fields

from models.decoder_subsets import DECODER_SUBSETS

# width / depth / heads of ViT-B/L/H as in the MAE-ST paper (Feichtenhofer et al., arXiv 2205.09113) and the
# facebookresearch/mae_st model factories; the tiny size is for tests and the demo.
MODEL_SIZES = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16),
    "vit_tiny": dict(
        img_size=32, patch_size=8, num_frames=8, embed_dim=64, depth=2, num_heads=4,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, pred_t_dim=4,
    ),
}

# How SlowFast's MaskMViT differs from mae_st's MaskedAutoencoderViT (everything else is identical, and the decoder
# head count follows the layout unless set: see MAEConfig.decoder_heads).
SLOWFAST_LAYOUT = dict(decoder_pos_embed="joint", decoder_cls="encoder", target_frames="even")
MAE_ST_LAYOUT = dict(decoder_pos_embed="separable", decoder_cls="learned", target_frames="linspace")


@dataclass(frozen=True)
class VideoViTConfig:
    """The encoder shared by pretraining and fine-tuning."""

    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    t_patch_size: int = 2
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    no_qkv_bias: bool = False
    drop_path_rate: float = 0.0
    trunc_init: bool = False  # mae_st's option: truncated-normal instead of xavier init of the linears
    attn_impl: str = "auto"  # auto | sdpa | math, see models/attention.py
    grad_checkpointing: bool = False  # recompute each block in backward (the trainer decides: trainer/memory_plan.py)

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("invalid model options: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these options, one phrase each naming the option and what it may be ([] if valid)."""
        out = []
        ok = _positive_ints(self, ("img_size", "patch_size", "num_frames", "t_patch_size", "in_chans", "embed_dim",
                                   "depth", "num_heads"), out)
        for size, unit in (("img_size", "patch_size"), ("num_frames", "t_patch_size")):
            if ok[size] and ok[unit] and getattr(self, size) % getattr(self, unit):
                value, step = getattr(self, size), getattr(self, unit)
                out.append(f"{size}={value} is not a multiple of {unit}={step} "
                           f"(choose a multiple of {step}, e.g. {max(step, value - value % step)})")
        if ok["embed_dim"] and ok["num_heads"] and self.embed_dim % self.num_heads:
            out.append(f"num_heads={self.num_heads} does not divide embed_dim={self.embed_dim} "
                       f"(choose a divisor of {self.embed_dim})")
        _check_mlp_ratio(self, ("embed_dim",) if ok["embed_dim"] else (), out)
        _check_rate(self, "drop_path_rate", out)
        _check_bools(self, ("no_qkv_bias", "trunc_init", "grad_checkpointing"), out)
        _check_choice(self, "attn_impl", ("auto", "sdpa", "math"), out)
        return out

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens along (time, rows, columns): 8 x 14 x 14 for 16 x 224 x 224 input."""
        side = self.img_size // self.patch_size
        return self.num_frames // self.t_patch_size, side, side

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass(frozen=True)
class MAEConfig(VideoViTConfig):
    """MAE-ST pretraining model: encoder + lightweight decoder."""

    decoder_embed_dim: int = 512
    decoder_depth: int = 4
    decoder_num_heads: int | None = None  # None: as the layout's official code (mae_st 16, SlowFast 1 per 64 dims)
    pred_t_dim: int = 8  # frames the decoder reconstructs
    norm_pix_loss: bool = True
    decoder_pos_embed: str = "separable"  # mae_st: spatial + temporal + class; SlowFast: one joint [1, L+1, D] table
    decoder_cls: str = "learned"  # mae_st: a learned decoder_cls_token; SlowFast: the encoder's cls output, projected
    target_frames: str = "linspace"  # mae_st: linspace(0, T-1, pred_t_dim) floored; SlowFast: every T/pred_t_dim-th
    # decoder masking (ours; neither official model has it): the decoder reconstructs this fraction of the masked
    # tokens, chosen per view by `decoder_subset` (models/decoder_subsets.py); 1.0 decodes them all, as mae_st does
    decoder_keep: float = 1.0
    decoder_subset: str = "random"

    def problems(self) -> list[str]:
        out = super().problems()
        ok = _positive_ints(self, ("decoder_embed_dim", "decoder_depth", "pred_t_dim"), out)
        heads_ok = self.decoder_num_heads is None or (_is_int(self.decoder_num_heads) and self.decoder_num_heads >= 1)
        if not heads_ok:
            out.append(f"decoder_num_heads={self.decoder_num_heads!r} (must be an integer >= 1, or None for the "
                       "layout's default)")
        if ok["decoder_embed_dim"] and heads_ok:
            dim, heads = self.decoder_embed_dim, self.decoder_heads
            if self.decoder_num_heads is not None and dim % heads:
                out.append(f"decoder_num_heads={heads} does not divide decoder_embed_dim={dim} "
                           f"(choose a divisor of {dim})")
            elif heads < 1:
                out.append(f"decoder_embed_dim={dim} does not split into {heads} heads: the SlowFast layout's default "
                           f"is one head per 64 dims (set decoder_num_heads, or decoder_embed_dim >= 64)")
            elif dim % heads:
                out.append(f"decoder_embed_dim={dim} does not split into the layout's default {heads} heads (set "
                           f"decoder_num_heads to a divisor of {dim}, or decoder_embed_dim to a multiple of {heads})")
        time_ok = all(_is_int(v) and v >= 1 for v in (self.num_frames, self.t_patch_size)) \
            and self.num_frames % self.t_patch_size == 0
        if ok["pred_t_dim"] and time_ok:
            grid_t = self.grid[0]
            if self.pred_t_dim % grid_t or self.pred_t_dim > self.num_frames:
                allowed = ", ".join(str(n) for n in range(grid_t, self.num_frames + 1, grid_t))
                out.append(f"pred_t_dim={self.pred_t_dim} must be a multiple of the {grid_t} temporal token slots "
                           f"and at most num_frames={self.num_frames} (choose one of {allowed})")
        _check_mlp_ratio(self, ("decoder_embed_dim",) if ok["decoder_embed_dim"] else (), out, report_value=False)
        _check_bools(self, ("norm_pix_loss",), out)
        if not _is_number(self.decoder_keep) or not 0 < self.decoder_keep <= 1:
            out.append(f"decoder_keep={self.decoder_keep!r} (must be a number in (0, 1]: the fraction of the masked "
                       "tokens the decoder reconstructs, 1 for all of them)")
        for name, allowed in (
            ("decoder_pos_embed", ("separable", "joint")),
            ("decoder_cls", ("learned", "encoder")),
            ("target_frames", ("linspace", "even")),
            ("decoder_subset", tuple(DECODER_SUBSETS)),
        ):
            _check_choice(self, name, allowed, out)
        return out

    @property
    def decoder_heads(self) -> int:
        if self.decoder_num_heads is not None:
            return self.decoder_num_heads
        return 16 if self.decoder_pos_embed == "separable" else self.decoder_embed_dim // 64

    def visible_tokens(self, mask_ratio: float) -> int:
        """Tokens the encoder sees per view: K = int(L x (1 - mask_ratio)), as mae_st rounds it."""
        return int(self.num_patches * (1 - mask_ratio))

    def decoded_masked(self, mask_ratio: float) -> int:
        """Masked tokens the decoder reconstructs per view: all L - K at decoder_keep=1, else that share (>= 1)."""
        masked = self.num_patches - self.visible_tokens(mask_ratio)
        return masked if self.decodes_every_token else min(masked, max(1, round(masked * self.decoder_keep)))

    @property
    def decodes_every_token(self) -> bool:
        """No decoder masking (decoder_keep = 1): the decoder runs on all L tokens in order, as mae_st's."""
        return self.decoder_keep == 1

    @property
    def frames_per_token(self) -> int:
        """Target frames each token reconstructs (1 in the paper: 8 target frames over 8 token slots)."""
        return self.pred_t_dim // self.grid[0]

    @property
    def target_frame_indices(self) -> list[int]:
        """The frames the decoder reconstructs: mae_st 0, 2, 4, 6, 8, 10, 12, 15; SlowFast 0, 2, ..., 14 (T=16, 8)."""
        n, last = self.pred_t_dim, self.num_frames - 1
        if self.target_frames == "linspace":  # torch.linspace(0, T-1, n).long() in mae_st
            return [i * last // max(n - 1, 1) for i in range(n)]
        return [i * (self.num_frames // n) for i in range(n)]

    @property
    def patch_dim(self) -> int:
        """Values a token predicts: frames x 16 x 16 x 3 = 768."""
        return self.frames_per_token * self.patch_size**2 * self.in_chans


@dataclass(frozen=True)
class ClassifierConfig(VideoViTConfig):
    """Fine-tuning model: encoder without masking, mean-pooled patch tokens, LayerNorm, dropout, linear head."""

    num_classes: int = 400
    dropout: float = 0.5
    head_init_scale: float = 0.001  # the head starts small (SlowFast's MVIT.HEAD_INIT_SCALE)

    def problems(self) -> list[str]:
        out = super().problems()
        _positive_ints(self, ("num_classes",), out)
        _check_rate(self, "dropout", out)
        if not _is_number(self.head_init_scale) or self.head_init_scale <= 0:
            out.append(f"head_init_scale={self.head_init_scale!r} (must be a number > 0)")
        return out


# --- option checks: each appends its problems to `out` -----------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive_ints(cfg, names, out) -> dict:
    """{name: valid} for options that must be integers >= 1 (2.5, "3" and True are not)."""
    ok = {}
    for name in names:
        value = getattr(cfg, name)
        ok[name] = _is_int(value) and value >= 1
        if not ok[name]:
            out.append(f"{name}={value!r} (must be an integer >= 1)")
    return ok


def _check_rate(cfg, name, out):
    value = getattr(cfg, name)
    if not _is_number(value) or not 0 <= value < 1:
        out.append(f"{name}={value!r} (must be a number in [0, 1))")


def _check_mlp_ratio(cfg, widths, out, report_value=True):
    """mlp_ratio > 0, and at least one hidden unit (int(width * mlp_ratio)) at each of the `widths` options."""
    ratio = cfg.mlp_ratio
    if not _is_number(ratio) or ratio <= 0:
        if report_value:
            out.append(f"mlp_ratio={ratio!r} (must be a number > 0)")
        return
    for width in widths:
        dim = getattr(cfg, width)
        if int(dim * ratio) < 1:
            out.append(f"mlp_ratio={ratio!r} gives the MLP of {width}={dim} no hidden units (must be >= 1/{dim})")


def _check_bools(cfg, names, out):
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            out.append(f"{name}={getattr(cfg, name)!r} (must be True or False)")


def _check_choice(cfg, name, allowed, out):
    if getattr(cfg, name) not in allowed:
        out.append(f"{name}={getattr(cfg, name)!r} (must be one of {', '.join(allowed)})")


# Names the official constructors use that we spell differently or do not vary.
_UNSUPPORTED = {
    "sep_pos_embed": (True, "every released model uses separable position embeddings"),
    "cls_embed": (True, "every released model has a cls token"),
}


def resolve_config(cls, name: str, **overrides):
    """Config of size `name` with `overrides` (official argument names) applied; unknown names are an error."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_SIZES)}")
    for key, (required, why) in _UNSUPPORTED.items():
        if key in overrides and overrides.pop(key) != required:
            raise ValueError(f"{key}={not required} is not supported: {why}")
    known = {f.name for f in fields(cls)}
    preset = {k: v for k, v in MODEL_SIZES[name].items() if k in known}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {cls.__name__}; options are {sorted(known)}")
    return cls(**{**preset, **overrides})
