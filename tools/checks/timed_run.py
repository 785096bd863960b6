"""The preflight's last check: a short run of the real trainer on the real shards, timed (clips/s and views/s per GPU,
MFU, the share of time waiting for data, and the loader alone), beside the GPU projection."""

import dataclasses
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from tools.bench.gpu_projection import accelerator_for, projection
from tools.checks.report import FAIL, NO_GPU, PASS, SKIP, WARN, Check


def loader_rate(loader, batches: int, warmup: int = 2) -> float:
    """Clips/s of the loader alone (what its decoders deliver when nothing else runs)."""
    stream = loader.endless()
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    if batch["video"].is_cuda:
        torch.cuda.synchronize(batch["video"].device)
    return batches * loader.config.batch_size / (time.perf_counter() - start)


def check_timed_run(task, run_args, model_cfg, env, steps: int, batch, dtype: torch.dtype) -> Check:
    """`steps` optimizer steps of the real recipe from the real shards, through the trainer's own set-up and step
    loop (trainer/setup.py, measuring: its checkpoints, pictures, logs, validations and probes off)."""
    from trainer.device_peak import measured_matmul_peak
    from trainer.setup import set_up
    from trainer.step_loop import StepLoop

    recipe = task.recipe
    out = os.path.join(run_args.output, "preflight_run")
    if env.device.type != "cuda":  # would the recipe's model finish in a couple of minutes on this CPU?
        clips = steps * batch.micro_batch * batch.accumulation
        flops = task.flops_per_clip(model_cfg) * clips
        seconds = flops / (0.5 * measured_matmul_peak(env.device, dtype, seconds=0.2))
        if seconds > 120:
            return Check("timed run", SKIP, f"{NO_GPU}: {steps} steps of {recipe.model.name} in {dtype} would take "
                         f"~{seconds / 60:.0f} min on this CPU (a CPU can time the demo recipe: --recipe tiny_PT "
                         "--ds_config ds_configs/cpu.json)")
    if env.is_main:
        shutil.rmtree(out, ignore_errors=True)
    if env.world_size > 1:
        dist.barrier()
    run = set_up(task, dataclasses.replace(run_args, output=out, max_steps=None, measuring=True), model_cfg)
    try:
        alone = loader_rate(run.loader, batches=max(4, steps // 2))
        problem = StepLoop(run).run(run.step + steps)
    finally:
        run.close()
    if env.world_size > 1:
        dist.barrier()
    if env.is_main:
        shutil.rmtree(out, ignore_errors=True)
    if problem:
        return Check("timed run", FAIL, problem.message, problem.advice)
    rows = list(run.monitor.history)[len(run.monitor.history) // 2:]  # the second half: warm
    if not rows:
        return Check("timed run", PASS, f"{steps} steps ran (figures on rank 0)")

    def median(key):
        return float(np.median([r[key] for r in rows]))

    figures = {"steps": steps, "clips_per_s_per_gpu": median("clips_per_s_per_device"),
               "views_per_s_per_gpu": median("views_per_s_per_device"), "mfu": median("mfu"),
               "data_wait_share": median("data_wait_share"), "loader_alone_clips_per_s": alone,
               "decoder": run.loader.route.name}
    summary = (f"measured over {steps} steps: {figures['clips_per_s_per_gpu']:.1f} clips/s per "
               f"{'GPU' if env.device.type == 'cuda' else 'process'} ({figures['views_per_s_per_gpu']:.1f} views/s), "
               f"MFU {100 * figures['mfu']:.1f}%, waiting for data {100 * figures['data_wait_share']:.0f}% of the "
               f"time; the loader alone ({run.loader.route.name}) {alone:.1f} clips/s")
    accelerator = accelerator_for(env.device)
    if accelerator and recipe.model.name in ("vit_b", "vit_l", "vit_h"):  # (a GPU of the table: its own SKU)
        p = projection(accelerator, 0.4, repeats=recipe.views.repeats, crop_size=recipe.views.crop_size)
        row = next(r for r in p["rows"] if r["model"] == recipe.model.name)
        figures["projected"] = {"accelerator": accelerator, "views_per_s": row["views_per_s"], "assumed_mfu": 0.4}
        summary += f"; projected for one {accelerator} at 40% MFU: {row['views_per_s']} views/s"
    if figures["data_wait_share"] > 0.1:
        return Check("timed run", WARN, summary + " (the loader limits)",
                     "more decoding pipelines (decode_pipelines=...), num_threads=..., or shards with a shorter "
                     "keyframe interval and a 256 px short side", figures)
    return Check("timed run", PASS, summary, figures=figures)
