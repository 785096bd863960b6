"""Distributed set-up, the DeepSpeed config checked against the recipe, AdamW with its schedule, and the engine.

One code path for GPUs and CPUs: the device (and the backend that goes with it: NCCL or gloo) is the difference.
"""

import json
import logging
import math
import os
from dataclasses import dataclass

import torch

from trainer.build_locks import remove_stale_build_locks, skip_deepspeed_shm_op

log = logging.getLogger("trainer")


class ConfigConflict(ValueError):
    """The ds_config and the recipe disagree; the message says how to reconcile them."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Under the deepspeed launcher or torchrun the environment says who we are; under plain `python` we are the
    only process, and say so ourselves (MASTER_PORT=0: any free port)."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "0")):
        os.environ.setdefault(key, value)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    remove_stale_build_locks()
    if not cuda:
        skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:  # the launcher does not limit threads: ranks on one machine share its cores
        device = torch.device("cpu")
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    return DistEnv(rank, world, local, local_world, device)


def load_ds_config(path: str, recipe, world_size: int, device: torch.device) -> dict:
    """The ds_config with the recipe's clipping added; every disagreement with the recipe in one message."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigConflict(f"cannot read the ds_config {path}: {err}") from None
    problems = []
    if "train_batch_size" in config:
        problems.append("give train_micro_batch_size_per_gpu and gradient_accumulation_steps, not train_batch_size "
                        "(one file then serves any number of processes)")
    for section in ("optimizer", "scheduler"):
        if section in config:
            problems.append(f"remove the '{section}' section: the trainer builds AdamW and its warmup + cosine "
                            "schedule from the recipe")
    if config.get("fp16", {}).get("enabled"):
        problems.append("fp16 is not supported: enable bf16 instead (or neither, for fp32)")
    if config.get("zero_optimization", {}).get("stage", 0) < 1:
        problems.append("use ZeRO stage 1, 2 or 3: the fp32 export reads ZeRO's fp32 master weights")
    if "gradient_clipping" in config and config["gradient_clipping"] != recipe.clip_grad:
        problems.append(f"gradient_clipping is {config['gradient_clipping']} here but clip_grad is {recipe.clip_grad} "
                        "in the recipe: remove it from the ds_config, or override clip_grad=...")
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or micro < 1:
        problems.append("set train_micro_batch_size_per_gpu (clips per process per micro-step)")
    elif recipe.batch_size and recipe.batch_size != micro * accum * world_size:
        clips = micro * accum * world_size
        fix = recipe.batch_size / (micro * world_size)
        hint = f"set gradient_accumulation_steps to {int(fix)}" if fix == int(fix) else "change the micro batch"
        problems.append(f"the recipe trains on {recipe.batch_size} clips per step, this ds_config on {micro} per "
                        f"process x {accum} accumulation x {world_size} processes = {clips}: {hint}, or override "
                        f"batch_size={clips} (the lr follows: blr x clips / 256)")
    if problems:
        raise ConfigConflict(f"{path} does not fit the recipe:\n  - " + "\n  - ".join(problems))
    from models.attention import cpu_has_native_bf16

    if config.get("bf16", {}).get("enabled") and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("bf16 on a CPU without AVX512-BF16/AMX runs matmuls ~100x slower than fp32 "
                    "(measured 1 vs 166 GFLOP/s): ds_configs/cpu.json trains in fp32")
    config = {**config, "gradient_clipping": recipe.clip_grad, "zero_allow_untested_optimizer": True,
              "steps_per_print": config.get("steps_per_print", 10**9)}
    if config.get("bf16", {}).get("enabled") and accum > 1 and "grad_accum_dtype" not in config.get("data_types", {}):
        # bf16 keeps 8 bits of mantissa: summing many micro-batches' gradients in it loses their small parts
        log.info("accumulating gradients over %d micro-batches in fp32 (data_types.grad_accum_dtype)", accum)
        config["data_types"] = {**config.get("data_types", {}), "grad_accum_dtype": "fp32"}
    return config


def param_groups(model: torch.nn.Module, weight_decay: float, lr_scale_of=None) -> list[dict]:
    """AdamW groups: no weight decay for biases and other 1-D parameters (norms); `lr_scale_of(name)` gives a
    per-parameter lr multiplier (layer-wise decay in fine-tuning)."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim <= 1 or name.endswith(".bias") else weight_decay
        scale = lr_scale_of(name) if lr_scale_of else 1.0
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def warmup_cosine(step: int, warmup_steps: float, total_steps: float, min_ratio: float) -> float:
    """lr / peak lr at an optimizer step: linear from 0 over the warmup, then a half-cycle cosine to min_ratio."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(model, recipe, ds_config: dict, lr: float, total_steps: float, warmup_steps: float,
                 lr_scale_of=None):
    """DeepSpeed engine around `model` with torch's fused AdamW, on CUDA and CPU alike (torch >= 2.4; on a CPU it
    measured 78 ms a step for ViT-B's 100 M parameters against 278 ms unfused), not DeepSpeed's FusedAdam, which
    would compile an op."""
    import deepspeed

    groups = param_groups(model, recipe.weight_decay, lr_scale_of)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(recipe.betas), fused=True)
    min_ratio = recipe.min_lr / lr if lr else 0.0
    scale = [g["lr_scale"] for g in groups]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s, k=k: k * warmup_cosine(s, warmup_steps, total_steps, min_ratio) for k in scale])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    if recipe.compile:
        engine.compile()
    return engine
