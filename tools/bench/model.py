"""Model and end-to-end measurements for tools/benchmark.py.

model: one MAE training step (forward, backward, AdamW) at a size and batch, timed like the loaders, with the same
process's dense-matmul FLOP/s as the practical peak, so MFU is a ratio measured in one run.
e2e: the real trainer (trainer/pretrain.py) for some steps; its metrics.jsonl gives step rate, data wait and MFU.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

from tools.bench.loaders import time_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure_model_step(cfg: dict, size: str, batch: int, attn_impl: str, mask_repeats: int) -> dict:
    import torch

    from models import build_pretrain_model, pretrain_macs
    from trainer.device_peak import measured_matmul_peak

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 only where it is fast
    torch.manual_seed(0)
    model = build_pretrain_model(size, attn_impl=attn_impl, **cfg.get("model_options", {})).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    c = model.cfg
    videos = torch.randn(batch, 3, c.num_frames, c.img_size, c.img_size, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(videos, mask_ratio=0.9, mask_repeats=mask_repeats)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds = time_calls(step, cfg["model_steps"], 1, cfg["reps"])
    flops_per_step = 6 * pretrain_macs(c, 0.9, mask_repeats=mask_repeats) * batch
    peak = measured_matmul_peak(device, dtype, seconds=1.0)
    achieved = flops_per_step * cfg["model_steps"] / statistics.median(seconds)
    return {"seconds": seconds, "items": cfg["model_steps"] * batch, "achieved_flops": achieved,
            "peak_flops": peak, "mfu": achieved / peak, "attention": attn_impl}


def measure_e2e(cfg: dict, recipe: str, ds_config: str, steps: int) -> dict:
    """The trainer, one process, for `steps` steps on the benchmark's shards; the first fifth is warm-up."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, os.path.join(ROOT, "trainer", "pretrain.py"), "--ds_config", ds_config,
                   "--recipe", recipe, "--data", cfg["shards"], "--output", run_dir, "--max-steps", str(steps),
                   f"checkpoint_every={10 * steps}", f"image_every={10 * steps}", f"split={cfg['split']}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"the trainer failed: {result.stderr[-1500:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f][steps // 5:]
        with open(os.path.join(run_dir, "config.json")) as f:
            clips_per_step = json.load(f)["clips_per_step"]
    return {"seconds": [clips_per_step / r["clips_per_s"] for r in rows], "items": clips_per_step,
            "data_wait_share": statistics.median(r["data_wait_share"] for r in rows),
            "mfu": statistics.median(r["mfu"] for r in rows)}
