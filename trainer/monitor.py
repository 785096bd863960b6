"""What a run shows while it trains (rank 0): a progress bar, TensorBoard scalars and pictures, metrics.jsonl, and the
guard that stops a run whose loss is NaN, infinite or exploding."""

import json
import math
import os
import resource
from collections import deque

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class LossGuard:
    """SlowFast's rule: stop on a non-finite loss, or one above `factor` x the mean of the previous 5 (no such
    check when factor is None); and on a non-finite gradient norm (a step DeepSpeed took, or skipped, with NaN or
    inf gradients: the shipped bf16 configs leave DeepSpeed's own overflow check off). It watches from the first
    step, against the mean of the steps seen so far, and its memory of them is saved with each checkpoint, so a
    resumed run is watched from its first step too."""

    def __init__(self, factor: float | None = 2.0, window: int = 5):
        self.history, self.factor = deque(maxlen=window), factor

    def check(self, loss: float, grad_norm: float = 0.0) -> str | None:
        """None if the loss and the gradient norm are fine, else why they are not."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}"
        if self.factor and self.history:
            mean = sum(self.history) / len(self.history)
            if loss > self.factor * mean:
                return f"the loss jumped to {loss:.4f}, more than {self.factor:g}x the mean {mean:.4f} of the last " \
                       f"{len(self.history)} steps"
        self.history.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])


class Monitor:
    def __init__(self, run_dir: str, enabled: bool, start_step: int, total_steps: int, clips_per_step: int,
                 world_size: int, flops_per_step: float, peak_flops: float, views_per_clip: int = 1,
                 progress_bar: bool = True):
        self.enabled, self.run_dir = enabled, run_dir
        self.clips_per_step, self.world_size, self.views_per_clip = clips_per_step, world_size, views_per_clip
        self.history = deque(maxlen=1000)  # the last steps' values (tools/preflight.py summarises them)
        self.flops_per_step, self.peak = flops_per_step, peak_flops  # per device
        self.first_losses, self.last_losses = [], deque(maxlen=10)
        if not enabled:
            return
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step or None)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self._truncate_metrics(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not progress_bar)

    def _truncate_metrics(self, start_step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop what a killed run logged past it."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.metrics_path, "w") as f:
            f.writelines(kept)

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, skipped: int, log: bool,
             elapsed: float, wait: float) -> None:
        """One optimizer step's figures: it took `elapsed` seconds, `wait` of them waiting for the loader."""
        if len(self.first_losses) < 10:
            self.first_losses.append(loss)
        self.last_losses.append(loss)
        if not self.enabled:
            return
        clips_per_s = self.clips_per_step / elapsed
        values = {"loss": loss, "lr": lr, "clips_per_s": clips_per_s, "clips_per_s_per_device": clips_per_s /
                  self.world_size, "views_per_s_per_device": clips_per_s * self.views_per_clip / self.world_size,
                  "data_wait_share": wait / elapsed, "mfu": self.flops_per_step / elapsed / self.peak,
                  "skipped_videos": skipped}
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        values["memory_gb"] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
        self.history.append({"step": step, **values})
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if log:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_per_s:.1f}",
                             wait=f"{100 * wait / elapsed:.0f}%", refresh=False)
        self.bar.update(step - self.bar.n)

    def loss_summary(self) -> str:
        if not self.first_losses:
            return "no steps taken"
        first, last = self.first_losses, self.last_losses
        return f"loss {sum(first) / len(first):.4f} over this run's first {len(first)} steps -> " \
               f"{sum(last) / len(last):.4f} over its last {len(last)}"

    def scalars(self, group: str, values: dict, step: int) -> None:
        """TensorBoard scalars group/name (evaluations, probes) at `step`."""
        if self.enabled:
            for name, value in values.items():
                self.writer.add_scalar(f"{group}/{name}", value, step)

    def picture(self, step: int, grid: torch.Tensor, name: str = "reconstruction") -> str | None:
        """Log a [3, H, W] image in [0, 1] to TensorBoard and RUN_DIR/pictures/; returns the PNG's path."""
        if not self.enabled:
            return None
        from PIL import Image

        self.writer.add_image(name, grid, step)
        folder = os.path.join(self.run_dir, "pictures")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}_step{step:08d}.png")
        Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
        return path

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
