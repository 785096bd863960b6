"""The video decoders the loader can use, and the route that gives each clip of a shard set to one of them.

A route has a main decoder, the first of DECODERS (in this order) that runs on this machine and reads the shards'
formats, and, when it leaves some formats unread, PyAV for those clips on the host: AV1 on an A100 or H100 (their
NVDEC has no AV1), H.264 on a CPU-only machine whose main decoder is DALI's VP9 one. A decoder asked for by name reads
every format or is refused, with the command that re-encodes the rest.

Adding a backend: a module here with a Decoder subclass (base.py says what it must do), and one line in DECODERS.
A Decoder instance can also be handed to the loader directly (LoaderConfig.decoder), skipping the choice.
This module imports neither DALI nor PyAV: the decoders import them when they decode.
"""

from dataclasses import dataclass, field

from dali_pipes.decoders.base import Decoder, HostDecoder, UndecodableVideo

# name -> (module, class), in the order `auto` prefers them
DECODERS = {
    "dali-gpu": ("dali_pipes.decoders.nvdec", "NvdecDecoder"),
    "dali-cpu": ("dali_pipes.decoders.dali_cpu", "DaliCpuDecoder"),
    "pyav": ("dali_pipes.decoders.pyav", "PyAVDecoder"),
}
DECODER_NAMES = ("auto", *DECODERS)
HOST_FALLBACK = "pyav"  # reads every format FFmpeg reads

__all__ = ["DECODERS", "DECODER_NAMES", "Decoder", "DecoderRoute", "HostDecoder", "UndecodableVideo", "choose_route",
           "gpu_capability", "make_decoder"]


def make_decoder(name: str, gpu: tuple[int, int] | None = None) -> Decoder:
    """The decoder called `name`; `gpu` (a CUDA compute capability) tells NVDEC what it decodes here."""
    import importlib

    module, cls = DECODERS[name]
    decoder_class = getattr(importlib.import_module(module), cls)
    return decoder_class(gpu or (9, 0)) if decoder_class.needs_gpu else decoder_class()


def gpu_capability(device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device` when both torch and DALI can use it, else None (no GPU here)."""
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    from nvidia.dali.backend import GetCUDADeviceCount

    return tuple(torch.cuda.get_device_capability(device)) if GetCUDADeviceCount() > 0 else None


def describe_formats(formats: dict) -> str:
    """{"av1/yuv420p": 12, "hevc/yuv422p": 1} -> 'av1/yuv420p (12 clips), hevc/yuv422p (1 clip)'."""
    return ", ".join(f"{fmt} ({n} clip{'s' * (n != 1)})" for fmt, n in sorted(formats.items()))


@dataclass(frozen=True)
class DecoderRoute:
    """Which decoder reads which clips: `main` every format it reads, `host` (a host decoder) the formats in
    `host_formats`, which `main` cannot read. Clips of a host decoder reach the views pipeline as frames."""

    main: Decoder
    why: str
    host: Decoder | None = None
    host_formats: dict = field(default_factory=dict)  # {format: clips} decoded by `host`

    @property
    def name(self) -> str:
        return self.main.name + (f" + {self.host.name} for {', '.join(sorted(self.host_formats))}" if self.host
                                 else "")

    @property
    def per_clip(self) -> bool:
        """Whether a clip's format decides its decoder (the loader then reads each clip's format)."""
        return self.host is not None

    @property
    def kinds(self) -> dict:
        """{what a batch's clips hold: the decoder its views pipeline is built with}: "encoded" clips a DALI decoder
        reads inside the pipeline, "decoded" ones a host decoder made frames of before it."""
        if not self.main.decodes_in_dali:
            return {"decoded": self.main}
        return {"encoded": self.main, **({"decoded": self.host} if self.host else {})}

    def host_decoder_for(self, fmt: str | None) -> Decoder | None:
        """The host decoder of a clip of format `fmt` (None: unknown), or None when the views pipeline decodes it."""
        if not self.main.decodes_in_dali:
            return self.main
        if self.host is not None and (fmt is None or not self.main.can_read(fmt)):
            return self.host  # (a clip whose format is not recorded goes where every format decodes)
        return None


def choose_route(requested, formats: dict, gpu: tuple[int, int] | None) -> DecoderRoute:
    """The route for shards holding `formats` ({"codec/pix_fmt" or "codec": clips}) on a machine with the GPU of
    compute capability `gpu` (None: none). `requested`: a Decoder, a name, or "auto"."""
    rebuild = "h264" if gpu else "vp9"
    if isinstance(requested, Decoder):
        unread = requested.unreadable(formats)
        if unread:
            raise ValueError(f"the given decoder {requested.name} cannot read {describe_formats(unread)}")
        return DecoderRoute(requested, "given")
    if requested not in DECODER_NAMES:
        raise ValueError(f"decoder must be one of {DECODER_NAMES} (or a Decoder), not {requested!r}")
    if requested != "auto":
        decoder = make_decoder(requested, gpu)
        if decoder.needs_gpu and gpu is None:
            raise ValueError(f"decoder={requested!r} needs a CUDA GPU, and none is visible to torch and DALI")
        unread = decoder.unreadable(formats)
        if unread:
            where = f" on this {decoder.gpu}" if decoder.needs_gpu else ""
            raise ValueError(
                f"decoder={requested!r} cannot read {describe_formats(unread)}{where}, which these shards hold: "
                f"decoder='auto' decodes those clips with {HOST_FALLBACK} on the host, or re-encode them "
                f"(python tools/build_shards.py ... --codec {rebuild})")
        return DecoderRoute(decoder, "requested")
    refused = []
    for name in DECODERS:
        decoder = make_decoder(name, gpu)
        if decoder.needs_gpu and gpu is None:
            refused.append(f"no GPU for {name}")
            continue
        unread = decoder.unreadable(formats)
        if formats and len(unread) == len(formats):
            refused.append(f"{name} reads none of {sorted(formats)}")
            continue
        if not unread:
            return DecoderRoute(decoder, "; ".join([*refused, f"{name} reads every format in the shards "
                                                               f"({sorted(formats)})"]))
        share = sum(unread.values()) / max(1, sum(formats.values()))
        where = f"this {decoder.gpu}'s NVDEC" if decoder.needs_gpu else name
        why = (f"{where} cannot read {describe_formats(unread)}, {100 * share:.1f}% of the clips: those decode on the "
               f"host with {HOST_FALLBACK} (slower; re-encode them to keep every clip on {name}: python "
               f"tools/build_shards.py ... --codec {rebuild})")
        return DecoderRoute(decoder, "; ".join([*refused, why]), make_decoder(HOST_FALLBACK), unread)
    raise ValueError(f"no decoder reads these shards: {'; '.join(refused)}")
