"""Analytic compute per clip, in multiply-adds as the MAE-ST paper counts them (matmuls only; norms, softmax and
activations are noise at these sizes). A training step costs about 3 x 2 x these numbers in FLOPs (forward, and a
backward twice as expensive), which is what the trainer's MFU figure divides by.

Checked against the paper (tests/test_flops.py): ViT-L pretraining 81.0 G with 90% masking and 627.5 G with a dense
encoder (table 1); fine-tuning 180 / 598 / 1193 G per 16 x 224 x 224 view for ViT-B / L / H.
"""

from models.config import ClassifierConfig, MAEConfig, VideoViTConfig


def block_macs(dim: int, tokens: int, mlp_ratio: float) -> int:
    """One transformer block on `tokens` tokens: qkv + output projection (4 D^2), MLP (2 r D^2), q k^T and attn v."""
    return int(tokens * dim * dim * (4 + 2 * mlp_ratio)) + 2 * tokens * tokens * dim


def patch_embed_macs(cfg: VideoViTConfig) -> int:
    tubelet = cfg.in_chans * cfg.t_patch_size * cfg.patch_size**2
    return cfg.num_patches * tubelet * cfg.embed_dim


def pretrain_macs(cfg: MAEConfig, mask_ratio: float = 0.9, dense_encoder: bool = False, mask_repeats: int = 1) -> int:
    """One clip through the MAE: tubelet embedding once, then encoder + decoder once per mask (mask_repeats). The
    decoder runs on all L tokens, or (decoder_keep < 1) on the K visible ones and the masked ones it reconstructs.

    dense_encoder counts the encoder on all tokens (mask tokens in the encoder), the paper's dense baseline."""
    visible = cfg.num_patches if dense_encoder else cfg.visible_tokens(mask_ratio)
    encoder = cfg.depth * block_macs(cfg.embed_dim, 1 + visible, cfg.mlp_ratio)
    decoded = cfg.visible_tokens(mask_ratio) + cfg.decoded_masked(mask_ratio)
    decoder = (
        (1 + visible) * cfg.embed_dim * cfg.decoder_embed_dim  # decoder_embed
        + cfg.decoder_depth * block_macs(cfg.decoder_embed_dim, 1 + decoded, cfg.mlp_ratio)
        + decoded * cfg.decoder_embed_dim * cfg.patch_dim  # decoder_pred
    )
    return patch_embed_macs(cfg) + mask_repeats * (encoder + decoder)


def classifier_macs(cfg: ClassifierConfig) -> int:
    """One view through the fine-tuned model: all tokens through the encoder, then the linear head."""
    encoder = cfg.depth * block_macs(cfg.embed_dim, 1 + cfg.num_patches, cfg.mlp_ratio)
    return patch_embed_macs(cfg) + encoder + cfg.embed_dim * cfg.num_classes


def training_flops(macs: int) -> int:
    """FLOPs of one training pass over what costs `macs` multiply-adds forward: 2 per multiply-add, and the backward
    pass twice the forward (MFU's usual count, as in PaLM's appendix B)."""
    return 3 * 2 * macs
