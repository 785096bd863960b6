"""NVDEC through DALI's 'mixed' video decoder: the GPU's own video engines decode, the SMs stay free for the model.

What NVDEC decodes depends on the GPU's generation (NVIDIA Video Codec SDK 13.0, NVDEC application note, table
"NVDEC Hardware Capabilities"), told here by CUDA compute capability:
- all generations here (Pascal on): H.264 Baseline/Main/High, 8-bit 4:2:0 (no High 10, 4:2:2 or 4:4:4); HEVC Main and
  Main 10 at 4:2:0 (12-bit too, SDK decode matrix); VP9 profile 0 (and 10/12-bit 4:2:0); VP8; MPEG-4 part 2;
- from Turing on (Turing 7.5, GA100 8.0, Hopper 9.0 ...): HEVC 4:4:4;
- AV1 Main (8 and 10-bit 4:2:0) only on GA10x (every Ampere GPU but GA100: A10, A40, RTX 30, Jetson Orin: 8.6,
  8.7), Ada (L4, L40, RTX 40: 8.9) and Blackwell (10.x and newer). NOT on A100 (GA100) nor H100/H200 (Hopper): their
  column says N. An AV1 clip in a shard set on those GPUs decodes on the host instead (the loader routes it).
- Blackwell adds H.264 High 10 / High 4:2:2 and HEVC Main 4:2:2 10/12.
No JPEG: MJPEG is not in NVDEC's table (JPEG is another engine's, NVJPG), though DALI's documentation lists it for
the 'mixed' video decoder: MJPEG clips decode on the host.
What DALI makes of NVDEC narrows it further: its 'mixed' video decoder creates every NVDEC decoder with NV12 output
surfaces (DALI 2.4, operators/video/frames_decoder_gpu.cc: CUVIDDECODECREATEINFO.OutputFormat left at 0, NV12) and
converts them as 8-bit 4:2:0. A 4:2:2 or 4:4:4 stream has no NV12 surface (cuvidGetDecoderCaps' nOutputFormatMask),
so those decode on the host too, on every GPU. 10- and 12-bit 4:2:0 (HEVC Main 10, VP9 profile 2) stay on NVDEC,
unproven: the preflight's NVDEC check decodes a probe at the shards' own pixel format.
"""

from dali_pipes.decoders.base import DaliDecoder

_420 = {"yuv420p", "yuvj420p"}
_HIGH_DEPTH_420 = {"yuv420p10le", "yuv420p12le"}
_444 = {"yuv444p", "yuvj444p", "yuv444p10le", "yuv444p12le"}
EVERY_GENERATION = {
    "h264": _420,
    "hevc": _420 | _HIGH_DEPTH_420,
    "vp9": {"yuv420p"} | _HIGH_DEPTH_420,
    "vp8": {"yuv420p"},
    "mpeg4": {"yuv420p"},
}
AV1 = {"av1": {"yuv420p", "yuv420p10le"}}
DALI_SURFACES = _420 | _HIGH_DEPTH_420  # what DALI's NV12 decoders take: 4:2:0 (module docstring)
# The smallest frame (width, height) NVDEC decodes per codec: NVDEC Video Decoder API Programming Guide (Video Codec
# SDK), "Video Decoder Capabilities" table. DALI asks the driver (cuvidGetDecoderCaps nMinWidth / nMinHeight) and
# refuses a smaller clip: "Video is too small in at least one dimension".
MIN_FRAME = {"h264": (48, 16), "hevc": (144, 144), "vp9": (128, 128), "av1": (128, 128), "vp8": (48, 16),
             "mpeg4": (48, 16)}
BLACKWELL_ADDS = {"h264": {"yuv420p10le", "yuv422p", "yuvj422p", "yuv422p10le"},
                  "hevc": {"yuv422p", "yuv422p10le", "yuv422p12le"}}


def generation(capability: tuple[int, int]) -> str:
    """The NVDEC generation of a GPU of CUDA compute capability (major, minor), as the application note names it."""
    major, minor = capability
    if major >= 10:
        return "Blackwell"
    if major == 9:
        return "Hopper"
    if major == 8:
        return "GA100" if minor == 0 else ("Ada" if minor == 9 else "GA10x")
    if (major, minor) == (7, 5):
        return "Turing"
    return "Volta" if major == 7 else "Pascal or older"


def nvdec_formats(capability: tuple[int, int]) -> dict:
    """codec -> the pixel formats NVDEC's hardware decodes on a GPU of this compute capability."""
    gen = generation(capability)
    formats = {codec: set(fmts) for codec, fmts in EVERY_GENERATION.items()}
    if gen not in ("Volta", "Pascal or older"):
        formats["hevc"] |= _444
    if gen in ("GA10x", "Ada", "Blackwell"):
        formats.update({codec: set(fmts) for codec, fmts in AV1.items()})
    if gen == "Blackwell":
        for codec, fmts in BLACKWELL_ADDS.items():
            formats[codec] |= fmts
    return formats


class NvdecDecoder(DaliDecoder):
    name = "dali-gpu"
    needs_gpu = True
    dali_device = "mixed"

    def __init__(self, capability: tuple[int, int] = (9, 0)):
        self.capability = tuple(capability)
        self.formats = {codec: fmts & DALI_SURFACES for codec, fmts in nvdec_formats(self.capability).items()}

    @property
    def gpu(self) -> str:
        return f"{generation(self.capability)} GPU (compute capability {self.capability[0]}.{self.capability[1]})"
