"""DALI's CPU video decoder: VP8, VP9 and MJPEG only (DALI 2.4's bundled FFmpeg has no H.264, HEVC or AV1 decoder
since DALI 2.1.1): the decoder of CPU-only machines for VP9 shards (tools/build_shards.py --codec vp9); with shards
that also hold other codecs, those clips go to PyAV (dali_pipes/decoders/__init__.py)."""

from dali_pipes.decoders.base import DaliDecoder


class DaliCpuDecoder(DaliDecoder):
    name = "dali-cpu"
    formats = {"vp8": set(), "vp9": set(), "mjpeg": set()}
    dali_device = "cpu"
