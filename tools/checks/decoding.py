"""The preflight's decoding checks: a probe clip of every codec the shards hold, made in memory, decoded by the
decoder the loader's route gives it on this machine (NVDEC on the GPU it runs on, or a host decoder), and the shards
against the hardware (formats the GPU cannot decode, frame sizes that cost decode time)."""

import io

import numpy as np
import torch

from dali_pipes.dali_errors import NVDEC_HELP, NvdecUnavailable, VideoDecodeError, first_meaningful_line
from dali_pipes.decoders import DecoderRoute, describe_formats
from dali_pipes.decoders.base import split_format
from dali_pipes.decoders.nvdec import MIN_FRAME
from dali_pipes.shard_format import KINETICS_FRAME, RECOMMENDED_SHORT_SIDE, read_manifest
from tools.bench.gpu_projection import ACCELERATORS, accelerator_for, nvdec_clips_per_s
from tools.checks.report import FAIL, NO_GPU, PASS, SKIP, WARN, Check

WANTED = (0, 9, 23)  # the frames every probe decodes
# codec -> (PyAV encoder, container, the pixel format it encodes when it cannot encode the shards' own)
PROBE_ENCODERS = {"h264": ("libx264", "mp4", "yuv420p"), "hevc": ("libx265", "mp4", "yuv420p"),
                  "vp9": ("libvpx-vp9", "webm", "yuv420p"), "vp8": ("libvpx", "webm", "yuv420p"),
                  "av1": ("libsvtav1", "mp4", "yuv420p"), "mpeg4": ("mpeg4", "mp4", "yuv420p"),
                  "mjpeg": ("mjpeg", "avi", "yuvj420p")}


def indexed_clip(codec: str, pix_fmt: str, width: int, height: int, frames: int = 24) -> bytes:
    """A clip made in memory whose frames show their own index as 8 black/white blocks in the top rows."""
    import av

    encoder, container, _ = PROBE_ENCODERS[codec]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(encoder, rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if encoder == "libx265":
            stream.options = {"x265-params": "log-level=none"}
        if codec != "mjpeg":
            stream.codec_context.gop_size = 8
        for t in range(frames):
            image = np.full((height, width, 3), 128, np.uint8)
            for bit in range(8):
                image[:16, bit * 16:(bit + 1) * 16] = 255 if (t >> bit) & 1 else 0
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def probe_size(codec: str, frame: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) of a probe clip: the shards' median frame (even sides), at least what NVDEC decodes of the
    codec (a 128x96 probe of HEVC or VP9 failed as 'too small' on a healthy GPU)."""
    width, height = frame or (KINETICS_FRAME[1], KINETICS_FRAME[0])
    low_w, low_h = MIN_FRAME.get(codec, (0, 0))
    return max(low_w, width + width % 2, 128), max(low_h, height + height % 2, 48)


def shards_frame(info: dict) -> tuple[int, int] | None:
    """(width, height) of a split's median clip from its manifest entry (landscape), or None when not recorded."""
    side, pixels = (info.get("short_side") or {}).get("median"), info.get("pixels_median")
    return (round(pixels / side), side) if side and pixels else None


def probe_clip(codec: str, pix_fmt: str, frame: tuple[int, int] | None = None) -> tuple[bytes, str]:
    """(a probe clip of `codec` at probe_size, its pixel format): the shards' own pixel format when PyAV encodes
    it."""
    import av

    size = probe_size(codec, frame)
    try:
        return indexed_clip(codec, pix_fmt, *size), pix_fmt
    except (av.error.FFmpegError, ValueError):
        fallback = PROBE_ENCODERS[codec][2]
        return indexed_clip(codec, fallback, *size), fallback


def read_indices(frames: np.ndarray) -> list[int]:
    return [sum(1 << bit for bit in range(8) if frame[8, bit * 16 + 8].mean() > 128) for frame in frames]


def decode_probe(decoder, data: bytes, device: torch.device) -> list[int]:
    """Frames WANTED of an encoded probe clip through `decoder`, inside the loader's own views pipeline (stopped
    after decoding) for a DALI decoder; the indices read back from the pixels."""
    from types import SimpleNamespace

    from dali_pipes.config import LoaderConfig
    from dali_pipes.views_pipeline import ViewsPipeline

    wanted, encoded = np.array(WANTED, np.int32), np.frombuffer(data, np.uint8)
    if not decoder.decodes_in_dali:
        return read_indices(decoder.frames(encoded, wanted))
    probe = SimpleNamespace(data=[encoded], plans=[SimpleNamespace(frames=wanted)])
    pipeline = ViewsPipeline(LoaderConfig("", batch_size=1, device=device), decoder, 1, stop_after="decode")
    return pipeline.run(probe, use=lambda outputs: read_indices(np.array(
        outputs[0].as_cpu()[0] if decoder.needs_gpu else outputs[0][0])))


def decoder_assignments(route: DecoderRoute, formats: dict) -> dict:
    """{codec: (the decoder its clips get, the pixel format most of them have)} for the shards' codecs."""
    found = {}
    for fmt, _ in sorted(formats.items(), key=lambda item: -item[1]):
        codec, pix_fmt = split_format(fmt)
        if codec not in found:
            found[codec] = (route.host_decoder_for(fmt) or route.main, pix_fmt or "yuv420p")
    return found


def check_decoders(route: DecoderRoute, formats: dict, device: torch.device,
                   frame: tuple[int, int] | None = None) -> list[Check]:
    """The "NVDEC" check (the codecs NVDEC decodes here) and the "host decoder" one (the codecs a decoder on the
    CPU takes: DALI's CPU decoder, PyAV): one probe clip of each codec through its decoder at the shards' median
    `frame` (width, height), frames checked."""
    assigned = decoder_assignments(route, formats)
    on_gpu = {codec: item for codec, item in assigned.items() if item[0].needs_gpu}
    on_cpu = {codec: item for codec, item in assigned.items() if not item[0].needs_gpu}
    if device.type != "cuda":
        nvdec = Check("NVDEC", SKIP, NO_GPU)
    elif not on_gpu:
        nvdec = Check("NVDEC", SKIP, f"the loader decodes nothing with NVDEC here (decoder: {route.name})")
    else:
        nvdec = _probe_check("NVDEC", on_gpu, device, frame)
    host = _probe_check("host decoder", on_cpu, device, frame) if on_cpu else Check(
        "host decoder", SKIP, "every clip decodes on the GPU here (NVDEC)")
    return [nvdec, host]


def _probe_check(name: str, assigned: dict, device: torch.device, frame: tuple[int, int] | None) -> Check:
    passed, problems, fixes = [], [], []
    for codec, (decoder, pix_fmt) in assigned.items():
        if codec not in PROBE_ENCODERS:
            problems.append(f"no probe clip of {codec} can be made here (no encoder): not checked")
            continue
        data, made = probe_clip(codec, pix_fmt, frame)
        label = f"{codec}/{made} {'x'.join(map(str, probe_size(codec, frame)))} ({decoder.name})"
        try:
            got = decode_probe(decoder, data, device)
        except NvdecUnavailable as err:
            return Check(name, FAIL, err.line, NVDEC_HELP)
        except (VideoDecodeError, RuntimeError, ValueError) as err:
            problems.append(f"{label} failed: {first_meaningful_line(err)}")
            fixes.append(f"decode {codec} elsewhere: re-encode it (tools/build_shards.py --codec h264) or "
                         "decoder=pyav; report DALI's message with the GPU and driver")
            continue
        if got != list(WANTED):
            problems.append(f"{label} decoded frames {got} instead of {list(WANTED)}")
            fixes.append("frame selection is off in this decoder build: try another DALI / PyAV release")
        else:
            passed.append(label)
    summary = f"decoded frames {', '.join(map(str, WANTED))} exactly: {', '.join(passed) or 'none'}"
    if problems:
        status = FAIL if fixes else WARN
        return Check(name, status, summary + "; " + "; ".join(problems), "; ".join(fixes))
    return Check(name, PASS, summary, figures={"probed": passed})


def check_shards(data: str, split: str, route: DecoderRoute, device: torch.device,
                 views_per_s_needed: float | None, repeats: int) -> Check:
    """The shards against the hardware: formats this GPU's NVDEC cannot decode (decoded on the host instead, slower),
    HD sources that cost decode time."""
    manifest = read_manifest(data)
    if split not in manifest["splits"]:
        return Check("shards", FAIL, f"{data} has no {split!r} split (it has {sorted(manifest['splits'])})",
                     "build it with tools/build_shards.py, or set split=...")
    info = manifest["splits"][split]
    formats = info.get("formats")
    side = info.get("short_side") or {}
    summary = f"{info['samples']} {split} clips in {len(info['shards'])} shards; " + (
        f"formats {formats}; short side {side['min']}-{side['median']}-{side['max']} px (min-median-max)"
        if formats and side else f"codecs {info['codecs']}")
    figures = {"samples": info["samples"], "codecs": info["codecs"], "formats": formats,
               "short_side": info.get("short_side"), "decoder": route.name}
    problems, fixes, status = [], [], PASS
    if route.host is not None and route.main.needs_gpu:
        share = sum(route.host_formats.values()) / max(1, info["samples"])
        problems.append(f"this {route.main.gpu}'s NVDEC cannot decode {describe_formats(route.host_formats)}: "
                        f"{100 * share:.1f}% of the clips decode on the host with {route.host.name} instead (CPU time)")
        fixes.append("re-encode those clips to keep them on the GPU: tools/build_shards.py ... --codec h264")
        status, figures["host_decoded_share"] = WARN, round(share, 4)
    if formats is None:
        problems.append("the manifest predates pixel-format and frame-size records")
        fixes.append("rebuild the shards with this version of tools/build_shards.py to have them checked")
        status = WARN
    if side.get("median", 0) > RECOMMENDED_SHORT_SIDE:
        pixels = info.get("pixels_median", side["median"] ** 2 * 16 // 9)
        gpu = accelerator_for(device) or "H100 SXM"
        decodable = nvdec_clips_per_s(ACCELERATORS[gpu], "h264", pixels)
        need = f"; the model needs ~{views_per_s_needed / repeats:.0f} at R={repeats}" if views_per_s_needed else ""
        above = side.get(f"above_{RECOMMENDED_SHORT_SIDE}", "?")
        problems.append(f"median short side {side['median']} px ({above} "
                        f"clips above {RECOMMENDED_SHORT_SIDE}): projected NVDEC H.264 decode ~{decodable:.0f} clips/s "
                        f"per engine on an {gpu} at that size{need}")
        fixes.append("re-encode to --codec h264 --short-side 256 (decode cost grows with pixels)")
        status = WARN
        figures["projected_nvdec_clips_per_s_per_engine"] = round(decodable)
    if problems:
        return Check("shards", status, summary + "; " + "; ".join(problems), "; ".join(fixes), figures)
    return Check("shards", PASS, summary, figures=figures)
