"""The video ViT encoder shared by the MAE pretraining model and the classifier.

Parameter names match mae_st's state dicts (cls_token, pos_embed_spatial, patch_embed.proj, blocks.N, norm), so the
official checkpoints differ from ours only in the fused qkv (see models/checkpoints.py).
"""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.config import VideoViTConfig
from models.layers import Block, LayerNorm, TubeletEmbed, separable_pos_embed


class VideoViT(nn.Module):
    def __init__(self, cfg: VideoViTConfig):
        super().__init__()
        self.cfg = cfg
        t, h, w = cfg.grid
        dim = cfg.embed_dim
        self.patch_embed = TubeletEmbed(cfg.in_chans, dim, cfg.t_patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, dim))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, dim))
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, dim))
        drop_path = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # deeper drop more
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, not cfg.no_qkv_bias, p, cfg.attn_impl) for p in drop_path
        )
        self.norm = LayerNorm(dim)

    def init_tokens(self) -> None:
        """mae_st's init of the learned tables: truncated normal (std 0.02) position embeddings and cls token."""
        for table in (self.cls_token, self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class):
            nn.init.trunc_normal_(table, std=0.02)

    def embed(self, videos: torch.Tensor) -> torch.Tensor:
        """[N, C, T, H, W] clips -> [N, L, D] tokens with their position embeddings, time-major order."""
        expected = (self.cfg.in_chans, self.cfg.num_frames, self.cfg.img_size, self.cfg.img_size)
        if videos.ndim != 5 or tuple(videos.shape[1:]) != expected:
            raise ValueError(f"expected videos [N, {', '.join(map(str, expected))}], got {list(videos.shape)}")
        pos = separable_pos_embed(self.pos_embed_spatial, self.pos_embed_temporal)  # [1, L, D]
        return self.patch_embed(videos) + pos

    def encode(self, tokens: torch.Tensor, every_block: bool = False):
        """[N, K, D] tokens -> [N, 1+K, D]: prepend the cls token, run the blocks (no final norm); every_block: the
        list of each block's output instead (what feature extraction and probes read of a frozen encoder)."""
        cls = (self.cls_token + self.pos_embed_class).expand(tokens.shape[0], -1, -1)
        x, outputs = torch.cat([cls, tokens], dim=1), []
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if every_block:
                outputs.append(x)
        return outputs if every_block else x
