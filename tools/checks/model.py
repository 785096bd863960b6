"""The preflight's model checks: the attention kernel that runs for the recipe's shapes, and memory (the plan from the
estimate; on a GPU one real forward + backward of a micro-batch)."""

import torch

from tools.checks.report import FAIL, NO_GPU, PASS, WARN, Check


def check_attention(cfg, device: torch.device, dtype: torch.dtype, mask_ratio: float = 0.9) -> Check:
    from models.attention import attention_kernels

    kernels = attention_kernels(cfg, device, dtype, mask_ratio)
    summary = "; ".join(f"{stack}: {kernel}" for stack, kernel in kernels.items())
    if device.type == "cuda" and any(k.startswith("math") for k in kernels.values()):
        return Check("attention", WARN, summary + " (the math kernel materialises L x L scores: slow, memory-hungry)",
                     "check the head dimension (flash needs <= 256, a multiple of 8), the dtype (bf16) and torch's "
                     "SDPA backends (torch.backends.cuda.*_sdp_enabled)", kernels)
    return Check("attention", PASS, summary, figures=kernels)


def bare_model(cfg):
    from models import MaskedAutoencoder, VideoClassifier
    from models.config import MAEConfig

    return MaskedAutoencoder(cfg) if isinstance(cfg, MAEConfig) else VideoClassifier(cfg)


def check_memory(cfg, recipe, ds, batch, device: torch.device, views: int, frame_pixels: int | None = None) -> Check:
    """The plan from the analytic estimate and the runtime reserve; on a GPU also one real forward + backward of a
    micro-batch, whose peak plus ZeRO's optimizer state must fit beside what the GPU holds besides the model (the
    CUDA context, NCCL, DeepSpeed's buckets, DALI's decoding pipelines, the loader's batches)."""
    from models.memory import GB
    from trainer.memory_plan import describe_reserve, device_capacity, estimate, plan_recompute, runtime_reserve, \
        usable

    cfg, note = plan_recompute(cfg, recipe, ds, batch, views, device_capacity(device), frame_pixels)
    planned = estimate(cfg, recipe, ds, batch, views, cfg.grad_checkpointing)
    figures = {"estimate_gb": round(planned.total / GB, 2), "recompute": cfg.grad_checkpointing, "plan": note}
    if device.type != "cuda":
        return Check("memory", PASS, f"{note}; measured: {NO_GPU}", figures=figures)
    peak = measure_micro_batch(cfg, recipe, ds, batch, device, views)
    capacity = device_capacity(device)
    reserve = runtime_reserve(recipe, ds, batch, views, frame_pixels)
    # the measurement holds the whole model's weights and gradients (no ZeRO here) but no optimizer state
    expected = planned.activations + 2 * planned.weights * (batch.world_size if ds.zero_stage >= 3 else 1)
    needed, budget = peak + planned.optimizer, usable(capacity, reserve)
    figures.update(measured_forward_backward_gb=round(peak / GB, 2), capacity_gb=round(capacity / GB, 1),
                   measured_plus_optimizer_gb=round(needed / GB, 2), reserve_gb=round(sum(reserve.values()) / GB, 2),
                   usable_gb=round(budget / GB, 2))
    summary = (f"{note}; measured one micro-batch ({batch.micro_batch} clips x {views} views) forward + backward: "
               f"peak {peak / GB:.1f} GB (estimate {expected / GB:.1f}); with ZeRO's optimizer state "
               f"~{needed / GB:.1f} GB of the {budget / GB:.1f} usable beside the runtime's "
               f"{sum(reserve.values()) / GB:.1f} ({describe_reserve(reserve)}) on this {capacity / GB:.0f} GB GPU")
    if needed > budget:
        return Check("memory", FAIL, summary, "lower train_micro_batch_size_per_gpu (the accumulation follows), "
                     "set model.grad_checkpointing=True, or use ds_configs/zero3_bf16.json", figures)
    return Check("memory", PASS, summary, figures=figures)


def measure_micro_batch(cfg, recipe, ds, batch, device: torch.device, views: int) -> int:
    """Peak bytes torch allocates for one forward + backward of a micro-batch of the bare model on the GPU."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = bare_model(cfg).to(device, ds.dtype)
    videos = torch.randn(batch.micro_batch * views, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                         device=device, dtype=ds.dtype)
    if hasattr(recipe, "masking"):
        loss = model(videos, mask_ratio=recipe.masking.mask_ratio, mask_repeats=recipe.masking.mask_repeats)[0]
    else:
        loss = model(videos).float().logsumexp(-1).mean()
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, videos, loss
    torch.cuda.empty_cache()
    return peak
