"""Model sizes and the constructor arguments of the official MAE-ST models.

Field names follow facebookresearch/mae_st's constructors (img_size, patch_size, num_frames, ...) so that
`build_pretrain_model("vit_l", num_frames=32)` reads like the official code. The three `decoder_*`/`target_frames`
options are how the two official releases (mae_st and SlowFast's MaskMViT) differ; defaults follow mae_st.
"""

from dataclasses import dataclass, fields, replace

# width / depth / heads from the paper (../shared/reference/mae_st_recipe.md); the tiny size is for tests and the demo.
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
    grad_checkpointing: bool = False  # recompute each block in backward: ViT-H at batch 8+ needs it on 80 GB

    def __post_init__(self):
        if self.img_size % self.patch_size or self.num_frames % self.t_patch_size:
            raise ValueError(
                f"img_size {self.img_size} / num_frames {self.num_frames} must be multiples of "
                f"patch_size {self.patch_size} / t_patch_size {self.t_patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.attn_impl not in ("auto", "sdpa", "math"):
            raise ValueError(f"attn_impl must be auto, sdpa or math, not {self.attn_impl!r}")

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

    def __post_init__(self):
        super().__post_init__()
        grid_t = self.grid[0]
        if self.pred_t_dim % grid_t or self.pred_t_dim > self.num_frames:
            raise ValueError(
                f"pred_t_dim {self.pred_t_dim} must be a multiple of the {grid_t} temporal token slots "
                f"and at most num_frames {self.num_frames}"
            )
        if self.decoder_heads < 1 or self.decoder_embed_dim % self.decoder_heads:
            raise ValueError(f"decoder_embed_dim {self.decoder_embed_dim} does not split into "
                             f"{self.decoder_heads} heads")
        for name, allowed in (
            ("decoder_pos_embed", ("separable", "joint")),
            ("decoder_cls", ("learned", "encoder")),
            ("target_frames", ("linspace", "even")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")

    @property
    def decoder_heads(self) -> int:
        if self.decoder_num_heads is not None:
            return self.decoder_num_heads
        return 16 if self.decoder_pos_embed == "separable" else self.decoder_embed_dim // 64

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


def with_options(config, **changes):
    """A copy of a frozen config with some fields changed (validation runs again)."""
    return replace(config, **changes)
