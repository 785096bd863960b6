"""The training run both trainers share: distributed set-up, the global batch, resume, the step loop with its
progress bar, TensorBoard, loss guard, checkpoints and stop signals. A Task (pretrain.py, finetune.py) brings the
model, the loss and its hooks (pictures, validations); the command line is trainer/cli.py.

Set-up order, each step taking only what the steps before it produced:
  stop signals caught -> distributed processes -> run folder (shared by every rank?) -> the checkpoint to resume
  from (its global batch and schedule) -> ds_config and the global batch on this world -> memory plan (recompute or
  not) -> loader (its config from the recipe: trainer/data.py) -> model -> schedule -> resume plan (may switch the
  ds_config to DeepSpeed's universal format) -> engine -> resume (engine, loader, guard, RNGs) -> monitor -> hooks.
"""

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch

from dali_pipes import VideoLoader
from dali_pipes.shard_store import StoreUnavailable
from models.attention import cpu_has_native_bf16, describe_attention
from trainer.checkpointing import Checkpointer
from trainer.data import data_change, data_facts, loader_config, pixels_median
from trainer.device_peak import device_peak_flops
from trainer.ds_config import plan_batch, read_ds_config
from trainer.engine import build_engine, init_distributed
from trainer.host_readback import HostReadback
from trainer.memory_plan import device_capacity, plan_recompute
from trainer.monitor import LossGuard, Monitor
from trainer.preemption import EXIT_PREEMPTED, MARKER, PreemptionSignal
from trainer.recipes import as_saved, recipe_changes
from trainer.run_folder import check_shared

log = logging.getLogger("trainer")
EXIT_GUARD, EXIT_STORE_UNAVAILABLE = 3, 4  # trainer/cli.py's exit codes


@dataclass(frozen=True)
class Stop:
    """Why the step loop ended before its last step: the process's exit code, what to say, and what to do."""

    code: int
    message: str = ""
    advice: str = ""


PREEMPTED = Stop(EXIT_PREEMPTED)  # a stop signal ended it, after its checkpoint


class StepNumbers(NamedTuple):
    """What an optimizer step reads back to the host, each summed over the ranks."""

    loss: float  # each rank's mean over its micro-batches
    grad_norm: float  # each rank's copy of the global norm
    skipped: float  # undecodable videos replaced so far
    stop_requests: float  # ranks that got a stop signal
    store_failures: float  # ranks whose shard store stopped answering (they stepped on a placeholder batch)


@dataclass(frozen=True)
class Schedule:
    """The run's length in optimizer steps, fixed when it starts (a resumed run keeps it)."""

    total_steps: int
    warmup_steps: float
    steps_per_epoch: float


@dataclass
class _Step:
    """An optimizer step whose numbers are still on their way to the host (accounted for one step later)."""

    step: int
    readback: HostReadback  # of its StepNumbers
    lr: float
    elapsed: float  # seconds since the previous step ended
    wait: float  # of them, waiting for the loader
    logged: bool  # a log_every step: TensorBoard scalars
    batch: dict | None = None  # kept only when a hook wants them
    outputs: object = None


class Run:
    """Everything a step loop needs, set up from the command line in the order the module docstring gives."""

    def __init__(self, task, args, model_cfg, quiet: bool = False):
        """quiet: warnings only, no progress bar (for tools that run a few steps, like the preflight)."""
        recipe = task.recipe
        self.task, self.args = task, args
        self.preemption = PreemptionSignal()  # from the start: a signal during set-up stops at the first step
        self.env = init_distributed()
        self.run_dir = args.output
        os.makedirs(self.run_dir, exist_ok=True)
        _setup_logging(self.run_dir, self.env.is_main and not quiet)
        check_shared(self.run_dir, self.env.rank, self.env.world_size)
        self._forget_stop_signal()
        self.checkpointer = Checkpointer(self.run_dir, self.env, recipe.run.keep_checkpoints,
                                         recipe.run.checkpoint_every)
        saved = self.checkpointer.saved_run()  # what the checkpoint to resume from says about its run (or None)
        ds_config = read_ds_config(args.ds_config, recipe)
        # the global batch: the recipe's, else the one the run was started with (kept on another number of processes)
        self.batch = plan_batch(recipe.optim.batch_size or (saved or {}).get("clips_per_step"),
                                ds_config.micro_batch, self.env.world_size, ds_config.accumulation)
        self.lr = recipe.optim.blr * self.batch.clips_per_step / 256
        self.dtype = ds_config.dtype
        if ds_config.bf16 and self.env.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("bf16 on a CPU without AVX512-BF16/AMX runs matmuls ~100x slower than fp32 (measured 1 vs "
                        "166 GFLOP/s): ds_configs/cpu.json trains in fp32")
        pixels = pixels_median(args.data, recipe.loading)
        model_cfg, self.memory_note = plan_recompute(model_cfg, recipe, ds_config, self.batch, task.views_per_clip(),
                                                     device_capacity(self.env.device), pixels)
        _seed_everything(recipe.run.seed + self.env.rank)

        self.loader = VideoLoader(loader_config(recipe, args.data, self.env, self.batch.micro_batch, self.dtype))
        self.model = task.build_model(model_cfg)
        self.schedule = self._schedule(saved)
        data = data_facts(args.data, recipe.loading)
        self.checkpointer.run_facts = {"clips_per_step": self.batch.clips_per_step, "micro_batch":
                                       self.batch.micro_batch, "accumulation": self.batch.accumulation,
                                       "total_steps": self.schedule.total_steps,
                                       "warmup_steps": self.schedule.warmup_steps, "recipe": as_saved(recipe),
                                       "data": data}
        self.new_data = data_change((saved or {}).get("data"), data)  # (allowed by --allow-changes: trainer/cli.py)
        resume = self.checkpointer.resume_plan()
        self.ds_config = ds_config.for_deepspeed(recipe, self.batch)
        if resume:
            self.ds_config = resume.adjust(self.ds_config)
        self.engine = build_engine(self.model, recipe.optim, self.ds_config, self.lr, self.schedule.total_steps,
                                   self.schedule.warmup_steps, task.lr_scale_of(self.model), recipe.run.compile)
        self.guard = LossGuard(recipe.run.explosion_factor)
        if resume and self.new_data and self.env.is_main:
            log.warning("resuming on other data (--allow-changes): %s. The model, optimizer and schedule go on from the "
                        "checkpoint; the loader reads the new data from its beginning (epoch 0, a fresh order)",
                        self.new_data)
        stateful = {name: c for name, c in self._stateful().items() if not (self.new_data and name == "loader")}
        self.step = self.checkpointer.resume(self.engine, resume, stateful) if resume else 0  # and RNGs
        if resume:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume.tag, self.step, self.loader.epoch,
                     self.loader.cursor.position)
        self.stop_at = min(self.schedule.total_steps, args.max_steps or self.schedule.total_steps)
        peak, peak_source = device_peak_flops(self.env.device, self.dtype)
        flops = task.flops_per_clip(model_cfg) * self.batch.micro_batch * self.batch.accumulation
        self.monitor = Monitor(self.run_dir, self.env.is_main, self.step, self.stop_at, self.batch.clips_per_step,
                               self.env.world_size, flops, peak, views_per_clip=task.views_per_clip(),
                               progress_bar=not quiet)
        self.hooks = task.hooks(self.engine, self.loader.config, self.monitor, self.stop_at)
        self._stream = _endless(self.loader)
        self._describe(peak, peak_source)

    def _forget_stop_signal(self) -> None:
        """A new start: the marker a stop signal left for the requeue script has served."""
        marker = os.path.join(self.run_dir, MARKER)
        if self.env.is_main and os.path.exists(marker):
            with open(marker) as f:
                log.info("starting again after a stop signal at step %d", json.load(f)["step"])
            os.remove(marker)

    def _schedule(self, saved: dict | None) -> Schedule:
        """The schedule the run began with, when it resumes with the same length (a step means the same thing, on
        any number of processes); else from the recipe's epochs. Says what changed on another layout of ranks."""
        optim, steps_per_epoch = self.task.recipe.optim, len(self.loader) / self.batch.accumulation
        changes = recipe_changes(saved["recipe"], self.task.recipe) if saved and "recipe" in saved else {}
        if changes and self.env.is_main:
            log.warning("resuming with recipe changes (logged in RUN_DIR/configs/): %s", ", ".join(
                f"{name} {before!r} -> {now!r}" for name, (before, now) in sorted(changes.items())))
        if saved and "total_steps" in saved and not {"optim.epochs", "optim.warmup_epochs",
                                                      "optim.batch_size"} & set(changes):
            schedule = Schedule(saved["total_steps"], saved["warmup_steps"], steps_per_epoch)
        else:
            schedule = Schedule(max(1, math.ceil(optim.epochs * steps_per_epoch)),
                                optim.warmup_epochs * steps_per_epoch, steps_per_epoch)
        before = saved and (saved.get("world_size"), saved.get("micro_batch"), saved.get("accumulation"))
        now = (self.env.world_size, self.batch.micro_batch, self.batch.accumulation)
        if before and before[1] is not None and before != now and self.env.is_main:
            log.warning("resuming a run of %d process(es) x %d clips x %d accumulation on %d x %d x %d: the same %d "
                        "clips per optimizer step, lr and schedule (%d steps); the loader goes on with the epoch in a "
                        "fresh order", *before, *now, self.batch.clips_per_step, schedule.total_steps)
        return schedule

    def _describe(self, peak: float, peak_source: str) -> None:
        """Print and save the resolved configuration: RUN_DIR/config.json (this start's), and one file per start in
        RUN_DIR/configs/ (their history: what a resumed run was started with each time)."""
        resolved = {"recipe_name": self.args.recipe, "started_at_step": self.step, "command_line": sys.argv,
                    "recipe": asdict(self.task.recipe), "ds_config": self.ds_config, "data": self.args.data,
                    "world_size": self.env.world_size, "launcher": self.env.launcher, "device": str(self.env.device),
                    "dtype": str(self.dtype), "clips_per_step": self.batch.clips_per_step,
                    "micro_batch": self.batch.micro_batch, "accumulation": self.batch.accumulation, "lr": self.lr,
                    **asdict(self.schedule), "stop_at": self.stop_at, "model": asdict(self.model.cfg),
                    "loader_decoder": self.loader.route.name, "memory": self.memory_note, "peak_flops": peak}
        if not self.env.is_main:
            return
        history = os.path.join(self.run_dir, "configs")
        os.makedirs(history, exist_ok=True)
        start = sum(name.startswith("start") for name in os.listdir(history)) + 1
        for path in (os.path.join(self.run_dir, "config.json"), os.path.join(history, f"start{start:03d}.json")):
            with open(path, "w") as f:
                json.dump(resolved, f, indent=1, default=str)
        log.info("resolved configuration (saved to %s):\n%s", os.path.join(self.run_dir, "config.json"),
                 json.dumps(resolved, indent=1, default=str))
        log.info("%s (started by %s); lr %.3g; %d steps (%.1f per epoch); starting at step %d", self.batch.describe(),
                 self.env.launcher, self.lr, self.schedule.total_steps, self.schedule.steps_per_epoch, self.step)
        log.info("memory: %s", self.memory_note)
        log.info("%s; MFU against %.3g FLOP/s (%s)", describe_attention(self.model.cfg, self.env.device, self.dtype),
                 peak, peak_source)

    def train(self) -> int:
        """Train to the end (or --max-steps), checkpoint, export, finish; returns the process exit code."""
        trains = self.task.trains
        try:
            stopped = self.run_steps(self.stop_at) if trains else None
        except StoreUnavailable as err:  # one process: the checkpoints stay as they are, a restart resumes
            stopped = _store_stop(str(err))
        if stopped == PREEMPTED:
            return self._preempted()
        if stopped:
            return self._stop(stopped)
        tag = self.checkpointer.latest()
        if trains and tag != f"step{self.step:08d}":
            tag = self.checkpointer.save(self.engine, self.step, self._stateful())  # (a finished run has nothing new)
        lines = self.task.finish(self.step)
        if trains and tag and self.env.is_main:
            export = os.path.join(self.run_dir, "export", self.task.export_name)
            os.makedirs(os.path.dirname(export), exist_ok=True)
            self.checkpointer.export_mae_st(tag, export, epoch=self.step / self.schedule.steps_per_epoch)
            lines.append(f"  fp32 weights, mae_st format: {export} (as --pretrained, or convert it: "
                         "tools/convert_checkpoint.py)")
        for hook in self.hooks:
            lines += hook.summary()
        self.close()
        if self.env.is_main:
            head = [f"done: {self.step} steps in {self.run_dir}; {self.monitor.loss_summary()}",
                    f"  TensorBoard: tensorboard --logdir {os.path.join(self.run_dir, 'tensorboard')}"]
            if tag:
                head.insert(1, f"  checkpoint: {os.path.join(self.checkpointer.dir, tag)} (resumes from here)")
            print("\n".join(head + lines), flush=True)
        return 0

    def run_steps(self, stop_at: int) -> Stop | None:
        """Optimizer steps until `stop_at`; returns None, PREEMPTED after the checkpoint a stop signal asked for, or
        why the run stopped without a checkpoint (the loss guard; a shard store that stopped answering on a rank).

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
        - a checkpoint, an evaluation and a picture read their tensors, when they are due.
        - ZeRO's gradient reduction is a collective each optimizer step: it is the step."""
        device, log_every, epoch, pending = self.env.device, self.task.recipe.run.log_every, self.loader.epoch, None
        loss_sum = torch.zeros((), device=device)
        last_end, wait, store_failure = time.perf_counter(), 0.0, None
        while self.step < stop_at:
            start = time.perf_counter()
            batch, store_failure = self._next_batch(store_failure)
            wait += time.perf_counter() - start
            loss, outputs = self.task.loss(self.engine, batch)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().float()
            if self.engine.global_steps == self.step:  # inside a gradient accumulation
                continue
            self.step = self.engine.global_steps
            counters = _to_device([float(self.loader.skipped), float(self.preemption.requested),
                                   float(store_failure is not None)], device)
            values = torch.cat([(loss_sum / self.batch.accumulation).view(1), _grad_norm(self.engine, device).view(1),
                                counters])
            now = time.perf_counter()
            current = _Step(self.step, HostReadback(values), self.engine.get_lr()[0], now - last_end, wait,
                            _due(self.step, log_every))
            last_end, wait = now, 0.0
            if any(hook.wants_outputs(self.step) for hook in self.hooks):
                current.batch, current.outputs = batch, outputs
            loss_sum.zero_()  # (the cat above copied it)
            problem, stop = self._account(pending) if pending else (None, False)
            pending = current
            if problem:
                return problem
            if self.loader.epoch != epoch:
                epoch = self.loader.epoch
                for hook in self.hooks:
                    hook.after_epoch(epoch, self.step)
            if stop or self.checkpointer.due(self.step, stop_at):
                (problem, stopped), pending = self._account(pending), None  # never checkpoint a bad step
                if problem:
                    return problem
                self.checkpointer.save(self.engine, self.step, self._stateful())
                if stop or stopped:  # a rank got a stop signal: every rank learns it at the same step
                    return PREEMPTED
        if pending:
            problem, stop = self._account(pending)
            if not problem and stop and self.step < self.stop_at:
                self.checkpointer.save(self.engine, self.step, self._stateful())
                return PREEMPTED
            return problem
        return None

    def _next_batch(self, store_failure: StoreUnavailable | None):
        """(the next batch, this rank's store failure or None). A rank whose store stopped answering (after the
        reader's retries) cannot leave the others waiting in the step's collectives: it steps on a placeholder
        batch, flagging the failure in the step's numbers, until every rank has read it and stops with exit code 4,
        no checkpoint written. Alone, it stops at once."""
        if store_failure is None:
            try:
                return next(self._stream), None
            except StoreUnavailable as err:
                if self.env.world_size == 1:
                    raise
                log.error("%s; the other ranks learn it with this step's numbers", err)
                store_failure = err
        return self.loader.placeholder_batch(), store_failure

    def _account(self, done: _Step) -> tuple[Stop | None, bool]:
        """The guard, the monitor and the hooks for a step whose numbers have reached the host: (why the run stops
        without a checkpoint, or None; whether some rank was told to stop)."""
        numbers = StepNumbers(*done.readback.result())
        if numbers.store_failures:
            return _store_stop(f"the shard store stopped answering on {numbers.store_failures:.0f} rank(s) of "
                               f"{self.env.world_size} (step {done.step}: see that rank's log)"), False
        mean_loss, grad_norm = numbers.loss / self.env.world_size, numbers.grad_norm / self.env.world_size
        problem = self.guard.check(mean_loss, grad_norm)
        if problem:
            return Stop(EXIT_GUARD, f"stopping at step {done.step}: {problem}",
                        "lower blr, or raise warmup_epochs, first"), False
        self.monitor.step(done.step, mean_loss, done.lr, grad_norm if done.logged else None, int(numbers.skipped),
                          done.logged, done.elapsed, done.wait)
        for hook in self.hooks:
            hook.after_step(done.step, done.batch, done.outputs)
        return None, numbers.stop_requests > 0

    def _stateful(self) -> dict:
        """What a checkpoint saves besides the engine and the RNGs: where the loader stands, what the guard saw."""
        return {"loader": self.loader, "guard": self.guard}

    def close(self) -> None:
        self.monitor.close()
        self.loader.close()
        self.preemption.restore()

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

    def _stop(self, stopped: Stop) -> int:
        latest = self.checkpointer.latest()
        where = f"the last good checkpoint is {os.path.join(self.checkpointer.dir, latest)}" if latest \
            else "no checkpoint was written yet"
        message = (f"{stopped.message}. Nothing after the last checkpoint is saved; {where} "
                   f"(a restart resumes from it: {stopped.advice})")
        if self.env.is_main:
            log.error(message)
        self.close()
        return stopped.code


def _store_stop(message: str) -> Stop:
    return Stop(EXIT_STORE_UNAVAILABLE, message, "start again when the store answers")


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
