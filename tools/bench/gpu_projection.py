"""What one GPU would need and what its video decoders can give: a projection from the analytic FLOP counts and
stated assumptions, not a measurement (no machine here has a GPU).

Model side: views/s = assumed MFU x dense bf16 peak / (6 x multiply-adds per view), decoded clips/s = views/s / R.
Decoder side: NVDEC frames/s per engine at 1080p, scaled to the clock and to the shards' frame size, divided by the
frames decoded per clip (the clip's span plus, on average, half a keyframe interval of frames before it).
"""

from dali_pipes.sampling import clip_span
from dali_pipes.shard_format import KINETICS_FRAME
from models import pretrain_macs, training_flops
from models.config import MAEConfig, resolve_config
from trainer.device_peak import GPU_PEAK_BF16, datasheet_peak

NVDEC_NOTE = "https://docs.nvidia.com/video-technologies/video-codec-sdk/13.0/nvdec-application-note/index.html"
# frames/s per NVDEC engine, 1920x1080 4:2:0, Turing at 1860 MHz; Hopper and GA100 decode like Turing scaled by clock
NVDEC_TURING_1080P = {"h264": 771, "hevc": 1316, "vp9": 932}
TURING_CLOCK_MHZ = 1860
# per GPU family: NVDEC engines (NVIDIA's MIG user guide, full-GPU profile) and the video clock assumed
_HOPPER_CLOCK = "Hopper's video clock was not found; A100's 1290 MHz (a reported nvidia-smi maximum) is assumed"
_NVDEC = {"H100": (7, _HOPPER_CLOCK), "H200": (7, _HOPPER_CLOCK), "GH200": (7, _HOPPER_CLOCK),
          "H800": (7, _HOPPER_CLOCK), "A100": (5, "1290 MHz, a reported nvidia-smi maximum video clock "
                                                  "(NVIDIA/nvidia-docker#1648)"), "A800": (5, "as A100's")}
# each SKU of those families, with its own dense bf16 peak (trainer/device_peak.py's datasheet table): an H100 NVL
# or PCIe is not projected as an SXM part, an H200 not as an H100
ACCELERATORS = {sku: dict(peak=peak, engines=_NVDEC[sku.split()[0]][0], clock_mhz=1290,
                          clock_note=_NVDEC[sku.split()[0]][1])
                for _, peak, sku in GPU_PEAK_BF16 if sku.split()[0] in _NVDEC}


def accelerator_for(device) -> str | None:
    """The ACCELERATORS entry of a device ("NVIDIA H100 NVL" -> "H100 NVL"), or None (a CPU, a GPU not in the table):
    no projection."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    known = datasheet_peak(torch.cuda.get_device_name(device))
    return known[1] if known and known[1] in ACCELERATORS else None


def frames_decoded(num_frames: int, stride: int, gop: int) -> float:
    """Frames NVDEC decodes for one clip: its span (at the recipes' 30 fps) plus, on average, half a keyframe
    interval of frames before it."""
    return clip_span(num_frames, stride, 30.0, 30.0) + gop / 2


def nvdec_clips_per_s(gpu: dict, codec: str, pixels: int, gop: int = 16, num_frames: int = 16,
                      stride: int = 4) -> float:
    """Clips one NVDEC engine of `gpu` decodes per second: its frames/s at 1080p scaled by clock and frame size,
    over the frames one clip costs (its span plus, on average, half a keyframe interval before it)."""
    engine_fps = NVDEC_TURING_1080P[codec] * gpu["clock_mhz"] / TURING_CLOCK_MHZ * (1920 * 1080) / pixels
    return engine_fps / frames_decoded(num_frames, stride, gop)


def projection(accelerator: str, mfu: float, repeats: int = 4, crop_size: int = 224, short_side: int = 256,
               codec: str = "h264", gop: int = 16, num_frames: int = 16, stride: int = 4) -> dict:
    gpu = ACCELERATORS[accelerator]
    span, frames_per_clip = clip_span(num_frames, stride, 30.0, 30.0), frames_decoded(num_frames, stride, gop)
    pixels = short_side * round(short_side * KINETICS_FRAME[1] / KINETICS_FRAME[0])  # (mostly 4:3 or wider)
    per_engine = nvdec_clips_per_s(gpu, codec, pixels, gop, num_frames, stride)
    rows = []
    for size in ("vit_b", "vit_l", "vit_h"):
        cfg = resolve_config(MAEConfig, size, img_size=crop_size)
        flops = training_flops(pretrain_macs(cfg, 0.9))
        views = mfu * gpu["peak"] / flops
        rows.append({"model": size, "train_gflop_per_view": round(flops / 1e9, 1), "views_per_s": round(views),
                     "decoded_clips_per_s_needed": round(views / repeats),
                     "nvdec_engines_needed": round(views / repeats / per_engine, 2)})
    return {
        "accelerator": accelerator, "assumed_mfu": mfu, "repeats": repeats, "codec": codec, "rows": rows,
        "decode_clips_per_s_one_engine": round(per_engine), "decode_clips_per_s_all_engines":
            round(per_engine * gpu["engines"]), "engines": gpu["engines"],
        "assumptions": [
            f"dense bf16 peak {gpu['peak'] / 1e12:.0f} TFLOP/s (datasheet), MFU {mfu:.0%} assumed",
            f"NVDEC {codec} {NVDEC_TURING_1080P[codec]} frames/s per engine at 1080p, Turing at {TURING_CLOCK_MHZ} "
            f"MHz; Hopper/GA100 decode like Turing scaled by clock ({NVDEC_NOTE})",
            f"video clock {gpu['clock_mhz']} MHz: {gpu['clock_note']}",
            f"{gpu['engines']} NVDEC engines (NVIDIA MIG user guide, full-GPU profile)",
            f"decode cost linear in pixels from 1080p down to {round(short_side * 4 / 3)}x{short_side} (an upper "
            "bound: small frames carry per-frame overheads)",
            f"{frames_per_clip:.0f} frames decoded per clip: a {num_frames}x{stride} span of {span:.0f} plus half a "
            f"{gop}-frame keyframe interval (tools/build_shards.py --gop)",
            "one DALI decoder pipeline was reported to drive a single NVDEC engine (NVIDIA/DALI#6387): using all "
            "engines takes several decoding pipelines per GPU",
        ],
    }


def print_projection(p: dict) -> None:
    print(f"GPU projection, one {p['accelerator']} (not measured: analytic FLOPs and the assumptions below)")
    print(f"  {'model':6s} {'GFLOP/view':>10s} {'views/s':>8s} {'clips/s needed at R=' + str(p['repeats']):>26s} "
          f"{'NVDEC engines':>14s}")
    for r in p["rows"]:
        print(f"  {r['model']:6s} {r['train_gflop_per_view']:10.1f} {r['views_per_s']:8d} "
              f"{r['decoded_clips_per_s_needed']:26d} {r['nvdec_engines_needed']:14.2f}")
    print(f"  NVDEC capacity: {p['decode_clips_per_s_one_engine']} clips/s per engine, "
          f"{p['decode_clips_per_s_all_engines']} with all {p['engines']}")
    for line in p["assumptions"]:
        print(f"  - {line}")
