"""A run's set-up, once for every program that runs training steps: the trainers (trainer/cli.py), the preflight's
timed run (tools/checks/timed_run.py) and the benchmark's end-to-end mode (tools/bench/model.py). It takes the
typed RunArgs, never a command line, and returns the RunParts the step loop (trainer/step_loop.py) and the run
(trainer/run.py) work with.

Set-up order, each step taking only what the steps before it produced:
  stop signals caught -> distributed processes -> run folder (shared by every rank?) -> the checkpoint to resume
  from (its global batch and schedule) -> ds_config and the global batch on this world -> memory plan (recompute or
  not) -> loader (its config from the recipe: trainer/data.py) -> model -> schedule -> resume plan (may switch the
  ds_config to DeepSpeed's universal format) -> engine -> resume (engine, loader, guard, RNGs) -> monitor -> hooks
  -> the resolved configuration, saved and logged.
"""

import json
import logging
import math
import os
import random
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dali_pipes import VideoLoader
from models.attention import cpu_has_native_bf16, describe_attention
from trainer.checkpointing import Checkpointer
from trainer.data import data_change, data_facts, loader_config, pixels_median
from trainer.device_peak import device_peak_flops
from trainer.ds_config import BatchPlan, plan_batch, read_ds_config
from trainer.engine import build_engine, init_distributed
from trainer.memory_plan import device_capacity, plan_recompute
from trainer.monitor import LossGuard, Monitor
from trainer.preemption import MARKER, PreemptionSignal
from trainer.recipes import as_saved, recipe_changes
from trainer.run_folder import check_shared

log = logging.getLogger("trainer")


@dataclass(frozen=True)
class RunArgs:
    """What a run is started with besides its task: where it writes, its ds_config, its data, how long."""

    output: str
    ds_config: str
    data: str
    recipe_name: str
    max_steps: int | None = None  # stop here (a resumable checkpoint), before the schedule's end
    measuring: bool = False  # a tool's timed steps: warnings only, no progress bar, checkpoints, pictures or probes

    @classmethod
    def from_command_line(cls, args) -> "RunArgs":
        return cls(args.output, args.ds_config, args.data, args.recipe, args.max_steps)


@dataclass(frozen=True)
class Schedule:
    """The run's length in optimizer steps, fixed when it starts (a resumed run keeps it)."""

    total_steps: int
    warmup_steps: float
    steps_per_epoch: float


@dataclass(frozen=True)
class RunPlan:
    """The numbers a run fixes when it starts."""

    batch: BatchPlan
    lr: float
    dtype: torch.dtype
    schedule: Schedule
    stop_at: int  # the schedule's end, or --max-steps
    ds_config: dict  # what DeepSpeed got
    memory_note: str


@dataclass
class RunParts:
    """What the step loop and the run's ending work with, set up in the module docstring's order."""

    task: object
    args: RunArgs
    env: object  # trainer/launchers.py LaunchEnv, with its device
    preemption: PreemptionSignal
    checkpointer: Checkpointer
    plan: RunPlan
    loader: VideoLoader
    model: torch.nn.Module
    engine: object  # DeepSpeed's
    guard: LossGuard
    monitor: Monitor
    hooks: list
    step: int  # where the run stands: 0, or the resumed checkpoint's step

    def stateful(self) -> dict:
        """What a checkpoint saves besides the engine and the RNGs: where the loader stands, what the guard saw."""
        return {"loader": self.loader, "guard": self.guard}

    def close(self) -> None:
        self.monitor.close()
        self.loader.close()
        self.preemption.restore()


def set_up(task, args: RunArgs, model_cfg) -> RunParts:
    """The run of `task` (its model configured as `model_cfg`), resumed from its folder's checkpoint if any. A
    set-up that fails gives the process its signal handlers back (a tool or a test goes on in it)."""
    preemption = PreemptionSignal()  # from the start: a signal during set-up stops at the first step
    try:
        return _set_up(task.measuring() if args.measuring else task, args, model_cfg, preemption)
    except BaseException:
        preemption.restore()
        raise


def _set_up(task, args: RunArgs, model_cfg, preemption: PreemptionSignal) -> RunParts:
    recipe = task.recipe
    env = init_distributed()
    os.makedirs(args.output, exist_ok=True)
    _setup_logging(args.output, env.is_main and not args.measuring)
    check_shared(args.output, env.rank, env.world_size)
    _forget_stop_signal(args.output, env.is_main)
    checkpointer = Checkpointer(args.output, env, recipe.run.keep_checkpoints, recipe.run.checkpoint_every)
    saved = checkpointer.saved_run()  # what the checkpoint to resume from says about its run (or None)
    ds_config = read_ds_config(args.ds_config, recipe)
    # the global batch: the recipe's, else the one the run was started with (kept on another number of processes)
    batch = plan_batch(recipe.optim.batch_size or (saved or {}).get("clips_per_step"), ds_config.micro_batch,
                       env.world_size, ds_config.accumulation)
    if ds_config.bf16 and env.device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("bf16 on a CPU without AVX512-BF16/AMX runs matmuls ~100x slower than fp32 (measured 1 vs "
                    "166 GFLOP/s): ds_configs/cpu.json trains in fp32")
    model_cfg, memory_note = plan_recompute(model_cfg, recipe, ds_config, batch, task.views_per_clip(),
                                            device_capacity(env.device), pixels_median(args.data, recipe.loading))
    _seed_everything(recipe.run.seed + env.rank)

    loader = VideoLoader(loader_config(recipe, args.data, env, batch.micro_batch, ds_config.dtype))
    model = task.build_model(model_cfg)
    schedule = _schedule(task.recipe, saved, len(loader) / batch.accumulation, batch, env)
    data = data_facts(args.data, recipe.loading)
    checkpointer.run_facts = {"clips_per_step": batch.clips_per_step, "micro_batch": batch.micro_batch,
                              "accumulation": batch.accumulation, "total_steps": schedule.total_steps,
                              "warmup_steps": schedule.warmup_steps, "recipe": as_saved(recipe), "data": data}
    new_data = data_change((saved or {}).get("data"), data)  # (allowed by --allow-changes: trainer/cli.py)
    resume = checkpointer.resume_plan()
    deepspeed_config = ds_config.for_deepspeed(recipe, batch)
    if resume:
        deepspeed_config = resume.adjust(deepspeed_config)
    lr = recipe.optim.blr * batch.clips_per_step / 256
    engine = build_engine(model, recipe.optim, deepspeed_config, lr, schedule.total_steps, schedule.warmup_steps,
                          task.lr_scale_of(model), recipe.run.compile)
    guard, step = LossGuard(recipe.run.explosion_factor), 0
    if resume:
        if new_data and env.is_main:
            log.warning("resuming on other data (--allow-changes): %s. The model, optimizer and schedule go on from "
                        "the checkpoint; the loader reads the new data from its beginning (epoch 0, a fresh order)",
                        new_data)
        stateful = {"guard": guard, **({} if new_data else {"loader": loader})}
        step = checkpointer.resume(engine, resume, stateful)  # and RNGs
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume.tag, step, loader.epoch,
                 loader.cursor.position)
    stop_at = min(schedule.total_steps, args.max_steps or schedule.total_steps)
    plan = RunPlan(batch, lr, ds_config.dtype, schedule, stop_at, deepspeed_config, memory_note)
    peak, peak_source = device_peak_flops(env.device, plan.dtype)
    flops = task.flops_per_clip(model_cfg) * batch.micro_batch * batch.accumulation
    monitor = Monitor(args.output, env.is_main, step, stop_at, batch.clips_per_step, env.world_size, flops, peak,
                      views_per_clip=task.views_per_clip(), progress_bar=not args.measuring)
    hooks = task.hooks(engine, loader.config, monitor, stop_at)
    parts = RunParts(task, args, env, preemption, checkpointer, plan, loader, model, engine, guard, monitor, hooks,
                     step)
    _describe(parts, peak, peak_source)
    return parts


def _forget_stop_signal(run_dir: str, is_main: bool) -> None:
    """A new start: the marker a stop signal left for the requeue script has served."""
    marker = os.path.join(run_dir, MARKER)
    if is_main and os.path.exists(marker):
        with open(marker) as f:
            log.info("starting again after a stop signal at step %d", json.load(f)["step"])
        os.remove(marker)


def _schedule(recipe, saved: dict | None, steps_per_epoch: float, batch: BatchPlan, env) -> Schedule:
    """The schedule the run began with, when it resumes with the same length (a step means the same thing, on any
    number of processes); else from the recipe's epochs. Says what changed on another layout of ranks."""
    changes = recipe_changes(saved["recipe"], recipe) if saved and "recipe" in saved else {}
    if changes and env.is_main:
        log.warning("resuming with recipe changes (logged in RUN_DIR/configs/): %s", ", ".join(
            f"{name} {before!r} -> {now!r}" for name, (before, now) in sorted(changes.items())))
    if saved and "total_steps" in saved and not {"optim.epochs", "optim.warmup_epochs",
                                                  "optim.batch_size"} & set(changes):
        schedule = Schedule(saved["total_steps"], saved["warmup_steps"], steps_per_epoch)
    else:
        schedule = Schedule(max(1, math.ceil(recipe.optim.epochs * steps_per_epoch)),
                            recipe.optim.warmup_epochs * steps_per_epoch, steps_per_epoch)
    before = saved and (saved.get("world_size"), saved.get("micro_batch"), saved.get("accumulation"))
    now = (env.world_size, batch.micro_batch, batch.accumulation)
    if before and before[1] is not None and before != now and env.is_main:
        log.warning("resuming a run of %d process(es) x %d clips x %d accumulation on %d x %d x %d: the same %d "
                    "clips per optimizer step, lr and schedule (%d steps); the loader goes on with the epoch in a "
                    "fresh order", *before, *now, batch.clips_per_step, schedule.total_steps)
    return schedule


def _describe(parts: RunParts, peak: float, peak_source: str) -> None:
    """Print and save the resolved configuration: RUN_DIR/config.json (this start's), and one file per start in
    RUN_DIR/configs/ (their history: what a resumed run was started with each time)."""
    plan, env, run_dir = parts.plan, parts.env, parts.args.output
    resolved = {"recipe_name": parts.args.recipe_name, "started_at_step": parts.step, "command_line": sys.argv,
                "recipe": asdict(parts.task.recipe), "ds_config": plan.ds_config, "data": parts.args.data,
                "world_size": env.world_size, "launcher": env.launcher, "device": str(env.device),
                "dtype": str(plan.dtype), "clips_per_step": plan.batch.clips_per_step,
                "micro_batch": plan.batch.micro_batch, "accumulation": plan.batch.accumulation, "lr": plan.lr,
                **asdict(plan.schedule), "stop_at": plan.stop_at, "model": asdict(parts.model.cfg),
                "loader_decoder": parts.loader.route.name, "memory": plan.memory_note, "peak_flops": peak}
    if not env.is_main:
        return
    history = os.path.join(run_dir, "configs")
    os.makedirs(history, exist_ok=True)
    start = sum(name.startswith("start") for name in os.listdir(history)) + 1
    for path in (os.path.join(run_dir, "config.json"), os.path.join(history, f"start{start:03d}.json")):
        with open(path, "w") as f:
            json.dump(resolved, f, indent=1, default=str)
    log.info("resolved configuration (saved to %s):\n%s", os.path.join(run_dir, "config.json"),
             json.dumps(resolved, indent=1, default=str))
    log.info("%s (started by %s); lr %.3g; %d steps (%.1f per epoch); starting at step %d", plan.batch.describe(),
             env.launcher, plan.lr, plan.schedule.total_steps, plan.schedule.steps_per_epoch, parts.step)
    log.info("memory: %s", plan.memory_note)
    masking = getattr(parts.task.recipe, "masking", None)  # (pretraining's: the encoder sees the visible tokens)
    log.info("%s; MFU against %.3g FLOP/s (%s)", describe_attention(parts.model.cfg, env.device, plan.dtype,
                                                                    masking.mask_ratio if masking else 0.9),
             peak, peak_source)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _setup_logging(run_dir: str, main: bool) -> None:
    """Our loggers to stdout (and RUN_DIR/train.log on rank 0); other ranks only warn. Root is left alone."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if main:
        handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log")))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("trainer", "dali_pipes"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if main else logging.WARNING)
        for old in [h for h in logger.handlers if getattr(h, "from_run", False)]:  # a second run in one process
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            handler.from_run = True
            logger.addHandler(handler)
