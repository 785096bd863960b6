"""NVDEC through DALI's 'mixed' video decoder: the GPU's own video engines decode, the SMs stay free for the model.

What it reads (NVIDIA Video Codec SDK 13.0, NVDEC application note, decode support matrix for Turing, Ampere
(A100 is GA100) and Hopper): H.264 only 4:2:0 at 8 bits (no High 10, High 4:2:2 or High 4:4:4 profiles); HEVC 4:2:0
and 4:4:4 at 8, 10 and 12 bits; VP9 4:2:0 at 8, 10 and 12 bits; VP8 and MPEG-4 part 2 4:2:0 at 8 bits; AV1 4:2:0 at 8
and 10 bits on Ampere and newer. DALI's 'mixed' decoder reads H.264, HEVC, VP8, VP9, MJPEG, AV1 and MPEG-4
(fn.decoders.video documentation).
"""

from dali_pipes.decoders.base import DaliDecoder

NVDEC_FORMATS = {
    "h264": {"yuv420p", "yuvj420p"},
    "hevc": {"yuv420p", "yuvj420p", "yuv420p10le", "yuv420p12le", "yuv444p", "yuvj444p", "yuv444p10le",
             "yuv444p12le"},
    "vp9": {"yuv420p", "yuv420p10le", "yuv420p12le"},
    "vp8": {"yuv420p"},
    "av1": {"yuv420p", "yuv420p10le"},
    "mpeg4": {"yuv420p"},
    "mjpeg": {"yuvj420p", "yuvj422p", "yuvj444p", "yuv420p", "yuv422p", "yuv444p"},
}


class NvdecDecoder(DaliDecoder):
    name = "dali-gpu"
    codecs = frozenset(NVDEC_FORMATS)
    needs_gpu = True
    dali_device = "mixed"


def unsupported_formats(formats: dict) -> dict:
    """The {"codec/pix_fmt": clips} of a manifest split that NVDEC cannot decode."""
    def decodes(fmt: str) -> bool:
        codec, _, pix_fmt = fmt.partition("/")
        return codec in NVDEC_FORMATS and (not pix_fmt or pix_fmt in NVDEC_FORMATS[codec])

    return {fmt: n for fmt, n in formats.items() if not decodes(fmt)}
