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

from dali_pipes import VideoLoader
from dali_pipes.shard_format import read_manifest
from models.attention import cpu_has_native_bf16
from trainer.checkpointing import Checkpointer
from trainer.data import loader_config
from trainer.device_peak import device_peak_flops
from trainer.ds_config import plan_batch, read_ds_config
from trainer.engine import build_engine, init_distributed
from trainer.host_readback import HostReadback
from trainer.memory_plan import device_capacity, plan_recompute
from trainer.monitor import LossGuard, Monitor
from trainer.preemption import EXIT_PREEMPTED, MARKER, PreemptionSignal
from trainer.recipes import CHANGEABLE_ON_RESUME, as_saved, recipe_changes, recipe_problems, resolve_recipe
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
    # summed over ranks: [mean loss over its micro-batches, skipped videos, gradient norm, ranks told to stop]
    readback: HostReadback
    lr: float
    elapsed: float  # seconds since the previous step ended
    wait: float  # of them, waiting for the loader
    logged: bool  # a log_every step: TensorBoard scalars
    batch: dict | None = None  # kept only when the task wants them (pictures)
    outputs: object = None


PREEMPTED = "preempted"  # what run_steps returns when a signal stopped it (after checkpointing)


class Run:
    """Everything a step loop needs, set up from the command line in the order the module docstring gives."""

    def __init__(self, task: Task, args: argparse.Namespace, recipe, model_cfg, quiet: bool = False):
        """quiet: warnings only, no progress bar (for tools that run a few steps, like the preflight)."""
        self.task, self.args, self.recipe = task, args, recipe
        self.preemption = PreemptionSignal()  # from the start: a signal during set-up stops at the first step
        self.env = init_distributed()
        self.run_dir = args.output
        os.makedirs(self.run_dir, exist_ok=True)
        _setup_logging(self.run_dir, self.env.is_main and not quiet)
        check_shared(self.run_dir, self.env.rank, self.env.world_size)
        marker = os.path.join(self.run_dir, MARKER)
        if self.env.is_main and os.path.exists(marker):  # (for the requeue script of the job that stopped)
            with open(marker) as f:
                log.info("starting again after a stop signal at step %d", json.load(f)["step"])
            os.remove(marker)
        self.checkpointer = Checkpointer(self.run_dir, self.env, recipe.keep_checkpoints)
        saved = self.checkpointer.saved_run()  # what the checkpoint to resume from says about its run (or None)
        ds_config = read_ds_config(args.ds_config, recipe)
        # the global batch: the recipe's, else the one the run was started with (kept on another number of processes)
        self.batch = plan_batch(recipe.batch_size or (saved or {}).get("clips_per_step"), ds_config.micro_batch,
                                self.env.world_size, ds_config.accumulation)
        self.micro, self.accum, self.clips_per_step = (self.batch.micro_batch, self.batch.accumulation,
                                                       self.batch.clips_per_step)
        self.lr = recipe.blr * self.clips_per_step / 256
        self.dtype = ds_config.dtype
        if ds_config.bf16 and self.env.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("bf16 on a CPU without AVX512-BF16/AMX runs matmuls ~100x slower than fp32 (measured 1 vs "
                        "166 GFLOP/s): ds_configs/cpu.json trains in fp32")
        pixels = read_manifest(args.data)["splits"].get(recipe.split, {}).get("pixels_median")
        model_cfg, self.memory_note = plan_recompute(model_cfg, recipe, ds_config, self.batch,
                                                     task.views_per_clip(recipe), device_capacity(self.env.device),
                                                     pixels)
        _seed_everything(recipe.seed + self.env.rank)

        self.loader = VideoLoader(loader_config(recipe, args.data, self.env, self.micro, self.dtype))
        self.model = task.build_model(recipe, model_cfg, self.env)
        self.steps_per_epoch = len(self.loader) / self.accum
        changes = recipe_changes(saved["recipe"], recipe) if saved and "recipe" in saved else {}
        if changes and self.env.is_main:
            log.warning("resuming with recipe changes (logged in RUN_DIR/configs/): %s", ", ".join(
                f"{name} {before!r} -> {now!r}" for name, (before, now) in sorted(changes.items())))
        rescheduled = {"epochs", "warmup_epochs", "batch_size"} & set(changes)
        if saved and "total_steps" in saved and not rescheduled:  # the schedule it began with: a step means the same
            self.total_steps, warmup = saved["total_steps"], saved["warmup_steps"]
        else:
            self.total_steps = max(1, math.ceil(recipe.epochs * self.steps_per_epoch))
            warmup = recipe.warmup_epochs * self.steps_per_epoch
        self._note_resume_layout(saved)
        self.checkpointer.run_facts = {"clips_per_step": self.clips_per_step, "micro_batch": self.micro,
                                       "accumulation": self.accum, "total_steps": self.total_steps,
                                       "warmup_steps": warmup, "recipe": as_saved(recipe)}
        resume = self.checkpointer.resume_plan()
        self.ds_config = ds_config.for_deepspeed(recipe, self.batch)
        if resume:
            self.ds_config = resume.adjust(self.ds_config)
        self.engine = build_engine(self.model, recipe, self.ds_config, self.lr, self.total_steps, warmup,
                                   task.lr_scale_of(self.model, recipe))
        peak, peak_source = device_peak_flops(self.env.device, self.dtype)
        self.guard = LossGuard(recipe.explosion_factor)
        self.step = self.checkpointer.resume(self.engine, resume, self._stateful()) if resume else 0  # and RNGs
        self.stop_at = min(self.total_steps, args.max_steps or self.total_steps)
        flops = task.train_flops_per_clip(self.model, recipe) * self.micro * self.accum
        self.monitor = Monitor(self.run_dir, self.env.is_main, self.step, self.stop_at, self.clips_per_step,
                               self.env.world_size, flops, peak, views_per_clip=task.views_per_clip(recipe),
                               progress_bar=not quiet)
        self._stream = _endless(self.loader)
        self._describe(peak, peak_source)

    def _note_resume_layout(self, saved: dict | None) -> None:
        """Say what changed when the run resumes on another layout of processes (the global batch did not)."""
        if not saved or not self.env.is_main or "micro_batch" not in saved:
            return
        before = (saved["world_size"], saved["micro_batch"], saved["accumulation"])
        now = (self.env.world_size, self.micro, self.accum)
        if before != now:
            log.warning("resuming a run of %d process(es) x %d clips x %d accumulation on %d x %d x %d: the same %d "
                        "clips per optimizer step, lr and schedule (%d steps); the loader goes on with the epoch in a "
                        "fresh order", *before, *now, self.clips_per_step, self.total_steps)

    def _describe(self, peak: float, peak_source: str) -> None:
        """Print and save the resolved configuration: RUN_DIR/config.json (this start's), and one file per start in
        RUN_DIR/configs/ (their history: what a resumed run was started with each time)."""
        from models.attention import describe_attention

        resolved = {"recipe_name": self.args.recipe, "started_at_step": self.step, "command_line": sys.argv,
                    "recipe": asdict(self.recipe), "ds_config": self.ds_config,
                    "data": self.args.data, "world_size": self.env.world_size, "device": str(self.env.device),
                    "dtype": str(self.dtype), "clips_per_step": self.clips_per_step, "lr": self.lr,
                    "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                    "stop_at": self.stop_at, "model": asdict(self.model.cfg),
                    "loader_decoder": self.loader.route.name, "memory": self.memory_note, "peak_flops": peak}
        if self.env.is_main:
            history = os.path.join(self.run_dir, "configs")
            os.makedirs(history, exist_ok=True)
            start = sum(name.startswith("start") for name in os.listdir(history)) + 1
            for path in (os.path.join(self.run_dir, "config.json"), os.path.join(history, f"start{start:03d}.json")):
                with open(path, "w") as f:
                    json.dump(resolved, f, indent=1, default=str)
            log.info("resolved configuration (saved to %s):\n%s", os.path.join(self.run_dir, "config.json"),
                     json.dumps(resolved, indent=1, default=str))
            log.info("%s (started by %s); lr %.3g; %d steps (%.1f per epoch); starting at step %d",
                     self.batch.describe(), self.env.launcher, self.lr, self.total_steps, self.steps_per_epoch,
                     self.step)
            log.info("memory: %s", self.memory_note)
            log.info("%s; MFU against %.3g FLOP/s (%s)", describe_attention(self.model.cfg, self.env.device,
                     self.dtype), peak, peak_source)

    def train(self) -> int:
        """Train to the end (or --max-steps), checkpoint, finish; returns the process exit code."""
        problem = self.run_steps(self.stop_at) if self.task.trains else None
        if problem == PREEMPTED:
            return self._preempted()
        if problem:
            return self._stop(problem)
        tag = self.checkpointer.latest()
        if self.task.trains and tag != f"step{self.step:08d}":
            tag = self.checkpointer.save(self.engine, self.step, self._stateful())  # (a finished run has nothing new)
        summary = self.task.finish(self, tag)
        self.close()
        if self.env.is_main:
            lines = [f"done: {self.step} steps in {self.run_dir}; {self.monitor.loss_summary()}",
                     f"  TensorBoard: tensorboard --logdir {os.path.join(self.run_dir, 'tensorboard')}"]
            if tag:
                lines.insert(1, f"  checkpoint: {os.path.join(self.checkpointer.dir, tag)} (resumes from here)")
            print("\n".join(lines + summary), flush=True)
        return 0

    def _preempted(self) -> int:
        """After the checkpoint a stop signal asked for: say so, leave the marker for requeue scripts, exit 75."""
        tag = self.checkpointer.latest()
        if self.env.is_main:
            with open(os.path.join(self.run_dir, MARKER), "w") as f:
                json.dump({"step": self.step, "checkpoint": tag, "signal": self.preemption.received or "another rank's",
                           "time": time.time()}, f)
            log.warning("stopped by %s at step %d: checkpoint %s written; exiting with %d. The same command resumes "
                        "from it (a requeued job does)", self.preemption.received or "another rank's signal",
                        self.step, os.path.join(self.checkpointer.dir, tag), EXIT_PREEMPTED)
        self.close()
        return EXIT_PREEMPTED

    def run_steps(self, stop_at: int) -> str | None:
        """Optimizer steps until `stop_at`; returns why the guard stopped the run, PREEMPTED after the checkpoint a
        stop signal asked for, or None.

        The host never waits for the device inside this loop but where noted: each step's loss, gradient norm and
        stop requests reach the host one step later (HostReadback), where the guard checks them, the monitor logs
        them and all ranks learn of a signal any rank got, so a NaN is caught at the next step or, at the latest,
        before a checkpoint is written. What remains synchronous, and why (DeepSpeed 0.19.8, bf16):
        - ZeRO-2 with check_grad_overflow off (ds_configs/zero2_bf16.json): one read per optimizer step, the
          non-finite test of the gradient norm while clipping (stage_1_and_2.py unscale_and_clip_grads). With the
          check on it adds a pass over every gradient, an all-reduce and an `.item()` (check_overflow): off in the
          shipped configs, since the guard here stops on a non-finite loss or gradient norm.
        - ZeRO-1 with bf16 and fp32 accumulation (DeepSpeed's BF16_Optimizer) and ZeRO-3: the same test of the norm
          each step (bf16_optimizer.py step, stage3.py step), whatever check_grad_overflow says.
        - a checkpoint, an evaluation and a picture read their tensors: every checkpoint_every / eval_every /
          image_every steps.
        - ZeRO's gradient reduction is a collective each optimizer step: it is the step."""
        guard, recipe, device = self.guard, self.recipe, self.env.device
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
            counters = _to_device([float(self.loader.skipped), float(self.preemption.requested)], device)
            values = torch.cat([(loss_sum / self.accum).view(1), _grad_norm(self.engine, device).view(1), counters])
            now = time.perf_counter()
            current = _Step(self.step, HostReadback(values), self.engine.get_lr()[0], now - last_end, wait,
                            _due(self.step, recipe.log_every))
            last_end, wait = now, 0.0
            if self.task.wants_outputs(self.step, self):
                current.batch, current.outputs = batch, outputs
            loss_sum.zero_()  # (the cat above copied it)
            problem, stop = self._account(pending, guard) if pending else (None, False)
            pending = current
            if problem:
                return problem
            if stop:  # a rank got a stop signal: every rank learns it here, at the same step
                problem, pending = self._account(pending, guard)[0], None
                if problem:
                    return problem
                self.checkpointer.save(self.engine, self.step, self._stateful())
                return PREEMPTED
            if self.loader.epoch != epoch:
                epoch = self.loader.epoch
                self.task.after_epoch(self, epoch)
            if _due(self.step, recipe.checkpoint_every) and self.step < stop_at:
                (problem, stop), pending = self._account(pending, guard), None  # never checkpoint a bad step
                if problem:
                    return problem
                self.checkpointer.save(self.engine, self.step, self._stateful())
                if stop:
                    return PREEMPTED
        if pending:
            problem, stop = self._account(pending, guard)
            if not problem and stop and self.step < self.stop_at:
                self.checkpointer.save(self.engine, self.step, self._stateful())
                return PREEMPTED
            return problem
        return None

    def _account(self, done: _Step, guard: LossGuard) -> tuple[str | None, bool]:
        """The guard and the monitor for a step whose numbers have reached the host: (why the guard stops the run,
        or None; whether some rank was told to stop)."""
        total_loss, grad_norm, skipped, stops = done.readback.result()
        mean_loss, grad_norm = total_loss / self.env.world_size, grad_norm / self.env.world_size
        problem = guard.check(mean_loss, grad_norm)
        if problem:
            return f"stopping at step {done.step}: {problem}", False
        self.monitor.step(done.step, mean_loss, done.lr, grad_norm if done.logged else None, int(skipped),
                          done.logged, done.elapsed, done.wait)
        self.task.after_step(self, done.step, done.batch, done.outputs)
        return None, stops > 0

    def _stateful(self) -> dict:
        """What a checkpoint saves besides the engine and the RNGs: where the loader stands, what the guard saw."""
        return {"loader": self.loader, "guard": self.guard}

    def close(self) -> None:
        self.monitor.close()
        self.loader.close()
        self.preemption.restore()

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


def _to_device(values, device: torch.device) -> torch.Tensor:
    """Host numbers as a float32 device tensor without a synchronous copy (from pinned memory on CUDA)."""
    host = torch.tensor(values, dtype=torch.float32, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _grad_norm(engine, device: torch.device) -> torch.Tensor:
    """DeepSpeed's global gradient norm of the last step as a float32 device scalar, without reading it (a device
    tensor; a Python float where DeepSpeed skipped a non-finite step)."""
    norm = engine.get_global_grad_norm()
    if torch.is_tensor(norm):
        return norm.detach().float().reshape(())
    return _to_device(0.0 if norm is None else norm, device)  # (None: DeepSpeed computed none)


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
    p.add_argument("--allow-changes", action="store_true",
                   help="resume with a recipe that differs from the run's in what it computes (logged)")
    p.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher (read from the env)")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, model options model.key=value")
    task_type.add_arguments(p)
    return p.parse_intermixed_args(argv)


def resolve(task_type: type[Task], args: argparse.Namespace):
    """(task, recipe, model config) for the command line's recipe, overrides, data and task options, with every
    problem of the recipe and the model's options in one ValueError; nothing heavy is started."""
    recipe = resolve_recipe(task_type.recipes, args.recipe, args.overrides)
    task = task_type.from_args(args)
    problems = recipe_problems(recipe)
    try:  # the model's options too, in the same message
        model_cfg = task.model_config(recipe, read_manifest(args.data))
    except (ValueError, TypeError) as err:
        problems.append(str(err))
    if problems:
        raise ValueError("invalid options: " + "; ".join(problems))
    return task, recipe, model_cfg


def prepare(task_type: type[Task], argv=None):
    """(task, args, recipe, model config) from the command line, everything checked that can be without starting
    anything heavy; raises ValueError (and its kin) with the reason."""
    args = parse_args(task_type, argv)
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {args.max_steps}")
    task, recipe, model_cfg = resolve(task_type, args)
    check_resume_changes(args.output, recipe, args.allow_changes)
    require_versions()
    return task, args, recipe, model_cfg


def check_resume_changes(run_dir: str, recipe, allowed: bool) -> dict:
    """What differs between `recipe` and the one the run in `run_dir` was checkpointed with ({} for a new run);
    a change that would not continue the same run is refused unless `allowed`."""
    saved = Checkpointer.saved_meta(run_dir)
    if not saved or "recipe" not in saved:
        return {}
    changes = recipe_changes(saved["recipe"], recipe)
    breaking = {name: change for name, change in changes.items() if name not in CHANGEABLE_ON_RESUME}
    if breaking and not allowed:
        listed = ", ".join(f"{name} {before!r} -> {now!r}" for name, (before, now) in sorted(breaking.items()))
        raise ValueError(f"{run_dir} was checkpointed at step {saved['step']} with another recipe ({listed}): "
                         "resuming with these changes would not continue the same run. Drop them, start a new "
                         "--output, or pass --allow-changes to go on with them (the run then differs from one started "
                         "with them; the change is logged and its configuration kept in RUN_DIR/configs/)")
    return changes


def main(task_type: type[Task], argv=None) -> int:
    try:
        task, args, recipe, model_cfg = prepare(task_type, argv)
        run = Run(task, args, recipe, model_cfg)
    except (ValueError, TypeError, FileNotFoundError, VersionProblem, NotShared) as err:  # ConfigConflict too
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run.train()
