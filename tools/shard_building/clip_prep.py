"""One clip -> the bytes and facts a shard sample needs, or the reason it cannot be used.

Every clip is probed and test-decoded with PyAV before it is packed, and the facts recorded are those of the stored
bytes as a decoder sees them (dali_pipes/shard_format.py). `copy` keeps the source bytes after demuxing every packet
(a truncated file has fewer than its container declares) and decoding the first and the last keyframe
(`--verify fast`), or every frame (`--verify full`). Demuxing reads the whole file, so copy stays close to the speed
of reading it. The other codecs decode every frame anyway: they turn rotated clips upright, resize to a short side
and re-encode with a short keyframe interval so that a 16 x 4 clip can be decoded without decoding the whole video.

Packets before the first keyframe (in decode order), and an open GOP's leading pictures after it that are displayed
before it, reference frames the file does not hold: a clip cut out of a longer video without re-encoding. No decoder
can produce them, and each fails its own way (DALI's CPU decoder and PyAV's VP9 stop with an error, PyAV's H.264 and
HEVC skip them so that frame numbers shift), so both modes drop them: copy remuxes the rest without re-encoding, and
frame 0 is the first frame that every decoder produces.
"""

import io
import itertools
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

# stable codes for the manifest and the summary
SKIP_REASONS = {
    "missing": "file not found",
    "empty": "zero-length file",
    "not_a_video": "not a video container",
    "no_video_stream": "no video stream (audio-only?)",
    "unsupported_codec": "no decoder for its codec",
    "corrupt": "demuxing or decoding failed",
    "truncated": "the file is cut short (fewer packets than its container declares)",
    "too_short": "fewer decodable frames than --min-frames",
    "encode_failed": "re-encoding failed",
    "crashed": "the decoder process died on it",
}

ENCODERS = {  # codec -> (PyAV encoder, pixel format, options): fast settings; the source was lossy already
    "h264": ("libx264", "yuv420p", {"preset": "veryfast", "crf": "23", "bf": "0"}),
    # cpu-used -8: a fixed speed; at +8 libvpx's realtime mode adapts its speed to how long encoding takes, and two
    # builds of the same clips came out different when the machine was busy (seen with --workers 2)
    "vp9": ("libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "-8", "row-mt": "1", "crf": "32", "b": "0"}),
    "mjpeg": ("mjpeg", "yuvj420p", {}),
}
CODECS = ("copy", *ENCODERS)

# first bytes of the containers we accept: a file that starts like one but fails to open is corrupt, not a non-video
_MAGIC = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (4, b"moov"), (4, b"mdat"), (4, b"free"))
MUXERS = {"mp4": "mp4", "mov": "mov", "webm": "webm", "mkv": "matroska", "avi": "avi"}  # shard extension -> muxer


class SkipClip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class PrepOptions:
    codec: str = "copy"
    short_side: int = 256  # 0 keeps the source size
    gop: int = 16  # keyframe interval of re-encoded clips, in frames
    min_frames: int = 1  # the loader repeats a short clip's last frame, as mae_st / SlowFast do
    verify: str = "fast"  # copy mode: fast | full


@dataclass(frozen=True)
class Clip:
    data: bytes
    ext: str
    num_frames: int  # frames that decode
    fps: float
    rotation: int  # degrees clockwise that turn a stored frame upright
    codec: str  # the codec's canonical name (av1), not its FFmpeg decoder's (libdav1d)
    height: int  # of the stored frame, as decoded
    width: int
    pix_fmt: str | None
    profile: str | None

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0


def _mp4_cut_short(data: bytes) -> bool:
    """True if an mp4's top-level boxes run past the end of the file: a download cut off before its index."""
    if data[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return False
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        if size == 1:  # 64-bit size follows the type
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        if size < 8:  # 0 means "to the end of the file"; anything else small is not a box walk we understand
            return False
        pos += size
    return pos > len(data)


def _ebml_doctype(data: bytes) -> bytes:
    """The DocType of a Matroska file's EBML header: b"webm" or b"matroska" (RFC 8794: element 0x4282 in the header
    element 0x1A45DFA3; IDs and sizes are variable-length integers whose leading zero bits give their length)."""
    def vint(pos):  # (value without its length marker, position after it)
        width = 9 - data[pos].bit_length()
        return int.from_bytes(bytes([data[pos] & (0xFF >> width)]) + data[pos + 1:pos + width], "big"), pos + width

    try:
        size, pos = vint(4)
        end = pos + size
        while pos < end:
            element = data[pos:pos + 9 - data[pos].bit_length()]
            size, start = vint(pos + len(element))
            if element == b"\x42\x82":
                return data[start:start + size]
            pos = start + size
    except IndexError:  # a header cut short
        pass
    return b""


def _open(data: bytes):
    try:
        container = av.open(io.BytesIO(data))
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        if _mp4_cut_short(data):
            raise SkipClip("truncated", "the file ends inside an mp4 box") from None
        looks_like_video = any(data[at:at + len(magic)] == magic for at, magic in _MAGIC)
        raise SkipClip("corrupt" if looks_like_video else "not_a_video", str(err)) from None
    if not container.streams.video:
        container.close()
        raise SkipClip("no_video_stream", f"streams: {[s.type for s in container.streams]}")
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.name:
        container.close()
        raise SkipClip("unsupported_codec", "unknown codec")
    stream.codec_context.thread_count = 1  # one clip per worker process; the processes use the cores
    return container, stream


def _container_ext(container, data: bytes) -> str:
    """The shard extension that names the container truly (DALI's reader matches outputs by extension): FFmpeg has
    one demuxer for mp4 and QuickTime (ftyp major brand "qt  ") and one for Matroska and its WebM subset."""
    names = container.format.name.split(",")
    if "mp4" in names:
        return "mov" if data[4:12] == b"ftypqt  " else "mp4"
    if "matroska" in names:
        return "webm" if _ebml_doctype(data) == b"webm" else "mkv"
    if "avi" in names:
        return "avi"
    raise SkipClip("not_a_video", f"container {container.format.name!r} is not one of mp4/mov, webm/mkv, avi")


def _fps(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise SkipClip("corrupt", "no frame rate")
    return Fraction(rate).limit_denominator(1001)


def _stream_facts(stream) -> dict:
    ctx = stream.codec_context
    return {"codec": ctx.codec.canonical_name, "height": ctx.height, "width": ctx.width, "pix_fmt": ctx.pix_fmt,
            "profile": stream.profile}


def _rotation(frame) -> int:
    """Degrees clockwise that turn a decoded frame upright. PyAV's VideoFrame.rotation is FFmpeg's display-matrix
    angle, counter-clockwise: a phone's portrait clip reads -90, and FFmpeg's player turns it 90 degrees clockwise."""
    return round(-frame.rotation / 90) % 4 * 90


def _decodable_packets(container, stream) -> tuple[list, int]:
    """The video packets (decode order) from the first keyframe on, less those displayed before it (an open GOP's
    leading pictures, which reference the group before it), and how many were left out."""
    try:
        packets = [p for p in container.demux(stream) if p.size]
    except av.error.FFmpegError as err:
        raise SkipClip("corrupt", str(err)) from None
    declared = stream.frames
    if declared and len(packets) < declared - max(1, declared // 100):  # containers may over-declare by a frame
        raise SkipClip("truncated", f"{len(packets)} of {declared} frames")
    lead = next((i for i, p in enumerate(packets) if p.is_keyframe), 0)
    key = packets[lead].pts if packets else None
    kept = [p for p in packets[lead:] if key is None or p.pts is None or p.pts >= key]
    return kept, len(packets) - len(kept)


def _decode(ctx, packets):
    """The frames of `packets`, then those the decoder still holds."""
    for packet in [*packets, None]:
        yield from ctx.decode(packet)


def _check_min_frames(count: int, min_frames: int) -> None:
    if count < min_frames:
        raise SkipClip("too_short", f"{count} frames")


def _remux(stream, packets, muxer: str) -> bytes:
    """`packets` in a file of their own, not re-encoded: the first frame shown at 0, and decode times evenly spaced
    again (packets left out leave gaps in them, which an mp4 muxer turns into long frames and a wrong frame rate)."""
    if any(p.pts is None for p in packets):
        raise SkipClip("corrupt", "packets without a presentation time in a clip to remux")
    shown = sorted(p.pts for p in packets)
    delay = max(at - p.pts for at, p in zip(shown, packets))  # no frame decoded after it is shown
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer) as output:
        out = output.add_stream_from_template(stream, opaque=True)  # the decoder's codec: no encoder needed
        for packet, at in zip(packets, shown):
            packet.pts, packet.dts = packet.pts - shown[0], at - delay - shown[0]
            packet.stream = out
            output.mux(packet)
    return buffer.getvalue()


def _copy(data: bytes, options: PrepOptions) -> Clip:
    container, stream = _open(data)
    with container:
        ext, fps = _container_ext(container, data), _fps(stream)
        packets, left_out = _decodable_packets(container, stream)
        if options.verify == "full":
            test = packets
        else:  # the first and the last keyframe decode on their own: bad headers and broken ends, cheaply
            keys = [p for p in packets if p.is_keyframe] or packets[:1]
            test = keys[:1] + keys[-1:] if len(keys) > 1 else keys
        try:
            frames = _decode(stream.codec_context, test)
            first = next(frames, None)
            decoded = (first is not None) + sum(1 for _ in frames)
            if left_out:
                data = _remux(stream, packets, MUXERS[ext])
        except av.error.DecoderNotFoundError as err:
            raise SkipClip("unsupported_codec", str(err)) from None
        except av.error.FFmpegError as err:
            raise SkipClip("corrupt", str(err)) from None
        if decoded < len(test) - 1:  # a decoder may drop one frame at a cut
            raise SkipClip("corrupt", f"decoded {decoded} of {len(test)} test frames")
        _check_min_frames(len(packets), options.min_frames)
        rotation = _rotation(first) if first else 0
        return Clip(data, ext, len(packets), float(fps), rotation, **_stream_facts(stream))


def _resized(width: int, height: int, short_side: int) -> tuple[int, int]:
    if not short_side:
        return width - width % 2, height - height % 2
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _upright(frame, rotation: int):
    """The frame turned `rotation` degrees clockwise (np.rot90 turns counter-clockwise); rotated clips are rare."""
    pixels = np.rot90(frame.to_ndarray(format="rgb24"), -rotation // 90)
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")


def _reencode(data: bytes, options: PrepOptions) -> Clip:
    container, stream = _open(data)
    encoder, pix_fmt, encoder_options = ENCODERS[options.codec]
    with container:
        fps = _fps(stream)
        frames = _decode(stream.codec_context, _decodable_packets(container, stream)[0])
        count = 0
        try:
            first = next(frames, None)
            if first is None:
                raise SkipClip("corrupt", "no frame decodes")
            rotation = _rotation(first)
            size = (first.height, first.width) if rotation % 180 else (first.width, first.height)
            width, height = _resized(*size, options.short_side)
            buffer = io.BytesIO()
            with av.open(buffer, "w", format="mp4") as output:
                out = output.add_stream(encoder, rate=fps)
                out.width, out.height, out.pix_fmt = width, height, pix_fmt
                out.codec_context.gop_size = options.gop
                out.codec_context.thread_count = 1
                out.options = dict(encoder_options)
                for frame in itertools.chain([first], frames):
                    if rotation:
                        frame = _upright(frame, rotation)
                    frame = frame.reformat(width=width, height=height, format=pix_fmt)
                    frame.pts, frame.time_base = count, 1 / fps
                    output.mux(out.encode(frame))
                    count += 1
                _check_min_frames(count, options.min_frames)
                try:
                    output.mux(out.encode(None))
                except av.error.FFmpegError as err:
                    raise SkipClip("encode_failed", str(err)) from None
        except av.error.DecoderNotFoundError as err:
            raise SkipClip("unsupported_codec", str(err)) from None
        except av.error.FFmpegError as err:
            raise SkipClip("corrupt", f"after {count} frames: {err}") from None
    with av.open(io.BytesIO(buffer.getvalue())) as stored:  # its profile is known once encoded
        return Clip(buffer.getvalue(), "mp4", count, float(fps), 0, **_stream_facts(stored.streams.video[0]))


def prepare_clip(path: str | None, options: PrepOptions) -> Clip:
    """The clip at `path` ready to pack, or SkipClip with the reason."""
    if path is None:
        raise SkipClip("missing", "not in the video folder")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SkipClip("missing", path) from None
    if not data:
        raise SkipClip("empty")
    if options.codec == "copy":
        return _copy(data, options)
    return _reencode(data, options)
