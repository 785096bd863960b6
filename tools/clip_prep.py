"""One clip -> the bytes and facts a shard sample needs, or the reason it cannot be used.

Every clip is probed and test-decoded with PyAV before it is packed. `copy` keeps the source bytes after
demuxing every packet (a truncated file has fewer than its container declares) and decoding the first and the last
keyframe (`--verify fast`), or every frame (`--verify full`). Demuxing reads the whole file, so
copy stays close to the speed of reading it. The other codecs decode every frame anyway:
they resize to a short side and re-encode with a short keyframe interval so that a 16 x 4 clip can be decoded
without decoding the whole video.
"""

import io
from dataclasses import dataclass
from fractions import Fraction

import av

# stable codes for the manifest and the summary
SKIP_REASONS = {
    "missing": "file not found",
    "empty": "zero-length file",
    "not_a_video": "not a video container",
    "no_video_stream": "no video stream (audio-only?)",
    "unsupported_codec": "no decoder for its codec",
    "corrupt": "demuxing or decoding failed",
    "truncated": "fewer frames than the container declares",
    "too_short": "fewer frames than --min-frames",
    "encode_failed": "re-encoding failed",
    "crashed": "the decoder process died on it",
}

ENCODERS = {  # codec -> (PyAV encoder, pixel format, options): fast settings; the source was lossy already
    "h264": ("libx264", "yuv420p", {"preset": "veryfast", "crf": "23", "bf": "0"}),
    "vp9": ("libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "32", "b": "0"}),
    "mjpeg": ("mjpeg", "yuvj420p", {}),
}
CODECS = ("copy", *ENCODERS)

# first bytes of the containers we accept: a file that starts like one but fails to open is corrupt, not a non-video
_MAGIC = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (4, b"moov"), (4, b"mdat"), (4, b"free"))


class SkipClip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class PrepOptions:
    codec: str = "copy"
    short_side: int = 256  # 0 keeps the source size
    gop: int = 16  # keyframe interval of re-encoded clips, in frames
    min_frames: int = 16
    verify: str = "fast"  # copy mode: fast | full


@dataclass(frozen=True)
class Clip:
    data: bytes
    ext: str
    codec: str
    num_frames: int
    fps: float
    height: int
    width: int

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


def _container_ext(container) -> str:
    """The shard extension of a container family (DALI's reader matches outputs by extension)."""
    names = container.format.name.split(",")
    for family, ext in (("mp4", "mp4"), ("webm", "webm"), ("matroska", "mkv"), ("avi", "avi")):
        if family in names:
            return ext
    raise SkipClip("not_a_video", f"container {container.format.name!r} is not one of mp4/mov, webm, mkv, avi")


def _fps(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise SkipClip("corrupt", "no frame rate")
    return Fraction(rate).limit_denominator(1001)


def _check_length(decoded: int, declared: int, min_frames: int) -> None:
    if declared and decoded < declared - max(1, declared // 100):  # containers may over-declare by an edit-list frame
        raise SkipClip("truncated", f"{decoded} of {declared} frames")
    if decoded < min_frames:
        raise SkipClip("too_short", f"{decoded} frames")


def _verify_copy(data: bytes, options: PrepOptions) -> Clip:
    container, stream = _open(data)
    with container:
        ext, fps, declared, ctx = _container_ext(container), _fps(stream), stream.frames, stream.codec_context
        try:
            packets = [p for p in container.demux(stream) if p.size]
            _check_length(len(packets), declared, options.min_frames)
            if options.verify == "full":
                test = packets
            else:  # the first and the last keyframe decode on their own: bad headers and broken ends, cheaply
                keys = [p for p in packets if p.is_keyframe] or packets[:1]
                test = keys[:1] + keys[-1:] if len(keys) > 1 else keys
            decoded = sum(len(ctx.decode(p)) for p in test) + len(ctx.decode(None))
        except av.error.DecoderNotFoundError as err:
            raise SkipClip("unsupported_codec", str(err)) from None
        except av.error.FFmpegError as err:
            raise SkipClip("corrupt", str(err)) from None
        if decoded < len(test) - 1:  # a decoder may drop one frame at a cut
            raise SkipClip("corrupt", f"decoded {decoded} of {len(test)} test frames")
        return Clip(data, ext, ctx.name, len(packets), float(fps), ctx.height, ctx.width)


def _resized(width: int, height: int, short_side: int) -> tuple[int, int]:
    if not short_side:
        return width - width % 2, height - height % 2
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _reencode(data: bytes, options: PrepOptions) -> Clip:
    container, stream = _open(data)
    encoder, pix_fmt, encoder_options = ENCODERS[options.codec]
    with container:
        fps, declared = _fps(stream), stream.frames
        width, height = _resized(stream.codec_context.width, stream.codec_context.height, options.short_side)
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as output:
            out = output.add_stream(encoder, rate=fps)
            out.width, out.height, out.pix_fmt = width, height, pix_fmt
            out.codec_context.gop_size = options.gop
            out.codec_context.thread_count = 1
            out.options = dict(encoder_options)
            count = 0
            try:
                for frame in container.decode(stream):
                    frame = frame.reformat(width=width, height=height, format=pix_fmt)
                    frame.pts, frame.time_base = count, 1 / fps
                    output.mux(out.encode(frame))
                    count += 1
            except av.error.DecoderNotFoundError as err:
                raise SkipClip("unsupported_codec", str(err)) from None
            except av.error.FFmpegError as err:
                raise SkipClip("corrupt", f"after {count} frames: {err}") from None
            _check_length(count, declared, options.min_frames)
            try:
                output.mux(out.encode(None))
            except av.error.FFmpegError as err:
                raise SkipClip("encode_failed", str(err)) from None
    return Clip(buffer.getvalue(), "mp4", options.codec, count, float(fps), height, width)


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
        return _verify_copy(data, options)
    return _reencode(data, options)
