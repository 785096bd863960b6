"""DALI's CPU video decoder: VP8, VP9 and MJPEG only (DALI 2.4's bundled FFmpeg has no H.264, HEVC or AV1 decoder
since DALI 2.1.1): the decoder of CPU-only machines for VP9 shards (tools/build_shards.py --codec vp9)."""

from dali_pipes.decoders.base import DaliDecoder
from dali_pipes.shard_format import CPU_DECODABLE


class DaliCpuDecoder(DaliDecoder):
    name = "dali-cpu"
    codecs = frozenset(CPU_DECODABLE)
    dali_device = "cpu"
