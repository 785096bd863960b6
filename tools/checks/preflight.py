"""The checks of tools/preflight.py. Each returns a Check; none raises (a failure is a FAIL with its fix), and the
ones that are collectives (shared folder, all-reduce, timed run) run on every rank in the same order."""

import io
import os
import shutil
import subprocess
import time
from argparse import Namespace
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from dali_pipes.decoders.nvdec import unsupported_formats
from dali_pipes.shard_format import CPU_DECODABLE, RECOMMENDED_SHORT_SIDE, read_manifest
from tools.bench.gpu_projection import ACCELERATORS, nvdec_clips_per_s, projection

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
NO_GPU = "skipped (no GPU)"


@dataclass
class Check:
    name: str
    status: str
    summary: str
    fix: str = ""
    figures: dict = field(default_factory=dict)


def guarded(name: str, function, *args, **kwargs) -> Check:
    """function(...) as a Check; an exception becomes a FAIL that quotes it."""
    try:
        return function(*args, **kwargs)
    except Exception as err:  # a check must report, never end the preflight
        first = (str(err).strip().splitlines() or [""])[0][:400]
        return Check(name, FAIL, f"{type(err).__name__}: {first}",
                     "see the message; rerun this check alone with the trainer to get the whole traceback")


# --- environment ----------------------------------------------------------------------------------------------------


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_versions() -> Check:
    from nvidia.dali import backend

    from trainer.versions import installed_version, version_problems

    versions = {p: installed_version(p) for p in ("torch", "nvidia-dali", "deepspeed")}
    versions["cuda_runtime"] = torch.version.cuda
    versions["driver"] = driver_version() if torch.cuda.is_available() else None
    problems = version_problems()
    schema = backend.TryGetSchema("decoders__Video")
    if schema is None or not (schema.HasArgument("frames") and schema.HasArgument("pad_mode")):
        problems.append("DALI's fn.decoders.video lacks per-sample `frames` / `pad_mode` (DALI >= 1.48 has them)")
    summary = (f"torch {versions['torch']}, DALI {versions['nvidia-dali']}, DeepSpeed {versions['deepspeed']}; "
               f"CUDA runtime {versions['cuda_runtime'] or 'none'}, driver {versions['driver'] or 'none'}")
    if problems:
        return Check("versions", FAIL, summary + ": " + "; ".join(problems),
                     "pip install -e . (or make) installs the floors; in an NGC container upgrade its DALI: "
                     "pip install -U nvidia-dali-cuda120", versions)
    return Check("versions", PASS, summary, figures=versions)


def check_shared_folder(run_dir: str, rank: int, world_size: int) -> Check:
    from trainer.run_folder import NotShared, check_shared

    try:
        check_shared(run_dir, rank, world_size)
    except NotShared as err:
        lines = str(err).splitlines()
        return Check("shared folder", FAIL, " ".join(lines[:-1])[:600], lines[-1])
    return Check("shared folder", PASS, f"all {world_size} rank(s) see each other's files in {run_dir}")


def check_all_reduce(device: torch.device, world_size: int, megabytes: int | None = None) -> Check:
    """Bus bandwidth of an all-reduce over every rank: 2 (n-1)/n x bytes / time (NCCL's own definition)."""
    if world_size == 1:
        return Check("all-reduce", SKIP, "one process: nothing to reduce")
    megabytes = megabytes or (256 if device.type == "cuda" else 16)
    tensor = torch.ones(megabytes * 2**20 // 4, device=device)
    for _ in range(2):
        dist.all_reduce(tensor)
    rounds = 5
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(rounds):
        dist.all_reduce(tensor)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / rounds
    bus = 2 * (world_size - 1) / world_size * tensor.numel() * 4 / seconds / 1e9
    backend = dist.get_backend()
    figures = {"bus_gb_per_s": round(bus, 2), "megabytes": megabytes, "backend": backend, "ranks": world_size}
    summary = f"{backend}, {world_size} ranks, {megabytes} MB: bus bandwidth {bus:.1f} GB/s"
    if device.type == "cuda" and bus < 5:
        return Check("all-reduce", WARN, summary + " (NVLink gives 100+, InfiniBand 10-50)",
                     "NCCL may have fallen back to TCP sockets: run with NCCL_DEBUG=INFO and check the transport "
                     "(NCCL_IB_HCA, NCCL_SOCKET_IFNAME)", figures)
    return Check("all-reduce", PASS, summary, figures=figures)


# --- decoding -------------------------------------------------------------------------------------------------------


def indexed_clip(codec: str, frames: int = 24, width: int = 128, height: int = 96) -> bytes:
    """A small clip made in memory whose frames show their own index as 8 black/white blocks in the top rows."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4" if codec != "libvpx-vp9" else "webm") as out:
        stream = out.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 8
        for t in range(frames):
            image = np.full((height, width, 3), 128, np.uint8)
            for bit in range(8):
                image[:16, bit * 16:(bit + 1) * 16] = 255 if (t >> bit) & 1 else 0
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def read_indices(frames: np.ndarray) -> list[int]:
    return [sum(1 << bit for bit in range(8) if frame[8, bit * 16 + 8].mean() > 128) for frame in frames]


def decode_probe(decoder: str, device_id) -> list[int]:
    """Frames 0, 9 and 23 of a test clip through `decoder`; returns the indices read back from the pixels."""
    from nvidia.dali import fn, pipeline_def, types

    wanted = np.array([0, 9, 23], np.int32)
    codec = "libvpx-vp9" if decoder == "dali-cpu" else "libx264"
    data = np.frombuffer(indexed_clip(codec), np.uint8)
    if decoder == "pyav":
        from dali_pipes.decoders.pyav import decode_frames

        return read_indices(decode_frames(data, wanted))

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def probe():
        encoded = fn.external_source(name="data", dtype=types.UINT8)
        frames = fn.external_source(name="frames", dtype=types.INT32)
        return fn.decoders.video(encoded, device="mixed" if decoder == "dali-gpu" else "cpu", frames=frames,
                                 pad_mode="edge")

    pipe = probe()
    pipe.build()
    pipe.feed_input("data", [data])
    pipe.feed_input("frames", [wanted])
    (video,) = pipe.run()
    out = video.as_cpu() if decoder == "dali-gpu" else video
    return read_indices(np.array(out[0]))


def check_nvdec(device: torch.device) -> Check:
    from dali_pipes.dali_errors import NVDEC_HELP, first_meaningful_line, nvdec_missing

    if device.type != "cuda":
        return Check("NVDEC", SKIP, NO_GPU)
    try:
        got = decode_probe("dali-gpu", device.index or 0)
    except RuntimeError as err:
        if nvdec_missing(err):
            return Check("NVDEC", FAIL, first_meaningful_line(err), NVDEC_HELP)
        return Check("NVDEC", FAIL, first_meaningful_line(err),
                     "decoder=pyav decodes on the CPU meanwhile; report DALI's message with the GPU and driver")
    if got != [0, 9, 23]:
        return Check("NVDEC", FAIL, f"decoded frames {got} instead of [0, 9, 23] of an H.264 test clip",
                     "frame selection is off in this DALI build: try another DALI release")
    return Check("NVDEC", PASS, "decoded frames 0, 9, 23 of an H.264 test clip on the GPU, exactly")


def check_host_decoder(decoder: str) -> Check:
    """The CPU twin of the NVDEC check: the decoder this machine's loader will use, on a test clip."""
    if decoder == "dali-gpu":
        return Check("host decoder", SKIP, "the loader decodes on the GPU here (NVDEC)")
    got = decode_probe(decoder, None)
    clip = "VP9" if decoder == "dali-cpu" else "H.264"
    if got != [0, 9, 23]:
        return Check("host decoder", FAIL, f"{decoder} decoded frames {got} instead of [0, 9, 23] of a {clip} clip",
                     "reinstall DALI / PyAV")
    return Check("host decoder", PASS, f"{decoder} decoded frames 0, 9, 23 of a {clip} test clip, exactly")


def check_shards(data: str, split: str, decoder: str, device: torch.device, views_per_s_needed: float | None,
                 repeats: int) -> Check:
    """The shards against the hardware: formats NVDEC cannot decode, HD sources that cost decode time."""
    manifest = read_manifest(data)
    if split not in manifest["splits"]:
        return Check("shards", FAIL, f"{data} has no {split!r} split (it has {sorted(manifest['splits'])})",
                     "build it with tools/build_shards.py, or set split=...")
    info = manifest["splits"][split]
    codecs, formats = info["codecs"], info.get("formats")
    side = info.get("short_side") or {}
    summary = f"{info['samples']} {split} clips in {len(info['shards'])} shards; " + (
        f"formats {formats}; short side {side['min']}-{side['median']}-{side['max']} px (min-median-max)"
        if formats and side else f"codecs {codecs}")
    figures = {"samples": info["samples"], "codecs": codecs, "formats": formats, "short_side": info.get("short_side")}
    problems, fixes, status = [], [], PASS
    if decoder == "dali-gpu" and formats:
        bad = unsupported_formats(formats)
        if bad:
            problems.append(f"NVDEC cannot decode {bad} (clips)")
            fixes.append("re-encode those clips (tools/build_shards.py --codec h264), or decoder=pyav")
            status = FAIL
    elif decoder == "dali-cpu" and not set(codecs) <= set(CPU_DECODABLE):
        problems.append(f"DALI's CPU decoder reads only {CPU_DECODABLE}")
        fixes.append("decoder=pyav, or rebuild with --codec vp9")
        status = FAIL
    if formats is None:
        problems.append("the manifest predates pixel-format and frame-size records")
        fixes.append("rebuild the shards with this version of tools/build_shards.py to have them checked")
        status = WARN if status == PASS else status
    if side.get("median", 0) > RECOMMENDED_SHORT_SIDE:
        pixels = info.get("pixels_median", side["median"] ** 2 * 16 // 9)
        decodable = nvdec_clips_per_s(ACCELERATORS["H100"], "h264", pixels)
        need = f"; the model needs ~{views_per_s_needed / repeats:.0f} at R={repeats}" if views_per_s_needed else ""
        above = side.get(f"above_{RECOMMENDED_SHORT_SIDE}", "?")
        problems.append(f"median short side {side['median']} px ({above} "
                        f"clips above {RECOMMENDED_SHORT_SIDE}): projected NVDEC H.264 decode ~{decodable:.0f} clips/s "
                        f"per engine on an H100 at that size{need}")
        fixes.append(f"re-encode to --codec h264 --short-side 256 (decode cost grows with pixels)")
        status = WARN if status == PASS else status
        figures["projected_nvdec_clips_per_s_per_engine"] = round(decodable)
    if problems:
        return Check("shards", status, summary + "; " + "; ".join(problems), "; ".join(fixes), figures)
    return Check("shards", PASS, summary, figures=figures)


# --- model ----------------------------------------------------------------------------------------------------------


def check_attention(cfg, device: torch.device, dtype: torch.dtype) -> Check:
    from models.attention import attention_kernels

    kernels = attention_kernels(cfg, device, dtype)
    summary = "; ".join(f"{stack}: {kernel}" for stack, kernel in kernels.items())
    if device.type == "cuda" and any(k.startswith("math") for k in kernels.values()):
        return Check("attention", WARN, summary + " (the math kernel materialises L x L scores: slow, memory-hungry)",
                     "check the head dimension (flash needs <= 256, a multiple of 8), the dtype (bf16) and torch's "
                     "SDPA backends (torch.backends.cuda.*_sdp_enabled)", kernels)
    return Check("attention", PASS, summary, figures=kernels)


def _bare_model(cfg):
    from models import MaskedAutoencoder, VideoClassifier
    from models.config import MAEConfig

    return MaskedAutoencoder(cfg) if isinstance(cfg, MAEConfig) else VideoClassifier(cfg)


def check_memory(cfg, recipe, ds_config: dict, device: torch.device, world_size: int, views: int) -> Check:
    """The plan from the analytic estimate; on a GPU also one real forward + backward of a micro-batch."""
    from models.memory import GB
    from trainer.memory_plan import device_capacity, estimate, plan_recompute

    cfg, note = plan_recompute(cfg, recipe, ds_config, world_size, views, device_capacity(device))
    planned = estimate(cfg, recipe, ds_config, world_size, views, cfg.grad_checkpointing)
    figures = {"estimate_gb": round(planned.total / GB, 2), "recompute": cfg.grad_checkpointing, "plan": note}
    if device.type != "cuda":
        return Check("memory", PASS, f"{note}; measured: {NO_GPU}", figures=figures)
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = _bare_model(cfg).to(device, dtype)
    clips = ds_config["train_micro_batch_size_per_gpu"]
    videos = torch.randn(clips * views, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, device=device,
                         dtype=dtype)
    if hasattr(recipe, "mask_ratio"):
        loss = model(videos, mask_ratio=recipe.mask_ratio, mask_repeats=recipe.mask_repeats)[0]
    else:
        loss = model(videos).float().logsumexp(-1).mean()
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    capacity = device_capacity(device)
    # the measurement holds the whole model's weights and gradients (no ZeRO here) but no optimizer state
    expected = planned.activations + 2 * planned.weights * (world_size if ds_config.get(
        "zero_optimization", {}).get("stage", 0) >= 3 else 1)
    with_optimizer = peak + planned.optimizer
    figures.update(measured_forward_backward_gb=round(peak / GB, 2), capacity_gb=round(capacity / GB, 1),
                   measured_plus_optimizer_gb=round(with_optimizer / GB, 2))
    del model, videos, loss
    torch.cuda.empty_cache()
    summary = (f"{note}; measured one micro-batch ({clips} clips x {views} views) forward + backward: peak "
               f"{peak / GB:.1f} GB (estimate {expected / GB:.1f}); with ZeRO's optimizer state "
               f"~{with_optimizer / GB:.1f} of {capacity / GB:.0f} GB")
    if with_optimizer > 0.95 * capacity:
        return Check("memory", FAIL, summary, "lower train_micro_batch_size_per_gpu (raise the accumulation), "
                     "set model.grad_checkpointing=True, or use ds_configs/zero3_bf16.json", figures)
    return Check("memory", PASS, summary, figures=figures)


# --- a short real run -----------------------------------------------------------------------------------------------


def loader_rate(loader, batches: int, warmup: int = 2) -> float:
    """Clips/s of the loader alone (what its decoders deliver when nothing else runs)."""
    def endless():
        while True:
            yield from loader

    stream = endless()
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    if batch["video"].is_cuda:
        torch.cuda.synchronize(batch["video"].device)
    return batches * loader.config.batch_size / (time.perf_counter() - start)


def check_timed_run(task, args: Namespace, recipe, model_cfg, env, steps: int, ds_config: dict) -> Check:
    """`steps` optimizer steps of the real recipe from the real shards, through the trainer itself."""
    import dataclasses

    from trainer.device_peak import measured_matmul_peak
    from trainer.run import Run

    out = os.path.join(args.output, "preflight_run")
    if env.device.type != "cuda":  # would the recipe's model finish in a couple of minutes on this CPU?
        clips = steps * ds_config["train_micro_batch_size_per_gpu"] * ds_config.get("gradient_accumulation_steps", 1)
        dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
        flops = task.train_flops_per_clip(_bare_model(model_cfg), recipe) * clips
        seconds = flops / (0.5 * measured_matmul_peak(env.device, dtype, seconds=0.2))
        if seconds > 120:
            return Check("timed run", SKIP, f"{NO_GPU}: {steps} steps of {recipe.model} in {dtype} would take "
                         f"~{seconds / 60:.0f} min on this CPU (a CPU can time the demo recipe: --recipe demo_PT "
                         "--ds_config ds_configs/cpu.json)")
    if env.is_main:
        shutil.rmtree(out, ignore_errors=True)
    if env.world_size > 1:
        dist.barrier()
    quiet = {"checkpoint_every": 0, "image_every": 0, "log_every": 0}
    quiet.update({"eval_every": 0} if hasattr(recipe, "eval_every") else {})
    run = Run(task, Namespace(**{**vars(args), "output": out, "max_steps": None}), dataclasses.replace(recipe, **quiet),
              model_cfg, quiet=True)
    try:
        alone = loader_rate(run.loader, batches=max(4, steps // 2))
        problem = run.run_steps(run.step + steps)
    finally:
        run.close()
    if env.world_size > 1:
        dist.barrier()
    if env.is_main:
        shutil.rmtree(out, ignore_errors=True)
    if problem:
        return Check("timed run", FAIL, problem, "lower blr or check the data: the loss guard stopped the run")
    rows = list(run.monitor.history)[len(run.monitor.history) // 2:]  # the second half: warm
    if not rows:
        return Check("timed run", PASS, f"{steps} steps ran (figures on rank 0)")

    def median(key):
        return float(np.median([r[key] for r in rows]))

    figures = {"steps": steps, "clips_per_s_per_gpu": median("clips_per_s_per_device"),
               "views_per_s_per_gpu": median("views_per_s_per_device"), "mfu": median("mfu"),
               "data_wait_share": median("data_wait_share"), "loader_alone_clips_per_s": alone,
               "decoder": run.loader.decoder.name}
    summary = (f"measured over {steps} steps: {figures['clips_per_s_per_gpu']:.1f} clips/s per "
               f"{'GPU' if env.device.type == 'cuda' else 'process'} ({figures['views_per_s_per_gpu']:.1f} views/s), "
               f"MFU {100 * figures['mfu']:.1f}%, waiting for data {100 * figures['data_wait_share']:.0f}% of the "
               f"time; the loader alone ({run.loader.decoder.name}) {alone:.1f} clips/s")
    gpu = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else ""
    accelerator = next((name for name in ACCELERATORS if name in gpu), None) or "H100"
    if recipe.model in ("vit_b", "vit_l", "vit_h"):
        p = projection(accelerator, 0.4, repeats=recipe.repeats, crop_size=recipe.crop_size)
        row = next(r for r in p["rows"] if r["model"] == recipe.model)
        figures["projected"] = {"accelerator": accelerator, "views_per_s": row["views_per_s"], "assumed_mfu": 0.4}
        summary += f"; projected for one {accelerator} at 40% MFU: {row['views_per_s']} views/s"
    if figures["data_wait_share"] > 0.1:
        return Check("timed run", WARN, summary + " (the loader limits)",
                     "more decoding pipelines (decode_pipelines=...), loader_threads, or shards with a shorter "
                     "keyframe interval and a 256 px short side", figures)
    return Check("timed run", PASS, summary, figures=figures)
