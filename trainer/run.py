"""The training run both trainers share: command line, distributed set-up, config checks, resume, the step loop with
its progress bar, TensorBoard, loss guard and checkpoints. A Task (pretrain.py, finetune.py) brings the model, the
loader, the loss and what happens around it."""

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from trainer.checkpointing import Checkpointer
from trainer.engine import ConfigConflict, build_engine, init_distributed, load_ds_config
from trainer.monitor import LossGuard, Monitor, device_peak_flops
from trainer.recipes import resolve_recipe

log = logging.getLogger("trainer")


class Task:
    """What differs between pretraining and fine-tuning."""

    recipes: dict = {}
    description: str = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def build_model(self, recipe, env):
        raise NotImplementedError

    def build_loader(self, recipe, data: str, env, micro_batch: int, dtype):
        raise NotImplementedError

    def loss(self, engine, batch: dict, recipe):
        """(scalar loss, whatever after_step wants to see)."""
        raise NotImplementedError

    def train_flops_per_clip(self, model, recipe) -> float:
        """Forward + backward FLOPs for one decoded clip (all its views)."""
        raise NotImplementedError

    def lr_scale_of(self, model, recipe):
        return None

    def after_step(self, run: "Run", step: int, batch: dict, outputs) -> None:
        pass

    def after_epoch(self, run: "Run", epoch: int) -> None:
        pass

    def finish(self, run: "Run", tag: str) -> list[str]:
        """Work after the last step (on every rank); returns lines for the closing summary."""
        return []


class Run:
    """Everything a step loop needs, set up from the command line."""

    def __init__(self, task: Task, args: argparse.Namespace, recipe):
        self.task, self.args, self.recipe = task, args, recipe
        task.args = args
        self.env = init_distributed()
        self.run_dir = args.output
        os.makedirs(self.run_dir, exist_ok=True)
        _setup_logging(self.run_dir, self.env.is_main)
        self.ds_config = load_ds_config(args.ds_config, recipe, self.env.world_size, self.env.device)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config.get("gradient_accumulation_steps", 1)
        self.clips_per_step = self.micro * self.accum * self.env.world_size
        self.lr = recipe.blr * self.clips_per_step / 256
        self.dtype = torch.bfloat16 if self.ds_config.get("bf16", {}).get("enabled") else torch.float32
        _seed_everything(recipe.seed + self.env.rank)

        self.loader = task.build_loader(recipe, args.data, self.env, self.micro, self.dtype)
        self.model = task.build_model(recipe, self.env)
        self.steps_per_epoch = len(self.loader) / self.accum
        self.total_steps = max(1, math.ceil(recipe.epochs * self.steps_per_epoch))
        warmup = recipe.warmup_epochs * self.steps_per_epoch
        self.checkpointer = Checkpointer(self.run_dir, self.env, recipe.keep_checkpoints)
        tag = self.checkpointer.prepare_resume(self.ds_config)
        self.engine = build_engine(self.model, recipe, self.ds_config, self.lr, self.total_steps, warmup,
                                   self.env.device, task.lr_scale_of(self.model, recipe))
        peak, peak_source = device_peak_flops(self.env.device, self.dtype)
        self.step = self.checkpointer.resume(self.engine, tag, self.loader) if tag else 0  # last: restores the RNGs
        self.stop_at = min(self.total_steps, args.max_steps or self.total_steps)
        flops = task.train_flops_per_clip(self.model, recipe) * self.micro * self.accum
        self.monitor = Monitor(self.run_dir, self.env.is_main, self.step, self.stop_at, self.clips_per_step,
                               self.env.world_size, flops, peak)
        self._describe(peak, peak_source)

    def _describe(self, peak: float, peak_source: str) -> None:
        """Print and save the resolved configuration."""
        from models.attention import describe_attention

        resolved = {"recipe_name": self.args.recipe, "recipe": asdict(self.recipe), "ds_config": self.ds_config,
                    "data": self.args.data, "world_size": self.env.world_size, "device": str(self.env.device),
                    "dtype": str(self.dtype), "clips_per_step": self.clips_per_step, "lr": self.lr,
                    "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                    "stop_at": self.stop_at, "model": asdict(self.model.cfg), "loader_decoder": self.loader.decoder,
                    "peak_flops": peak}
        if self.env.is_main:
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                json.dump(resolved, f, indent=1, default=str)
            log.info("resolved configuration (saved to %s):\n%s", os.path.join(self.run_dir, "config.json"),
                     json.dumps(resolved, indent=1, default=str))
            log.info("%d processes x %d clips x %d accumulation = %d clips per step; lr %.3g; %d steps "
                     "(%.1f per epoch); starting at step %d", self.env.world_size, self.micro, self.accum,
                     self.clips_per_step, self.lr, self.total_steps, self.steps_per_epoch, self.step)
            log.info("%s; MFU against %.3g FLOP/s (%s)", describe_attention(self.env.device, self.dtype,
                     self.model.cfg.attn_impl), peak, peak_source)

    def train(self) -> int:
        """The step loop; returns the process exit code."""
        guard, recipe = LossGuard(self.recipe.explosion_factor), self.recipe
        stream = _endless(self.loader)
        epoch = self.loader.epoch
        while self.step < self.stop_at and not getattr(self.args, "eval_only", False):
            start = time.perf_counter()
            batch = next(stream)
            self.monitor.data_wait(time.perf_counter() - start)
            loss, outputs = self.task.loss(self.engine, batch, recipe)
            summed = torch.stack([loss.detach().float(), torch.tensor(float(self.loader.skipped), device=loss.device)])
            dist.all_reduce(summed)
            mean_loss, skipped = summed[0].item() / self.env.world_size, int(summed[1].item())
            problem = guard.check(mean_loss)
            if problem:
                return self._stop(problem)
            self.engine.backward(loss)
            self.engine.step()
            if self.engine.global_steps == self.step:  # inside a gradient accumulation
                continue
            self.step = self.engine.global_steps
            norm = self.engine.get_global_grad_norm()
            self.monitor.step(self.step, mean_loss, self.engine.get_lr()[0], None if norm is None else float(norm),
                              skipped, log=self.step % recipe.log_every == 0)
            self.task.after_step(self, self.step, batch, outputs)
            if self.loader.epoch != epoch:
                epoch = self.loader.epoch
                self.task.after_epoch(self, epoch)
            if self.step % recipe.checkpoint_every == 0 and self.step < self.stop_at:
                self.checkpointer.save(self.engine, self.step, self.loader)
        tag = self.checkpointer.latest()
        if tag != f"step{self.step:08d}" and not getattr(self.args, "eval_only", False):
            tag = self.checkpointer.save(self.engine, self.step, self.loader)  # (a finished run has nothing new)
        summary = self.task.finish(self, tag)
        self.monitor.close()
        self.loader.close()
        if self.env.is_main:
            lines = [f"done: {self.step} steps in {self.run_dir}; {self.monitor.loss_summary()}",
                     f"  TensorBoard: tensorboard --logdir {os.path.join(self.run_dir, 'tensorboard')}"]
            if tag:
                lines.insert(1, f"  checkpoint: {os.path.join(self.checkpointer.dir, tag)} (resumes from here)")
            print("\n".join(lines + summary), flush=True)
        return 0

    def _stop(self, problem: str) -> int:
        latest = self.checkpointer.latest()
        where = f"the last good checkpoint is {os.path.join(self.checkpointer.dir, latest)}" if latest \
            else "no checkpoint was written yet"
        message = (f"stopping at step {self.step + 1}: {problem}. Nothing after the last checkpoint is saved; {where} "
                   "(a restart resumes from it: lower blr, or raise warmup_epochs, first)")
        if self.env.is_main:
            log.error(message)
        self.monitor.close()
        self.loader.close()
        return 3


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


def parse_args(task: Task, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=task.description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", required=True, help="DeepSpeed config (ds_configs/*.json)")
    p.add_argument("--recipe", required=True, help=f"one of {sorted(task.recipes)}")
    p.add_argument("--data", required=True, help="shards built by tools/build_shards.py")
    p.add_argument("--output", required=True, help="run folder: checkpoints, logs; an existing one is resumed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (checkpointing at the end)")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher (read from the env)")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, model options model.key=value")
    task.add_arguments(p)
    return p.parse_intermixed_args(argv)


def main(task: Task, argv=None) -> int:
    args = parse_args(task, argv)
    try:
        recipe = resolve_recipe(task.recipes, args.recipe, args.overrides)
        run = Run(task, args, recipe)
    except (ConfigConflict, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run.train()
