"""What a failed DALI pipeline run means, told apart by its message: a clip the decoder cannot read (the loader
repairs the batch), no NVDEC in this process (a fix in the container's start), or the GPU out of memory (a memory
problem, never "bad video").

A failed DALI operator raises a RuntimeError whose text nests the pipeline's traceback, the C++ context and ends with
"Current pipeline object is no longer valid."; the line a user needs (which operator, what failed) is in the middle.
"""

import re

_NOISE = ("Critical error in pipeline", "Current pipeline object is no longer valid", "C++ context")
# what DALI says when the driver's video library cannot be loaded (NVIDIA/DALI#2091, #2362, #1588): a container
# started without the driver's video capability has no libnvcuvid.so
_NVDEC_MISSING = re.compile(r"libnvcuvid|nvcuvid|cuvidInit", re.IGNORECASE)
# DALI's allocators and CUDA's error names when device (or pinned host) memory runs out
_OUT_OF_MEMORY = re.compile(r"out of memory|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY|"
                            r"Can't allocate|allocation failed", re.IGNORECASE)

NVDEC_HELP = (
    "NVDEC is not available in this process: DALI cannot load the driver's video decoding library libnvcuvid.so. "
    "In a container this means it was started without the driver's video capability: set "
    "NVIDIA_DRIVER_CAPABILITIES=compute,utility,video (docker: --gpus 'all,\"capabilities=compute,utility,video\"'; "
    "Kubernetes, enroot/pyxis and Singularity pass the same variable). Until then, decoder=pyav decodes on the CPU "
    "(any codec), as does decoder=dali-cpu for VP8/VP9/MJPEG shards.")


class VideoDecodeError(RuntimeError):
    """A views pipeline failed on its batch because of its input: a clip the decoder cannot read."""


class NvdecUnavailable(RuntimeError):
    """This process cannot use NVDEC at all (no libnvcuvid.so): no batch will decode."""

    def __init__(self, line: str):
        super().__init__(f"{line}. {NVDEC_HELP}")
        self.line = line  # DALI's own words


class DaliOutOfMemory(MemoryError):
    """DALI ran out of GPU (or pinned host) memory: the loader's batches are too large for what is left."""


def first_meaningful_line(error: BaseException | str) -> str:
    """'<operator>: <what failed>' from a DALI error, e.g. 'decoders.video: Failed to create video decoder'."""
    text = str(error)
    operator = re.search(r"operator `(?:nvidia\.dali\.fn\.)?([\w.]+)`", text)
    cause = text.rsplit("encountered:", 1)[-1]  # after the pipeline's traceback, when there is one
    for line in cause.splitlines():
        line = re.sub(r"^\[/[^\]]*\]\s*", "", line.strip())  # a leading [/source/file.cc:123]
        line = re.sub(r'^Assert on "[^"]*" failed: ', "", line)
        if line and not line.startswith(_NOISE):
            return f"{operator[1]}: {line}" if operator else line
    return text.strip().splitlines()[0] if text.strip() else repr(error)


def nvdec_missing(error: BaseException | str) -> bool:
    return bool(_NVDEC_MISSING.search(str(error)))


def classify(error: RuntimeError) -> Exception:
    """DALI's RuntimeError from a pipeline run as what it means (raise the result)."""
    line = first_meaningful_line(error)
    if nvdec_missing(error):
        return NvdecUnavailable(line)
    if _OUT_OF_MEMORY.search(str(error)):
        return DaliOutOfMemory(f"DALI ran out of memory decoding or augmenting a batch ({line}): lower "
                               "train_micro_batch_size_per_gpu or decode_pipelines, or free GPU memory for the loader")
    return VideoDecodeError(line)
