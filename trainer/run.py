"""A training run from its set-up (trainer/setup.py) to its end: the hooks' first and last calls, the step loop
(trainer/step_loop.py), the final checkpoint and exports, the closing summary, and the exit code of a run stopped
early (a stop signal: 75 after its checkpoint; the loss guard: 3; a shard store that stopped answering: 4)."""

import json
import logging
import os
import time

from dali_pipes.shard_store import StoreUnavailable
from trainer.preemption import EXIT_PREEMPTED, MARKER
from trainer.step_loop import PREEMPTED, Stop, StepLoop, store_stop

log = logging.getLogger("trainer")


class Run:
    def __init__(self, parts):
        """parts: trainer/setup.py RunParts."""
        self.parts = parts

    def train(self) -> int:
        """Train to the end (or --max-steps), checkpoint, export, finish; returns the process exit code."""
        parts = self.parts
        trains = parts.task.trains
        for hook in parts.hooks:
            hook.begin(parts.step)
        try:
            stopped = StepLoop(parts).run(parts.plan.stop_at) if trains else None
        except StoreUnavailable as err:  # one process: the checkpoints stay as they are, a restart resumes
            stopped = store_stop(str(err))
        if stopped == PREEMPTED:
            return self._preempted()
        if stopped:
            return self._stop(stopped)
        tag = parts.checkpointer.latest()
        if trains and tag != f"step{parts.step:08d}":
            tag = parts.checkpointer.save(parts.engine, parts.step, parts.stateful())  # (a finished run: nothing new)
        for hook in parts.hooks:
            hook.end(parts.step)
        lines = parts.task.finish(parts.step)
        if trains and tag and parts.env.is_main:
            lines += self._export(tag)
        for hook in parts.hooks:
            lines += hook.summary()
        parts.close()
        if parts.env.is_main:
            run_dir = parts.args.output
            head = [f"done: {parts.step} steps in {run_dir}; {parts.monitor.loss_summary()}",
                    f"  TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}"]
            if tag:
                head.insert(1, f"  checkpoint: {os.path.join(parts.checkpointer.dir, tag)} (resumes from here)")
            print("\n".join(head + lines), flush=True)
        return 0

    def _export(self, tag: str) -> list[str]:
        parts = self.parts
        mae_st, opened = parts.checkpointer.export(tag, os.path.join(parts.args.output, "export"),
                                                   parts.task.export_name, parts.model,
                                                   epoch=parts.step / parts.plan.schedule.steps_per_epoch)
        return [f"  fp32 weights, mae_st format: {mae_st} (as --pretrained, or convert it: tools/convert_checkpoint.py)",
                f"  the same as safetensors + config.json: {opened} (models.from_pretrained opens it)"]

    def _preempted(self) -> int:
        """After the checkpoint a stop signal asked for: say so, leave the marker for requeue scripts, exit 75."""
        parts = self.parts
        tag, received = parts.checkpointer.latest(), parts.preemption.received
        if parts.env.is_main:
            with open(os.path.join(parts.args.output, MARKER), "w") as f:
                json.dump({"step": parts.step, "checkpoint": tag, "signal": received or "another rank's",
                           "time": time.time()}, f)
            log.warning("stopped by %s at step %d: checkpoint %s written; exiting with %d. The same command resumes "
                        "from it (a requeued job does)", received or "another rank's signal", parts.step,
                        os.path.join(parts.checkpointer.dir, tag), EXIT_PREEMPTED)
        parts.close()
        return EXIT_PREEMPTED

    def _stop(self, stopped: Stop) -> int:
        parts = self.parts
        latest = parts.checkpointer.latest()
        where = f"the last good checkpoint is {os.path.join(parts.checkpointer.dir, latest)}" if latest \
            else "no checkpoint was written yet"
        message = (f"{stopped.message}. Nothing after the last checkpoint is saved; {where} "
                   f"(a restart resumes from it: {stopped.advice})")
        if parts.env.is_main:
            log.error(message)
        parts.close()
        return stopped.code
