"""Multi-head attention with the kernel chosen per device and dtype.

CUDA: torch's scaled_dot_product_attention (torch.nn.functional.scaled_dot_product_attention in the torch docs),
which dispatches to FlashAttention-2 / cuDNN / memory-efficient kernels (bf16 and fp16), never materialising the
L x L score matrix.

CPU: SDPA too, except bf16 on CPUs with native bf16 (AVX512-BF16 / AMX): there a plain matmul-softmax-matmul
measured several times faster than SDPA's CPU kernels in bf16 for ViT-sized inputs, while on AVX2-only CPUs the
ranking is the reverse, so `auto` keeps SDPA there.
"""

import functools

import torch
import torch.nn.functional as F


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX tiles (torch's own capability probes)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def attention_impl(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """'sdpa' or 'math': the kernel `attention` runs for tensors on `device` in `dtype`."""
    if requested != "auto":
        return requested
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_native_bf16():
        return "math"
    return "sdpa"


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel torch's SDPA dispatcher picks for these very tensors (flash, cudnn, efficient or math), not the
    list of enabled ones: a head size, dtype or GPU a fused kernel does not support falls back to math silently."""
    from torch.nn.attention import SDPBackend

    choice = SDPBackend(torch._fused_sdp_choice(q, k, v))  # the dispatcher's own choice function
    return {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "memory-efficient",
            SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.MATH: "math"}.get(choice, choice.name.lower())


def attention_kernels(cfg, device: torch.device, dtype: torch.dtype, mask_ratio: float = 0.9) -> dict:
    """{'encoder': ..., 'decoder': ...}: the kernel each attention stack of a model config runs, at its shapes
    (tokens, heads, head size) on `device` in `dtype`; an MAE's encoder sees only the visible tokens."""
    masked = hasattr(cfg, "decoder_embed_dim")
    visible = int(cfg.num_patches * (1 - mask_ratio)) if masked else cfg.num_patches
    stacks = {"encoder": (cfg.embed_dim, cfg.num_heads, visible + 1)}
    if masked:
        stacks["decoder"] = (cfg.decoder_embed_dim, cfg.decoder_heads, cfg.num_patches + 1)
    kernels = {}
    for name, (dim, heads, tokens) in stacks.items():
        where = f"{tokens} tokens x {heads} heads x {dim // heads}"
        if attention_impl(device, dtype, cfg.attn_impl) == "math":
            kernels[name] = f"plain matmul-softmax ({where})"
            continue
        q = torch.zeros(1, heads, tokens, dim // heads, device=device, dtype=dtype)
        kernels[name] = f"{sdpa_kernel(q, q, q)} ({where})"
    return kernels


def describe_attention(cfg, device: torch.device, dtype: torch.dtype, mask_ratio: float = 0.9) -> str:
    """One line for the training log: which attention kernel runs, per stack."""
    kernels = attention_kernels(cfg, device, dtype, mask_ratio)
    return f"attention ({device.type}, {dtype}, attn_impl={cfg.attn_impl}): " + "; ".join(
        f"{stack} {kernel}" for stack, kernel in kernels.items())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v [B, heads, L, d]."""
    if attention_impl(q.device, q.dtype, impl) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, heads, L, L]
    return scores.softmax(dim=-1) @ v
