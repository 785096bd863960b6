"""The training run both trainers share: command line, checks, distributed set-up, resume, the step loop with its
progress bar, TensorBoard, loss guard and checkpoints. A Task (pretrain.py, finetune.py) brings the model, the
loader, the loss and what happens around it.

Set-up order, each step taking only what the steps before it produced:
  recipe and model options checked (no heavy start for a typo) -> package versions -> distributed processes ->
  run folder (shared by every rank?) -> ds_config -> memory plan (recompute or not) -> loader (its config made
  from the recipe: trainer/data.py) -> model ->
  resume plan (may switch the ds_config to DeepSpeed's universal format) -> engine -> resume -> monitor.
"""

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dali_pipes.shard_format import read_manifest
from dali_pipes import VideoLoader
from trainer.checkpointing import Checkpointer
from trainer.data import loader_config
from trainer.device_peak import device_peak_flops
from trainer.engine import ConfigConflict, build_engine, init_distributed, load_ds_config
from trainer.host_readback import HostReadback
from trainer.memory_plan import device_capacity, plan_recompute
from trainer.monitor import LossGuard, Monitor
from trainer.recipes import check_recipe, resolve_recipe
from trainer.run_folder import NotShared, check_shared
from trainer.versions import VersionProblem, require_versions

log = logging.getLogger("trainer")


class Task:
    """What differs between pretraining and fine-tuning. A task is made from its own command-line options."""

    recipes: dict = {}
    description: str = ""
    trains: bool = True  # False: evaluation only

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        pass

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Task":
        return cls()

    def model_config(self, recipe, manifest: dict):
        """The model's configuration (validated, no weights yet), for data described by its manifest."""
        raise NotImplementedError

    def build_model(self, recipe, cfg, env):
        raise NotImplementedError

    def views_per_clip(self, recipe) -> int:
        """Rows of the model's batch per decoded clip."""
        return recipe.repeats

    def loss(self, engine, batch: dict, recipe):
        """(scalar loss, whatever after_step wants to see)."""
        raise NotImplementedError

    def train_flops_per_clip(self, model, recipe) -> float:
        """Forward + backward FLOPs for one decoded clip (all its views)."""
        raise NotImplementedError

    def lr_scale_of(self, model, recipe):
        return None

    def wants_outputs(self, step: int, run: "Run") -> bool:
        """Whether after_step needs this step's batch and outputs (kept one step longer than usual)."""
        return False

    def after_step(self, run: "Run", step: int, batch: dict | None, outputs) -> None:
        pass

    def after_epoch(self, run: "Run", epoch: int) -> None:
        pass

    def finish(self, run: "Run", tag: str | None) -> list[str]:
        """Work after the last step (on every rank); returns lines for the closing summary."""
        return []


@dataclass
class _Step:
    """An optimizer step whose loss is still on its way to the host (accounted for one step later)."""

    step: int
    readback: HostReadback  # [mean loss over its micro-batches, skipped videos], summed over ranks
    lr: float
    elapsed: float  # seconds since the previous step ended
    wait: float  # of them, waiting for the loader
    logged: bool  # a log_every step: TensorBoard scalars, and the gradient norm is read
    grad_norm: object  # DeepSpeed's (a float or a device scalar) on logged steps
    batch: dict | None = None  # kept only when the task wants them (pictures)
    outputs: object = None


class Run:
    """Everything a step loop needs, set up from the command line in the order the module docstring gives."""

    def __init__(self, task: Task, args: argparse.Namespace, recipe, model_cfg, quiet: bool = False):
        """quiet: warnings only, no progress bar (for tools that run a few steps, like the preflight)."""
        self.task, self.args, self.recipe = task, args, recipe
        self.env = init_distributed()
        self.run_dir = args.output
        os.makedirs(self.run_dir, exist_ok=True)
        _setup_logging(self.run_dir, self.env.is_main and not quiet)
        check_shared(self.run_dir, self.env.rank, self.env.world_size)
        ds_config = load_ds_config(args.ds_config, recipe, self.env.world_size, self.env.device)
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.accum = ds_config.get("gradient_accumulation_steps", 1)
        self.clips_per_step = self.micro * self.accum * self.env.world_size
        self.lr = recipe.blr * self.clips_per_step / 256
        self.dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
        model_cfg, self.memory_note = plan_recompute(model_cfg, recipe, ds_config, self.env.world_size,
                                                     task.views_per_clip(recipe), device_capacity(self.env.device))
        _seed_everything(recipe.seed + self.env.rank)

        self.loader = VideoLoader(loader_config(recipe, args.data, self.env, self.micro, self.dtype))
        self.model = task.build_model(recipe, model_cfg, self.env)
        self.steps_per_epoch = len(self.loader) / self.accum
        self.total_steps = max(1, math.ceil(recipe.epochs * self.steps_per_epoch))
        warmup = recipe.warmup_epochs * self.steps_per_epoch
        self.checkpointer = Checkpointer(self.run_dir, self.env, recipe.keep_checkpoints)
        resume = self.checkpointer.resume_plan()
        self.ds_config = resume.adjust(ds_config) if resume else ds_config
        self.engine = build_engine(self.model, recipe, self.ds_config, self.lr, self.total_steps, warmup,
                                   task.lr_scale_of(self.model, recipe))
        peak, peak_source = device_peak_flops(self.env.device, self.dtype)
        self.step = self.checkpointer.resume(self.engine, resume, self.loader) if resume else 0  # restores RNGs
        self.stop_at = min(self.total_steps, args.max_steps or self.total_steps)
        flops = task.train_flops_per_clip(self.model, recipe) * self.micro * self.accum
        self.monitor = Monitor(self.run_dir, self.env.is_main, self.step, self.stop_at, self.clips_per_step,
                               self.env.world_size, flops, peak, views_per_clip=task.views_per_clip(recipe),
                               progress_bar=not quiet)
        self._stream = _endless(self.loader)
        self._describe(peak, peak_source)

    def _describe(self, peak: float, peak_source: str) -> None:
        """Print and save the resolved configuration."""
        from models.attention import describe_attention

        resolved = {"recipe_name": self.args.recipe, "recipe": asdict(self.recipe), "ds_config": self.ds_config,
                    "data": self.args.data, "world_size": self.env.world_size, "device": str(self.env.device),
                    "dtype": str(self.dtype), "clips_per_step": self.clips_per_step, "lr": self.lr,
                    "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                    "stop_at": self.stop_at, "model": asdict(self.model.cfg),
                    "loader_decoder": self.loader.decoder.name, "memory": self.memory_note, "peak_flops": peak}
        if self.env.is_main:
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                json.dump(resolved, f, indent=1, default=str)
            log.info("resolved configuration (saved to %s):\n%s", os.path.join(self.run_dir, "config.json"),
                     json.dumps(resolved, indent=1, default=str))
            log.info("%d processes x %d clips x %d accumulation = %d clips per step; lr %.3g; %d steps "
                     "(%.1f per epoch); starting at step %d", self.env.world_size, self.micro, self.accum,
                     self.clips_per_step, self.lr, self.total_steps, self.steps_per_epoch, self.step)
            log.info("memory: %s", self.memory_note)
            log.info("%s; MFU against %.3g FLOP/s (%s)", describe_attention(self.model.cfg, self.env.device,
                     self.dtype), peak, peak_source)

    def train(self) -> int:
        """Train to the end (or --max-steps), checkpoint, finish; returns the process exit code."""
        problem = self.run_steps(self.stop_at) if self.task.trains else None
        if problem:
            return self._stop(problem)
        tag = self.checkpointer.latest()
        if self.task.trains and tag != f"step{self.step:08d}":
            tag = self.checkpointer.save(self.engine, self.step, self.loader)  # (a finished run has nothing new)
        summary = self.task.finish(self, tag)
        self.close()
        if self.env.is_main:
            lines = [f"done: {self.step} steps in {self.run_dir}; {self.monitor.loss_summary()}",
                     f"  TensorBoard: tensorboard --logdir {os.path.join(self.run_dir, 'tensorboard')}"]
            if tag:
                lines.insert(1, f"  checkpoint: {os.path.join(self.checkpointer.dir, tag)} (resumes from here)")
            print("\n".join(lines + summary), flush=True)
        return 0

    def run_steps(self, stop_at: int) -> str | None:
        """Optimizer steps until `stop_at`; returns why the loss guard stopped the run, or None.

        The host never waits for the device inside this loop but where noted: each step's loss reaches the host one
        step later (HostReadback), where the guard checks it and the monitor logs it, so a NaN is caught at the
        next step or, at the latest, before a checkpoint is written. What remains synchronous, and why:
        - DeepSpeed's ZeRO-1/2 step reads the global gradient norm on the host to clip it (stage_1_and_2.py,
          `.item()` once per optimizer step, not per micro-step): clipping needs it; ours is read only when logged.
        - a checkpoint, an evaluation and a picture read their tensors: every checkpoint_every / eval_every /
          image_every steps.
        - ZeRO's gradient reduction is a collective each optimizer step: it is the step."""
        guard, recipe, device = LossGuard(self.recipe.explosion_factor), self.recipe, self.env.device
        epoch, pending = self.loader.epoch, None
        loss_sum = torch.zeros((), device=device)
        last_end, wait = time.perf_counter(), 0.0
        while self.step < stop_at:
            start = time.perf_counter()
            batch = next(self._stream)
            wait += time.perf_counter() - start
            loss, outputs = self.task.loss(self.engine, batch, recipe)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().float()
            if self.engine.global_steps == self.step:  # inside a gradient accumulation
                continue
            self.step = self.engine.global_steps
            skipped = _to_device(float(self.loader.skipped), device)
            logged = _due(self.step, recipe.log_every)
            now = time.perf_counter()
            current = _Step(self.step, HostReadback(torch.stack([loss_sum / self.accum, skipped])),
                            self.engine.get_lr()[0], now - last_end, wait, logged,
                            self.engine.get_global_grad_norm() if logged else None)
            last_end, wait = now, 0.0
            if self.task.wants_outputs(self.step, self):
                current.batch, current.outputs = batch, outputs
            loss_sum.zero_()  # (the stack above copied it)
            problem = self._account(pending, guard) if pending else None
            pending = current
            if problem:
                return problem
            if self.loader.epoch != epoch:
                epoch = self.loader.epoch
                self.task.after_epoch(self, epoch)
            if _due(self.step, recipe.checkpoint_every) and self.step < stop_at:
                problem, pending = self._account(pending, guard), None  # never checkpoint a bad step
                if problem:
                    return problem
                self.checkpointer.save(self.engine, self.step, self.loader)
        return self._account(pending, guard) if pending else None

    def _account(self, done: _Step, guard: LossGuard) -> str | None:
        """The guard and the monitor for a step whose numbers have reached the host."""
        total_loss, skipped = done.readback.result()
        mean_loss = total_loss / self.env.world_size
        problem = guard.check(mean_loss)
        if problem:
            return f"stopping at step {done.step}: {problem}"
        norm = None if done.grad_norm is None else float(done.grad_norm)
        self.monitor.step(done.step, mean_loss, done.lr, norm, int(skipped), done.logged, done.elapsed, done.wait)
        self.task.after_step(self, done.step, done.batch, done.outputs)
        return None

    def close(self) -> None:
        self.monitor.close()
        self.loader.close()

    def _stop(self, problem: str) -> int:
        latest = self.checkpointer.latest()
        where = f"the last good checkpoint is {os.path.join(self.checkpointer.dir, latest)}" if latest \
            else "no checkpoint was written yet"
        message = (f"{problem}. Nothing after the last checkpoint is saved; {where} "
                   "(a restart resumes from it: lower blr, or raise warmup_epochs, first)")
        if self.env.is_main:
            log.error(message)
        self.close()
        return 3


def _due(step: int, every: int) -> bool:
    """Whether an `*_every` action falls on this step (0: never)."""
    return bool(every) and step % every == 0


def _to_device(value: float, device: torch.device) -> torch.Tensor:
    """A host number as a device scalar without a synchronous copy (from pinned memory on CUDA)."""
    host = torch.tensor(value, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _endless(loader):
    while True:
        yield from loader


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


def parse_args(task_type: type[Task], argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=task_type.description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", required=True, help="DeepSpeed config (ds_configs/*.json)")
    p.add_argument("--recipe", required=True, help=f"one of {sorted(task_type.recipes)}")
    p.add_argument("--data", required=True, help="shards built by tools/build_shards.py")
    p.add_argument("--output", required=True, help="run folder: checkpoints, logs; an existing one is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (checkpointing at the end)")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher (read from the env)")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, model options model.key=value")
    task_type.add_arguments(p)
    return p.parse_intermixed_args(argv)


def prepare(task_type: type[Task], argv=None):
    """(task, args, recipe, model config) from the command line, everything checked that can be without starting
    anything heavy; raises ValueError (and its kin) with the reason."""
    args = parse_args(task_type, argv)
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}")
    recipe = resolve_recipe(task_type.recipes, args.recipe, args.overrides)
    check_recipe(recipe)
    task = task_type.from_args(args)
    model_cfg = task.model_config(recipe, read_manifest(args.data))
    require_versions()
    return task, args, recipe, model_cfg


def main(task_type: type[Task], argv=None) -> int:
    try:
        task, args, recipe, model_cfg = prepare(task_type, argv)
        run = Run(task, args, recipe, model_cfg)
    except (ConfigConflict, ValueError, TypeError, FileNotFoundError, VersionProblem, NotShared) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run.train()
