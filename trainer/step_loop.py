"""The step loop: optimizer steps from the loader's batches until a step number, each step's numbers accounted one
step late (the guard, the monitor, the hooks), checkpoints when due or asked for by a stop signal. Set up by
trainer/setup.py; run by trainer/run.py and by the tools that time steps (the preflight, the benchmark)."""

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dali_pipes.shard_store import StoreUnavailable
from trainer.cadence import due
from trainer.host_readback import HostReadback
from trainer.preemption import EXIT_PREEMPTED

log = logging.getLogger("trainer")
EXIT_GUARD, EXIT_STORE_UNAVAILABLE = 3, 4  # trainer/cli.py's exit codes


@dataclass(frozen=True)
class Stop:
    """Why the step loop ended before its last step: the process's exit code, what to say, and what to do."""

    code: int
    message: str = ""
    advice: str = ""


PREEMPTED = Stop(EXIT_PREEMPTED)  # a stop signal ended it, after its checkpoint


def store_stop(message: str) -> Stop:
    return Stop(EXIT_STORE_UNAVAILABLE, message, "start again when the store answers")


class StepNumbers(NamedTuple):
    """What an optimizer step reads back to the host, each summed over the ranks. A new one is a field here and a
    value where the loop makes them (`numbers_on_device`)."""

    loss: float  # each rank's mean over its micro-batches
    grad_norm: float  # each rank's copy of the global norm
    skipped: float  # undecodable videos replaced so far
    stop_requests: float  # ranks that got a stop signal
    store_failures: float  # ranks whose shard store stopped answering (they stepped on a placeholder batch)


def numbers_on_device(device: torch.device, **values) -> torch.Tensor:
    """The step's StepNumbers as one float32 device tensor in their fields' order: device scalars stay where they
    are, host numbers go over in one copy (from pinned memory on CUDA), nothing is read back."""
    host = [name for name in StepNumbers._fields if not torch.is_tensor(values[name])]
    copied = dict(zip(host, _to_device([float(values[name]) for name in host], device)))
    return torch.stack([copied[name] if name in copied else values[name].detach().float().reshape(())
                        for name in StepNumbers._fields])


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


class StepLoop:
    def __init__(self, parts):
        """parts: trainer/setup.py RunParts."""
        self.parts = parts
        self._stream = parts.loader.endless()
        self._store_before = {}  # store_figures() at the last epoch's end

    def run(self, stop_at: int) -> Stop | None:
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
        parts = self.parts
        engine, device, accumulation = parts.engine, parts.env.device, parts.plan.batch.accumulation
        log_every, epoch, pending = parts.task.recipe.run.log_every, parts.loader.epoch, None
        loss_sum = torch.zeros((), device=device)
        last_end, wait, store_failure = time.perf_counter(), 0.0, None
        while parts.step < stop_at:
            start = time.perf_counter()
            batch, store_failure = self._next_batch(store_failure)
            wait += time.perf_counter() - start
            loss, outputs = parts.task.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            if engine.global_steps == parts.step:  # inside a gradient accumulation
                continue
            parts.step = engine.global_steps
            numbers = numbers_on_device(device, loss=loss_sum / accumulation, grad_norm=_grad_norm(engine, device),
                                        skipped=parts.loader.skipped, stop_requests=parts.preemption.requested,
                                        store_failures=store_failure is not None)
            now = time.perf_counter()
            current = _Step(parts.step, HostReadback(numbers), engine.get_lr()[0], now - last_end, wait,
                            due(parts.step, log_every))
            last_end, wait = now, 0.0
            if any(hook.wants_outputs(parts.step) for hook in parts.hooks):
                current.batch, current.outputs = batch, outputs
            loss_sum.zero_()  # (numbers_on_device copied it)
            problem, stop = self._account(pending) if pending else (None, False)
            pending = current
            if problem:
                return problem
            if parts.loader.epoch != epoch:
                epoch = parts.loader.epoch
                self._report_store(epoch)
                for hook in parts.hooks:
                    hook.after_epoch(epoch, parts.step)
            if stop or parts.checkpointer.due(parts.step, stop_at):
                (problem, stopped), pending = self._account(pending), None  # never checkpoint a bad step
                if problem:
                    return problem
                parts.checkpointer.save(engine, parts.step, parts.stateful())
                if stop or stopped:  # a rank got a stop signal: every rank learns it at the same step
                    return PREEMPTED
        if pending:
            problem, stop = self._account(pending)
            if not problem and stop and parts.step < parts.plan.stop_at:
                parts.checkpointer.save(engine, parts.step, parts.stateful())
                return PREEMPTED
            return problem
        return None

    def _report_store(self, epoch: int) -> None:
        """A streamed split's window after an epoch: GB fetched in it (against the node's part), the reader's wait
        on the store, the window's fill; to the log and TensorBoard (data/...)."""
        figures = self.parts.loader.store_figures()
        if not figures:
            return
        epoch_figures = {**figures, "fetched_gb": figures["fetched_gb"] - self._store_before.get("fetched_gb", 0.0),
                         "store_wait_s": figures["store_wait_s"] - self._store_before.get("store_wait_s", 0.0)}
        self._store_before = figures
        self.parts.monitor.scalars("data", epoch_figures, self.parts.step)
        log.info("shard window, epoch %d: fetched %.3f GB, the reader waited %.1f s on the store; the window holds "
                 "%.3f GB", epoch - 1, epoch_figures["fetched_gb"], epoch_figures["store_wait_s"],
                 figures["window_fill_gb"])

    def _next_batch(self, store_failure: StoreUnavailable | None):
        """(the next batch, this rank's store failure or None). A rank whose store stopped answering (after the
        reader's retries) cannot leave the others waiting in the step's collectives: it steps on a placeholder
        batch, flagging the failure in the step's numbers, until every rank has read it and stops with exit code 4,
        no checkpoint written. Alone, it stops at once."""
        if store_failure is None:
            try:
                return next(self._stream), None
            except StoreUnavailable as err:
                if self.parts.env.world_size == 1:
                    raise
                log.error("%s; the other ranks learn it with this step's numbers", err)
                store_failure = err
        return self.parts.loader.placeholder_batch(), store_failure

    def _account(self, done: _Step) -> tuple[Stop | None, bool]:
        """The guard, the monitor and the hooks for a step whose numbers have reached the host: (why the run stops
        without a checkpoint, or None; whether some rank was told to stop)."""
        parts, world = self.parts, self.parts.env.world_size
        numbers = StepNumbers(*done.readback.result())
        if numbers.store_failures:
            return store_stop(f"the shard store stopped answering on {numbers.store_failures:.0f} rank(s) of "
                              f"{world} (step {done.step}: see that rank's log)"), False
        mean_loss, grad_norm = numbers.loss / world, numbers.grad_norm / world
        problem = parts.guard.check(mean_loss, grad_norm)
        if problem:
            return Stop(EXIT_GUARD, f"stopping at step {done.step}: {problem}",
                        "lower blr, or raise warmup_epochs, first"), False
        parts.monitor.step(done.step, mean_loss, done.lr, grad_norm if done.logged else None, int(numbers.skipped),
                           done.logged, done.elapsed, done.wait)
        for hook in parts.hooks:
            hook.after_step(done.step, done.batch, done.outputs)
        return None, numbers.stop_requests > 0


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
    return _to_device([0.0 if norm is None else norm], device).reshape(())  # (None: DeepSpeed computed none)
