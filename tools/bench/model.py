"""Model and end-to-end measurements of tools/benchmark.py, set up once per contender process, timed round by round.

- model_step: one MAE training step (forward, backward, AdamW) at a size, batch and decoder_keep (the share of the
  masked tokens the decoder reconstructs); each round also measures this
  process's dense-matmul FLOP/s right before and right after the steps, so the MFU of a round is a ratio taken in
  one moment.
- model_parts: where the step's time goes: embedding and encoder, decoder, loss (targets included), backward,
  optimizer, each timed alone on the same batch.
- e2e: the real trainer (trainer/setup.py's set-up and its step loop) in this process; a round is some steps,
  with the share of their time spent waiting for data.
"""

import time

_KEEP_UNTIL_EXIT = []


def _device_and_dtype():
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 only where it is fast


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_batch(cfg: dict, size: str, batch: int, attn_impl: str, fused_adamw: bool = True,
                     decoder_keep: float = 1.0):
    import torch

    from models import build_pretrain_model

    device, dtype = _device_and_dtype()
    torch.manual_seed(0)
    model = build_pretrain_model(size, attn_impl=attn_impl, decoder_keep=decoder_keep,
                                 **cfg.get("model_options", {})).to(device)
    # fused as the trainer (trainer/engine.py); foreach, torch's default, for the before/after of that choice
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw, foreach=not fused_adamw)
    c = model.cfg
    videos = torch.randn(batch, 3, c.num_frames, c.img_size, c.img_size, device=device)
    return model, optimizer, videos, device, dtype


def model_step(cfg: dict, size: str, batch: int, attn_impl: str, mask_repeats: int, fused_adamw: bool = True,
               decoder_keep: float = 1.0):
    import torch

    from models import pretrain_macs, training_flops
    from trainer.device_peak import measured_matmul_peak

    model, optimizer, videos, device, dtype = _model_and_batch(cfg, size, batch, attn_impl, fused_adamw,
                                                               decoder_keep)
    flops_per_step = training_flops(pretrain_macs(model.cfg, 0.9, mask_repeats=mask_repeats)) * batch

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(videos, mask_ratio=0.9, mask_repeats=mask_repeats)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    warm = []

    def run_round() -> dict:
        if not warm:  # the first round warms up (a model stays warm through the pauses between rounds)
            step()
            warm.append(True)
        peak_before = measured_matmul_peak(device, dtype, seconds=0.25)
        start = time.perf_counter()
        for _ in range(cfg["model_steps"]):
            step()
        seconds = time.perf_counter() - start
        peak = (peak_before + measured_matmul_peak(device, dtype, seconds=0.25)) / 2
        achieved = flops_per_step * cfg["model_steps"] / seconds
        return {"seconds": seconds, "items": cfg["model_steps"] * batch, "achieved_flops": achieved,
                "peak_flops": peak, "mfu": achieved / peak}

    return run_round


def model_parts(cfg: dict, size: str, batch: int, attn_impl: str, mask_repeats: int):
    """Seconds of each part of a training step, the parts timed one after the other on one batch."""
    import torch

    model, optimizer, videos, device, dtype = _model_and_batch(cfg, size, batch, attn_impl)
    num_tokens, autocast = model.cfg.num_patches, torch.autocast(device.type, dtype=dtype,
                                                                enabled=dtype != torch.float32)

    def timed(seconds: dict, part: str, work):
        _sync(device)
        start = time.perf_counter()
        result = work()
        _sync(device)
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - start
        return result

    def step(seconds: dict) -> None:
        noise = torch.rand(batch * mask_repeats, num_tokens, device=device)
        with autocast:
            latent, mask, ids_restore = timed(seconds, "embed + encoder", lambda: model.forward_encoder(
                videos, 0.9, noise, mask_repeats))
            pred = timed(seconds, "decoder", lambda: model.forward_decoder(latent, ids_restore))
            loss = timed(seconds, "loss (targets included)", lambda: model.loss(videos, pred, mask, mask_repeats))
        timed(seconds, "backward", loss.backward)
        timed(seconds, "optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))

    warm = []

    def run_round() -> dict:
        if not warm:
            step({})
            warm.append(True)
        seconds = {}
        for _ in range(cfg["model_steps"]):
            step(seconds)
        return {"seconds": sum(seconds.values()), "items": cfg["model_steps"] * batch,
                "parts": {part: s / cfg["model_steps"] for part, s in seconds.items()}}  # per step

    return run_round


def e2e(cfg: dict, recipe: str, ds_config: str, steps: int, overrides: list, data: str | None = None,
        env: dict | None = None):
    """The trainer on the benchmark's shards (or `data`), in this process: a round is `steps` optimizer steps;
    `overrides`: the recipe's, key=value; `env`: variables set first (a store's endpoint and key, the node cache)."""
    import dataclasses
    import os
    import tempfile

    import numpy as np

    from trainer.cli import prepare
    from trainer.pretrain import Pretraining
    from trainer.setup import RunArgs, set_up
    from trainer.step_loop import StepLoop

    os.environ.update(env or {})
    run_dir = tempfile.mkdtemp(prefix="bench-e2e-")
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg["workers"]))
    task, args, model_cfg = prepare(Pretraining, [
        "--ds_config", ds_config, "--recipe", recipe, "--data", data or cfg["shards"], "--output", run_dir,
        f"split={cfg['split']}", *overrides])
    run = set_up(task, dataclasses.replace(RunArgs.from_command_line(args), measuring=True), model_cfg)
    loop, split = StepLoop(run), run.loader.members[0].shards
    _KEEP_UNTIL_EXIT.append(run)

    def run_round() -> dict:
        loop.run(run.step + 2)  # warm-up
        fetched = run.loader.store_figures().get("fetched_gb", 0.0)
        start, first = time.perf_counter(), run.step
        problem = loop.run(run.step + steps)
        if problem:
            raise RuntimeError(problem.message)
        seconds = time.perf_counter() - start
        rows = [r for r in run.monitor.history if r["step"] > first]
        clips = steps * run.plan.batch.clips_per_step
        return {"seconds": seconds, "items": clips, "mfu": float(np.median([r["mfu"] for r in rows])),
                "data_wait_share": float(np.median([r["data_wait_share"] for r in rows])),
                **({"store_fetched_per_epoch": (run.loader.store_figures()["fetched_gb"] - fetched) * 1e9 / clips
                    / (split.num_bytes / split.num_samples)} if run.loader.store_figures() else {})}

    return run_round
