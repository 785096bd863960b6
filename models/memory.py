"""Analytic training memory per GPU: model and optimizer state under ZeRO, and the activations one micro-batch keeps
for its backward, with and without recomputing blocks (activation checkpointing).

Activations of a pre-norm block, per token, with a fused attention kernel (flash / cuDNN / memory-efficient: no
L x L matrix is kept): the LayerNorm inputs and outputs (4 D), q, k, v (3 D), the attention output (D) and the MLP's
hidden activations before and after GELU (2 x mlp_ratio x D): 16 D values at mlp_ratio 4, the count of Korthikanti
et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", 34 s b h bytes per layer) without its
dropout masks. Recomputing keeps only each block's input (D) plus one block's activations during its backward.
Model state per parameter (bf16 mixed precision with AdamW): bf16 weights and gradients (2 + 2 bytes), fp32 master
weights, Adam moments (4 + 4 + 4), and fp32 gradient accumulation (4) when accumulating (always, unpartitioned,
under DeepSpeed's BF16_Optimizer: ZeRO-1 in bf16); ZeRO-1 partitions the optimizer state over the ranks, ZeRO-2 also
the gradients, ZeRO-3 also the weights.
"""

from dataclasses import dataclass

from models.config import ClassifierConfig, MAEConfig, VideoViTConfig

GB = 1e9
# the gradients DeepSpeed's engine all-reduces per flattened bucket where no ZeRO optimizer reduces them (BF16_Optimizer:
# engine.py allreduce_gradients, MEMORY_OPT_ALLREDUCE_SIZE), whatever reduce_bucket_size says
DEEPSPEED_ALLREDUCE_ELEMENTS = 500_000_000


def block_activation_values(dim: int, mlp_ratio: float) -> float:
    """Values one pre-norm block keeps per token for its backward (fused attention)."""
    return (8 + 2 * mlp_ratio) * dim


def parameter_count(cfg: VideoViTConfig) -> int:
    """Parameters of the model `cfg` describes (weights and biases of every layer, the tables, the tokens)."""
    def blocks(dim: int, depth: int) -> int:
        hidden = int(dim * cfg.mlp_ratio)
        per_block = 4 * dim + 3 * dim * dim + 3 * dim * (not cfg.no_qkv_bias) + dim * dim + dim \
            + dim * hidden + hidden + hidden * dim + dim
        return depth * per_block

    t, h, w = cfg.grid
    d = cfg.embed_dim
    tubelet = cfg.in_chans * cfg.t_patch_size * cfg.patch_size**2
    count = tubelet * d + d + d + h * w * d + t * d + d + blocks(d, cfg.depth) + 2 * d
    if isinstance(cfg, MAEConfig):
        dd = cfg.decoder_embed_dim
        tables = (h * w + t + 1) * dd if cfg.decoder_pos_embed == "separable" else (1 + t * h * w) * dd
        tables += dd if cfg.decoder_cls == "learned" else 0
        count += d * dd + dd + dd + tables + blocks(dd, cfg.decoder_depth) + 2 * dd + dd * cfg.patch_dim + cfg.patch_dim
    if isinstance(cfg, ClassifierConfig):
        count += d * cfg.num_classes + cfg.num_classes
    return count


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def model_state(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_state + self.activations

    def describe(self) -> str:
        unit, scale = ("GB", GB) if self.total >= 0.1 * GB else ("MB", 1e6)
        return (f"{self.total / scale:.1f} {unit}: weights {self.weights / scale:.1f}, gradients "
                f"{self.gradients / scale:.1f}, optimizer {self.optimizer / scale:.1f}, activations "
                f"{self.activations / scale:.1f}")


def activation_bytes(cfg: VideoViTConfig, clips: int, views: int, mask_ratio: float = 0.9, mask_repeats: int = 1,
                     recompute: bool = False, bytes_per_value: int = 2) -> float:
    """What one micro-batch of `clips` decoded clips x `views` views keeps for its backward."""
    rows = clips * views * (mask_repeats if isinstance(cfg, MAEConfig) else 1)

    def stack(tokens: int, dim: int, depth: int) -> float:
        per_block = block_activation_values(dim, cfg.mlp_ratio) * tokens * rows
        if recompute:  # block inputs, plus the block being recomputed
            return (depth * dim * tokens * rows + per_block) * bytes_per_value
        return depth * per_block * bytes_per_value

    inputs = clips * views * cfg.in_chans * cfg.num_frames * cfg.img_size**2 * bytes_per_value
    if not isinstance(cfg, MAEConfig):
        return inputs + stack(1 + cfg.num_patches, cfg.embed_dim, cfg.depth)
    visible, masked = cfg.visible_tokens(mask_ratio), cfg.decoded_masked(mask_ratio)
    targets = cfg.num_patches if cfg.decodes_every_token else masked  # per row
    # the prediction, its fp32 copy, the fp32 target and the squared error: [rows, L or Kd, P]
    loss = rows * targets * cfg.patch_dim * (bytes_per_value + 4 + 4 + 4)
    return inputs + loss + stack(1 + visible, cfg.embed_dim, cfg.depth) \
        + stack(1 + visible + masked, cfg.decoder_embed_dim, cfg.decoder_depth)


def training_memory(cfg: VideoViTConfig, clips: int, views: int, *, world_size: int = 1, zero_stage: int = 2,
                    bf16: bool = True, accumulation: int = 1, mask_ratio: float = 0.9, mask_repeats: int = 1,
                    recompute: bool = False, bf16_optimizer: bool = False) -> MemoryEstimate:
    """Bytes per GPU for training `cfg` on micro-batches of `clips` x `views` with AdamW under ZeRO `zero_stage`.
    bf16_optimizer: DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 and fp32 accumulation) keeps an fp32 copy of every
    gradient on every rank, unpartitioned, at any accumulation (runtime/bf16_optimizer.py fp32_groups_gradients), and
    all-reduces them through a flat copy (engine.py allreduce_no_retain)."""
    params = parameter_count(cfg)
    low = 2 if bf16 else 4  # weights and gradients in the training dtype
    weights = low * params / (world_size if zero_stage >= 3 else 1)
    gradients = low * params / (world_size if zero_stage >= 2 else 1)
    if bf16_optimizer:  # the fp32 copy, and the flat copy its all-reduce makes of up to 500 M of them at once
        gradients += 4 * params + 4 * min(params, DEEPSPEED_ALLREDUCE_ELEMENTS)
    elif accumulation > 1 and bf16:  # fp32 accumulation buffers (ds_configs: data_types.grad_accum_dtype fp32)
        gradients += 4 * params / (world_size if zero_stage >= 2 else 1)
    optimizer = (12 if bf16 else 8) * params / (world_size if zero_stage >= 1 else 1)
    activations = activation_bytes(cfg, clips, views, mask_ratio, mask_repeats, recompute, low)
    return MemoryEstimate(weights, gradients, optimizer, activations)
