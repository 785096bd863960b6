"""The DeepSpeed config, read once into what the trainer needs of it, checked against the recipe with every
disagreement in one message, and the global batch it makes on the world size at hand.

One file serves any number of processes: it says how many clips one process takes per micro-step (what fits in its
memory); the recipe says how many clips make one optimizer step over all processes (batch_size: the paper's 512);
the gradient accumulation is what makes up the difference on the number of processes at hand, as mae_st's
accum_iter and VideoMAE's update_freq do. A run resumed on another number of processes keeps its global batch the
same way.
"""

import json
import logging
from dataclasses import dataclass

import torch

from dali_pipes import checks

log = logging.getLogger("trainer")

DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce and all-gather bucket sizes, in elements


class ConfigConflict(ValueError):
    """The ds_config and the recipe disagree, or the numbers cannot divide; the message says how to reconcile them."""


@dataclass(frozen=True)
class DsConfig:
    path: str
    settings: dict  # the file as written

    @property
    def micro_batch(self) -> int:
        """Clips per process per micro-step: what fits in one GPU's memory."""
        return self.settings["train_micro_batch_size_per_gpu"]

    @property
    def accumulation(self) -> int | None:
        """gradient_accumulation_steps as written (None: absent); the recipe's batch_size overrides it."""
        return self.settings.get("gradient_accumulation_steps")

    @property
    def zero(self) -> dict:
        return self.settings.get("zero_optimization", {})

    @property
    def zero_stage(self) -> int:
        return self.zero.get("stage", 0)

    @property
    def bf16(self) -> bool:
        return bool(self.settings.get("bf16", {}).get("enabled"))

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def fp32_accumulation(self) -> bool:
        return self.settings.get("data_types", {}).get("grad_accum_dtype") == "fp32"

    def bf16_optimizer(self, accumulation: int) -> bool:
        """Whether DeepSpeed runs this config with its BF16_Optimizer: bf16, ZeRO-1 and fp32 gradient accumulation
        (engine.py _do_optimizer_sanity_check; for_deepspeed adds fp32 accumulation when accumulating). It keeps an
        unpartitioned fp32 copy of the gradients, ignores reduce_bucket_size and all-reduces them once per optimizer
        step, after the backward (README, "Memory": when ZeRO-1 pays)."""
        return self.bf16 and self.zero_stage == 1 and (self.fp32_accumulation or accumulation > 1)

    def bucket(self, name: str) -> int:
        """A ZeRO bucket's size in elements (reduce_bucket_size, allgather_bucket_size, stage3_prefetch_bucket_size,
        stage3_max_live_parameters), DeepSpeed's default when not set."""
        return int(self.zero.get(name, DEEPSPEED_BUCKET if "bucket" in name else 1_000_000_000))

    def for_deepspeed(self, recipe, plan: "BatchPlan") -> dict:
        """The config DeepSpeed gets: this file with the recipe's clipping and the run's accumulation."""
        config = {**self.settings, "train_micro_batch_size_per_gpu": plan.micro_batch,
                  "gradient_accumulation_steps": plan.accumulation, "gradient_clipping": recipe.optim.clip_grad,
                  "zero_allow_untested_optimizer": True, "steps_per_print": self.settings.get("steps_per_print", 10**9)}
        if self.bf16 and plan.accumulation > 1 and not self.fp32_accumulation:
            # bf16 keeps 8 bits of mantissa: summing many micro-batches' gradients in it loses their small parts
            log.info("accumulating gradients over %d micro-batches in fp32 (data_types.grad_accum_dtype)",
                     plan.accumulation)
            config["data_types"] = {**self.settings.get("data_types", {}), "grad_accum_dtype": "fp32"}
        return config


def read_ds_config(path: str, recipe) -> DsConfig:
    """The ds_config at `path`; every disagreement with the recipe in one ConfigConflict."""
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigConflict(f"cannot read the ds_config {path}: {err}") from None
    problems = []
    if "train_batch_size" in settings:
        problems.append("give train_micro_batch_size_per_gpu, not train_batch_size: the recipe's batch_size and "
                        "the number of processes decide the rest (one file then serves any number of processes)")
    for section in ("optimizer", "scheduler"):
        if section in settings:
            problems.append(f"remove the '{section}' section: the trainer builds AdamW and its warmup + cosine "
                            "schedule from the recipe")
    if settings.get("fp16", {}).get("enabled"):
        problems.append("fp16 is not supported: enable bf16 instead (or neither, for fp32)")
    if settings.get("zero_optimization", {}).get("stage", 0) < 1:
        problems.append("use ZeRO stage 1, 2 or 3: the fp32 export reads ZeRO's fp32 master weights")
    if "gradient_clipping" in settings and settings["gradient_clipping"] != recipe.optim.clip_grad:
        problems.append(f"gradient_clipping is {settings['gradient_clipping']} here but clip_grad is "
                        f"{recipe.optim.clip_grad} in the recipe: remove it from the ds_config, "
                        "or override clip_grad=...")
    for name in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = settings.get(name, 1)
        if not checks.integer(1)(value):
            problems.append(f"{name} must be an integer >= 1, not {value!r}")
    if problems:
        raise ConfigConflict(f"{path} does not fit the recipe:\n  - " + "\n  - ".join(problems))
    return DsConfig(path, settings)


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int  # clips per process per micro-step
    accumulation: int  # micro-steps per optimizer step
    world_size: int

    @property
    def clips_per_step(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    def describe(self) -> str:
        return (f"{self.clips_per_step} clips per optimizer step = {self.world_size} process(es) x "
                f"{self.micro_batch} clips x {self.accumulation} accumulation")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(clips_per_step: int | None, micro_batch: int, world_size: int,
               accumulation: int | None = None) -> BatchPlan:
    """The accumulation that makes `clips_per_step` (None: micro x the ds_config's accumulation x world) out of
    `micro_batch` clips on each of `world_size` processes; ConfigConflict with the choices that would divide."""
    if clips_per_step is None:
        return BatchPlan(micro_batch, accumulation or 1, world_size)
    steps, remainder = divmod(clips_per_step, micro_batch * world_size)
    if steps >= 1 and remainder == 0:
        if accumulation not in (None, steps):
            log.info("gradient_accumulation_steps: %d (for %d clips per step), not the ds_config's %d",
                     steps, clips_per_step, accumulation)
        return BatchPlan(micro_batch, steps, world_size)
    choices = []
    if clips_per_step % world_size == 0:
        per_process = clips_per_step // world_size
        micros = [m for m in _divisors(per_process) if m <= micro_batch][-3:][::-1]
        choices += [f"train_micro_batch_size_per_gpu {m} (accumulation {per_process // m})" for m in micros]
    if clips_per_step % micro_batch == 0:
        worlds = [w for w in _divisors(clips_per_step // micro_batch) if w != world_size]
        near = sorted(worlds, key=lambda w: abs(w - world_size))[:3]
        choices += [f"{w} processes (accumulation {clips_per_step // (micro_batch * w)})" for w in sorted(near)]
    unit = micro_batch * world_size
    choices.append(f"batch_size={max(unit, round(clips_per_step / unit) * unit)} (a multiple of {micro_batch} x "
                   f"{world_size}; the lr follows: blr x clips / 256)")
    raise ConfigConflict(
        f"the recipe's {clips_per_step} clips per optimizer step do not split over {world_size} process(es) of "
        f"{micro_batch} clips per micro-step ({clips_per_step} / ({micro_batch} x {world_size}) = "
        f"{clips_per_step / unit:g} micro-steps). Choices: " + "; ".join(choices))
