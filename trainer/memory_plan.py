"""Whether a run recomputes its blocks in backward (activation checkpointing), from the memory it needs.

Recomputing costs about a third more compute (the forward runs twice); it is worth it only when the activations
would not fit. `model.grad_checkpointing=True/False` in the recipe decides by hand; otherwise the analytic estimate
(models/memory.py) plus what the GPU holds beside the model (runtime_reserve: the CUDA context, NCCL's buffers,
DeepSpeed's buckets, DALI's decode and view buffers, the loader's batches) is held against this GPU's memory, less
the caching allocator's fragmentation. At the recipes' batches an 80 GB GPU needs neither recomputing nor ZeRO-3,
even for ViT-H (README, "Memory"). On a CPU nothing is recomputed.
"""

import os
from dataclasses import replace

import torch

from dali_pipes.pipeline_pool import NVDEC_PIPELINES
from dali_pipes.shard_format import KINETICS_FRAME
from models.memory import GB, training_memory

USABLE_SHARE = 0.9  # of what is left after the reserve: the caching allocator's fragmentation
CUDA_CONTEXT = 1.0 * GB  # CUDA context, cuBLAS/cuDNN workspaces (an assumption: 0.5-1 GB per process is typical)
NCCL_CHANNELS = 32  # an upper bound: NCCL uses up to 32 channels on NVLink/NVSwitch nodes
NCCL_BUFFSIZE = 4 * 2**20  # NCCL's default buffer per channel, direction and peer ($NCCL_BUFFSIZE changes it)


def runtime_reserve(recipe, ds, batch, views: int, frame_pixels: int | None = None) -> dict:
    """Bytes one GPU holds beside the model's state and activations, by what holds them (estimates: the preflight
    measures the real peak on a GPU)."""
    value_bytes = 2 if ds.bf16 else 4
    spec = recipe.views
    clips, frames = batch.micro_batch, spec.num_frames * (views if spec.per_view_start else 1)
    stored = frames * (frame_pixels or KINETICS_FRAME[0] * KINETICS_FRAME[1]) * 3  # uint8 RGB frames of a clip
    view_values = views * 3 * spec.num_frames * spec.crop_size ** 2  # one clip's views
    lanes = recipe.loading.decode_pipelines or NVDEC_PIPELINES
    reserve = {"cuda_context": CUDA_CONTEXT,
               # per lane, two batches' decoded frames and views (the one being made, the one being copied)
               "dali": lanes * 2 * clips * (stored + view_values * value_bytes),
               "loader_batches": 2 * clips * view_values * value_bytes}  # the batch assembler's two output buffers
    if batch.world_size > 1:  # each channel, each direction, both ring neighbours
        buffsize = int(os.environ.get("NCCL_BUFFSIZE", NCCL_BUFFSIZE))
        reserve["nccl"] = NCCL_CHANNELS * 2 * 2 * buffsize
    if ds.zero_stage in (1, 2) and not ds.bf16_optimizer(batch.accumulation):  # (BF16_Optimizer's all-reduce
        # copy is in the estimate's gradients) the gradient reduce buckets (two with overlap_comm), the all-gather
        reserve["deepspeed_buckets"] = (ds.bucket("reduce_bucket_size") * value_bytes
                                        * (2 if ds.zero.get("overlap_comm") else 1)
                                        + ds.bucket("allgather_bucket_size") * value_bytes)
    elif ds.zero_stage == 3:  # the reduce bucket, the prefetch bucket and the parameters gathered at once
        reserve["deepspeed_buckets"] = (ds.bucket("reduce_bucket_size") + ds.bucket("stage3_prefetch_bucket_size")
                                        ) * value_bytes
    return reserve


def describe_reserve(reserve: dict) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {value / GB:.2f}" for name, value in reserve.items())


def usable(capacity: int, reserve: dict) -> float:
    """Bytes of a GPU of `capacity` the model's state and activations may take beside `reserve`."""
    return (capacity - sum(reserve.values())) * USABLE_SHARE


def estimate(cfg, recipe, ds, batch, views: int, recompute: bool):
    masking = getattr(recipe, "masking", None)  # (pretraining's)
    return training_memory(cfg, batch.micro_batch, views, world_size=batch.world_size, zero_stage=ds.zero_stage,
                           bf16=ds.bf16, accumulation=batch.accumulation,
                           mask_ratio=masking.mask_ratio if masking else 0.0,
                           mask_repeats=masking.mask_repeats if masking else 1, recompute=recompute,
                           bf16_optimizer=ds.bf16_optimizer(batch.accumulation))


def device_capacity(device: torch.device) -> int | None:
    """Bytes of memory on a CUDA device; None for the CPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def plan_recompute(cfg, recipe, ds, batch, views: int, capacity: int | None, frame_pixels: int | None = None):
    """(the model config with grad_checkpointing decided, one line saying what was decided and why), for a GPU of
    `capacity` bytes (None: the CPU)."""
    dense, sparse = (estimate(cfg, recipe, ds, batch, views, r) for r in (False, True))
    if "grad_checkpointing" in recipe.model.options:
        chosen = recipe.model.options["grad_checkpointing"]
        return cfg, f"estimate {(sparse if chosen else dense).describe()} per process; recompute set by the recipe"
    if capacity is None:
        return replace(cfg, grad_checkpointing=False), f"estimate {dense.describe()} per process (host memory)"
    reserve = runtime_reserve(recipe, ds, batch, views, frame_pixels)
    budget = usable(capacity, reserve)
    where = (f"{capacity / GB:.0f} GB GPU, {budget / GB:.0f} GB usable (besides {sum(reserve.values()) / GB:.1f} GB: "
             f"{describe_reserve(reserve)})")
    if dense.total <= budget:
        return replace(cfg, grad_checkpointing=False), f"estimate {dense.describe()}; fits the {where}: no recompute"
    if sparse.total <= budget:
        return replace(cfg, grad_checkpointing=True), (
            f"estimate {dense.describe()} does not fit the {where}; recomputing blocks: {sparse.describe()}")
    raise ValueError(f"the model needs about {sparse.total / GB:.0f} GB per GPU even recomputing its blocks "
                     f"({sparse.describe()}), more than the {where}: lower train_micro_batch_size_per_gpu (the "
                     "accumulation follows), or use ZeRO-3 (ds_configs/zero3_bf16.json)")
