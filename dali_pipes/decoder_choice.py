"""Which video decoder a pipeline uses: NVDEC through DALI when there is a GPU, else DALI's CPU decoder for the
codecs it has (VP8, VP9, MJPEG), else PyAV (H.264, HEVC, AV1, ... on a CPU)."""

from dali_pipes.shard_format import CPU_DECODABLE

DECODERS = ("auto", "dali-gpu", "dali-cpu", "pyav")


def gpu_available() -> bool:
    """A CUDA device that both torch and DALI can use."""
    import torch
    from nvidia.dali.backend import GetCUDADeviceCount

    return torch.cuda.is_available() and GetCUDADeviceCount() > 0


def choose_decoder(requested: str, codecs: dict, has_gpu: bool) -> tuple[str, str]:
    """(decoder, why) for shards holding `codecs` ({codec: clip count})."""
    if requested not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {requested!r}")
    cpu_ok = set(codecs) <= set(CPU_DECODABLE)
    if requested == "dali-gpu" and not has_gpu:
        raise ValueError("decoder='dali-gpu' needs a CUDA GPU, and none is visible to torch and DALI")
    if requested == "dali-cpu" and not cpu_ok:
        others = sorted(set(codecs) - set(CPU_DECODABLE))
        raise ValueError(f"decoder='dali-cpu' reads only {CPU_DECODABLE}; these shards also hold {others}: "
                         "use decoder='pyav' (or rebuild the shards with --codec vp9)")
    if requested != "auto":
        return requested, "requested"
    if has_gpu:
        return "dali-gpu", "a GPU is present: NVDEC decodes every codec in the shards"
    if cpu_ok:
        return "dali-cpu", f"no GPU; the shards hold only {sorted(codecs)}, which DALI's CPU decoder reads"
    return "pyav", f"no GPU, and DALI's CPU decoder cannot read {sorted(set(codecs) - set(CPU_DECODABLE))}"
