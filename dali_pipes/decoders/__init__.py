"""The video decoders the loader can use, and the choice of one for a set of shards.

Adding a backend: a module here with a Decoder subclass (base.py says what it must do), and one line in DECODERS.
A Decoder instance can also be handed to the loader directly (LoaderConfig.decoder), skipping the choice.
This module imports neither DALI nor PyAV: the decoders import them when they decode.
"""

from dali_pipes.decoders.base import Decoder, UndecodableVideo

# name -> (module, class), in the order `auto` prefers them
DECODERS = {
    "dali-gpu": ("dali_pipes.decoders.nvdec", "NvdecDecoder"),
    "dali-cpu": ("dali_pipes.decoders.dali_cpu", "DaliCpuDecoder"),
    "pyav": ("dali_pipes.decoders.pyav", "PyAVDecoder"),
}
DECODER_NAMES = ("auto", *DECODERS)

__all__ = ["DECODERS", "DECODER_NAMES", "Decoder", "UndecodableVideo", "choose_decoder", "gpu_available",
           "make_decoder"]


def make_decoder(name: str) -> Decoder:
    import importlib

    module, cls = DECODERS[name]
    return getattr(importlib.import_module(module), cls)()


def gpu_available() -> bool:
    """A CUDA device that both torch and DALI can use."""
    import torch
    from nvidia.dali.backend import GetCUDADeviceCount

    return torch.cuda.is_available() and GetCUDADeviceCount() > 0


def choose_decoder(requested, codecs: dict, has_gpu: bool) -> tuple[Decoder, str]:
    """(decoder, why) for shards holding `codecs` ({codec: clips}): `requested` is a Decoder, a name, or "auto"
    (the first of DECODERS that this machine runs and that reads every codec in the shards)."""
    if isinstance(requested, Decoder):
        return requested, "given"
    if requested not in DECODER_NAMES:
        raise ValueError(f"decoder must be one of {DECODER_NAMES} (or a Decoder), not {requested!r}")
    if requested != "auto":
        decoder = make_decoder(requested)
        if decoder.needs_gpu and not has_gpu:
            raise ValueError(f"decoder={requested!r} needs a CUDA GPU, and none is visible to torch and DALI")
        if decoder.reads(codecs):
            rebuild = "h264" if has_gpu else "vp9"
            raise ValueError(f"decoder={requested!r} cannot read {decoder.reads(codecs)}, which these shards hold: "
                             f"use decoder='pyav' (or rebuild the shards with --codec {rebuild})")
        return decoder, "requested"
    refused = []
    for name in DECODERS:
        decoder = make_decoder(name)
        if decoder.needs_gpu and not has_gpu:
            refused.append(f"no GPU for {name}")
        elif decoder.reads(codecs):
            refused.append(f"{name} cannot read {decoder.reads(codecs)}")
        else:
            return decoder, "; ".join([*refused, f"{name} reads every codec in the shards ({sorted(codecs)})"])
    raise ValueError(f"no decoder reads these shards: {'; '.join(refused)}")
