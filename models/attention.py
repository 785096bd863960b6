"""Multi-head attention with the kernel chosen per device and dtype.

CUDA: torch's scaled_dot_product_attention, which dispatches to FlashAttention-2 / cuDNN / memory-efficient kernels
(bf16 and fp16), never materialising the L x L score matrix.

CPU: SDPA too, except bf16 on CPUs with native bf16 (AVX512-BF16 / AMX), where a plain matmul-softmax-matmul ran
3-5x faster than SDPA's CPU kernels for ViT-sized inputs (../shared/reference/platform_facts.md: B=4, 12 heads,
L=160, d=64, forward+backward, bf16: SDPA 15.6-17.8 ms vs 3.4-4.2 ms). On CPUs without it the ranking flips:
measured on a 2-core AVX2 EPYC (2026-11), same shapes, bf16: SDPA 42 ms vs plain 157 ms; fp32: 9.8 vs 9.7 ms;
L=1569, B=1, fp32: SDPA 198 ms vs plain 370 ms.
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


def describe_attention(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """One line for the training log: which attention kernel runs and why."""
    impl = attention_impl(device, dtype, requested)
    if impl == "math":
        return f"attention: plain matmul-softmax ({device.type}, {dtype}, requested {requested})"
    if device.type == "cuda":
        backends = [
            name
            for name, enabled in (
                ("flash", torch.backends.cuda.flash_sdp_enabled()),
                ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                ("mem-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
            )
            if enabled
        ]
        return f"attention: torch SDPA fused kernels ({'/'.join(backends)}; cuda, {dtype}, requested {requested})"
    return f"attention: torch SDPA ({device.type} kernels, {dtype}, requested {requested})"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v [B, heads, L, d]."""
    if attention_impl(q.device, q.dtype, impl) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, heads, L, L]
    return scores.softmax(dim=-1) @ v
