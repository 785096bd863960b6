"""DALI's errors in one line, and the one that means "no NVDEC in this process".

A failed DALI operator raises a RuntimeError whose text nests the pipeline's traceback, the C++ context and ends with
"Current pipeline object is no longer valid."; the line a user needs (which operator, what failed) is in the middle.
"""

import re

_NOISE = ("Critical error in pipeline", "Current pipeline object is no longer valid", "C++ context")
# what DALI says when the driver's video library cannot be loaded (NVIDIA/DALI#2091, #2362, #1588): a container
# started without the driver's video capability has no libnvcuvid.so
_NVDEC_MISSING = re.compile(r"libnvcuvid|nvcuvid|cuvidInit", re.IGNORECASE)

NVDEC_HELP = (
    "NVDEC is not available in this process: DALI cannot load the driver's video decoding library libnvcuvid.so. "
    "In a container this means it was started without the driver's video capability: set "
    "NVIDIA_DRIVER_CAPABILITIES=compute,utility,video (docker: --gpus 'all,\"capabilities=compute,utility,video\"'; "
    "Kubernetes, enroot/pyxis and Singularity pass the same variable). Until then, decoder=pyav decodes on the CPU "
    "(any codec), as does decoder=dali-cpu for VP8/VP9/MJPEG shards.")


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
