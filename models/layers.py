"""Video ViT building blocks: tubelet embedding, pre-norm transformer block, stochastic depth, position tables."""

from functools import partial

import torch
import torch.nn as nn
from einops import rearrange

from models.attention import attention

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class TubeletEmbed(nn.Module):
    """Cuts a clip into t x p x p tubelets and projects each to a token (a Conv3d with kernel = stride)."""

    def __init__(self, in_chans: int, embed_dim: int, t_patch_size: int, patch_size: int):
        super().__init__()
        size = (t_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=size, stride=size)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        x = self.proj(videos)  # [N, C, T, H, W] -> [N, D, t, h, w]
        return rearrange(x, "n d t h w -> n (t h w) d")  # time-major token order


def separable_pos_embed(spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
    """[1, h*w, D] + [1, t, D] -> [1, t*h*w, D]: every token gets its row/column entry plus its time entry."""
    return (temporal.unsqueeze(2) + spatial.unsqueeze(1)).flatten(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (q, k, v stacked along the output rows)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, impl: str = "auto"):
        super().__init__()
        self.num_heads, self.impl = num_heads, impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        x = attention(q, k, v, self.impl)  # [B, heads, L, d]
        return self.proj(rearrange(x, "b h l d -> b l (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch for a random subset of samples while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, attn_impl="auto"):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_impl)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module, trunc: bool = False) -> None:
    """mae_st's init: xavier-uniform linears (truncated normal with trunc_init), zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if trunc:
                nn.init.trunc_normal_(m.weight, std=0.02)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, TubeletEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))  # as a linear layer
            nn.init.zeros_(m.proj.bias)
    if not trunc:  # mae_st has separate q, k, v linears: each third of our fused qkv gets its own D x D bound
        for m in module.modules():
            if isinstance(m, Attention):
                for w in m.qkv.weight.data.chunk(3):
                    nn.init.xavier_uniform_(w)
