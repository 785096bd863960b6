"""Whether a run recomputes its blocks in backward (activation checkpointing), from the memory it needs.

Recomputing costs about a third more compute (the forward runs twice); it is worth it only when the activations
would not fit. `model.grad_checkpointing=True/False` in the recipe decides by hand; otherwise the analytic estimate
(models/memory.py) is held against this GPU's memory, less a reserve for the CUDA context, DALI's decode buffers and
the allocator's fragmentation. At the recipes' batches an 80 GB GPU needs neither recomputing nor ZeRO-3, even for
ViT-H (README, "Memory"). On a CPU nothing is recomputed.
"""

import torch

from models.config import with_options
from models.memory import GB, training_memory

RESERVE_BYTES = 6 * GB  # CUDA context, NCCL buffers, DALI's decoders and pinned buffers
USABLE_SHARE = 0.9  # of what is left: the caching allocator's fragmentation


def estimate(cfg, recipe, ds_config: dict, world_size: int, views: int, recompute: bool):
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    return training_memory(cfg, ds_config["train_micro_batch_size_per_gpu"], views, world_size=world_size,
                           zero_stage=zero, bf16=ds_config.get("bf16", {}).get("enabled", False),
                           accumulation=ds_config.get("gradient_accumulation_steps", 1),
                           mask_ratio=getattr(recipe, "mask_ratio", 0.0),
                           mask_repeats=getattr(recipe, "mask_repeats", 1), recompute=recompute)


def device_capacity(device: torch.device) -> int | None:
    """Bytes of memory on a CUDA device; None for the CPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def plan_recompute(cfg, recipe, ds_config: dict, world_size: int, views: int, capacity: int | None):
    """(the model config with grad_checkpointing decided, one line saying what was decided and why), for a GPU of
    `capacity` bytes (None: the CPU)."""
    dense, sparse = (estimate(cfg, recipe, ds_config, world_size, views, r) for r in (False, True))
    if "grad_checkpointing" in recipe.model_options:
        chosen = recipe.model_options["grad_checkpointing"]
        return cfg, f"estimate {(sparse if chosen else dense).describe()} per process; recompute set by the recipe"
    if capacity is None:
        return with_options(cfg, grad_checkpointing=False), f"estimate {dense.describe()} per process (host memory)"
    budget = (capacity - RESERVE_BYTES) * USABLE_SHARE
    where = f"{capacity / GB:.0f} GB GPU, {budget / GB:.0f} GB usable"
    if dense.total <= budget:
        return (with_options(cfg, grad_checkpointing=False),
                f"estimate {dense.describe()}; fits the {where}: no recompute")
    if sparse.total <= budget:
        return with_options(cfg, grad_checkpointing=True), (
            f"estimate {dense.describe()} does not fit the {where}; recomputing blocks: {sparse.describe()}")
    raise ValueError(f"the model needs about {sparse.total / GB:.0f} GB per GPU even recomputing its blocks "
                     f"({sparse.describe()}), more than the {where}: lower train_micro_batch_size_per_gpu (and raise "
                     "gradient_accumulation_steps), or use ZeRO-3 (ds_configs/zero3_bf16.json)")
