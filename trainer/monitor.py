"""What a run shows while it trains (rank 0): a progress bar, TensorBoard scalars and pictures, metrics.jsonl, and the
guard that stops a run whose loss is NaN, infinite or exploding."""

import json
import math
import os
import resource
import time
from collections import deque

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# Dense bf16 tensor-core peak per GPU (vendor datasheets, no sparsity): the MFU denominator on CUDA.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                 "L4": 121e12, "A10": 125e12, "B200": 2250e12}


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of a large dense matmul on this device and dtype: the practical peak (used on CPUs)."""
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG (masks, resume) alone
    a = torch.randn(1024, 1024, device=device, dtype=dtype, generator=generator)
    b = torch.randn(1024, 1024, device=device, dtype=dtype, generator=generator)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * 1024**3 * count / (time.perf_counter() - start)


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name}: datasheet dense bf16"
        return measured_matmul_peak(device, dtype), f"{name}: measured matmul (not in the datasheet table)"
    return measured_matmul_peak(device, dtype), f"CPU: measured {dtype} matmul"


class LossGuard:
    """SlowFast's rule: stop on a non-finite loss, or one above `factor` x the mean of the previous 5 (no such
    check when factor is None)."""

    def __init__(self, factor: float | None = 2.0, window: int = 5):
        self.history, self.factor = deque(maxlen=window), factor

    def check(self, loss: float) -> str | None:
        """None if the loss is fine, else why it is not."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if self.factor and len(self.history) == self.history.maxlen:
            mean = sum(self.history) / len(self.history)
            if loss > self.factor * mean:
                return f"the loss jumped to {loss:.4f}, more than {self.factor:g}x the mean {mean:.4f} of the last " \
                       f"{len(self.history)} steps"
        self.history.append(loss)
        return None


class Monitor:
    def __init__(self, run_dir: str, enabled: bool, start_step: int, total_steps: int, clips_per_step: int,
                 world_size: int, flops_per_step: float, peak_flops: float):
        self.enabled, self.run_dir = enabled, run_dir
        self.clips_per_step, self.world_size = clips_per_step, world_size
        self.flops_per_step, self.peak = flops_per_step, peak_flops  # per device
        self.last_time, self.wait = time.perf_counter(), 0.0
        self.first_losses, self.last_losses = [], deque(maxlen=10)
        if not enabled:
            return
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step or None)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self._truncate_metrics(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_metrics(self, start_step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: drop what a killed run logged past it."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.metrics_path, "w") as f:
            f.writelines(kept)

    def data_wait(self, seconds: float) -> None:
        self.wait += seconds

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, skipped: int, log: bool) -> None:
        now = time.perf_counter()
        elapsed, wait = now - self.last_time, self.wait
        self.last_time, self.wait = now, 0.0
        if len(self.first_losses) < 10:
            self.first_losses.append(loss)
        self.last_losses.append(loss)
        if not self.enabled:
            return
        clips_per_s = self.clips_per_step / elapsed
        values = {"loss": loss, "lr": lr, "clips_per_s": clips_per_s, "clips_per_s_per_device": clips_per_s /
                  self.world_size, "data_wait_share": wait / elapsed, "mfu": self.flops_per_step / elapsed / self.peak,
                  "skipped_videos": skipped}
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        values["memory_gb"] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
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
