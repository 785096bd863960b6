"""PyAV (FFmpeg) on the host: the CPU path for codecs DALI 2.4 decodes only on a GPU (H.264, HEVC, AV1, MPEG-4),
and where a shard set holds formats the GPU's NVDEC does not decode (AV1 on A100 and H100, H.264 4:4:4, ...), the
decoder of those clips. Seeks to the keyframe before the first needed frame and stops after the last one; the
loader decodes a batch's clips in parallel threads."""

import io

import av
import numpy as np

from dali_pipes.decoders.base import HostDecoder, UndecodableVideo


def decode_frames(data: np.ndarray | bytes, indices: np.ndarray) -> np.ndarray:
    """Frames `indices` (ascending, repeats allowed) of an encoded video as uint8 [F, H, W, 3] RGB."""
    wanted = {int(i) for i in indices}
    first, last = int(indices[0]), int(indices[-1])
    got = {}
    try:
        with av.open(io.BytesIO(memoryview(data))) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # the loader decodes a batch's clips in parallel instead
            fps, time_base, origin = float(stream.average_rate or stream.guessed_rate), stream.time_base, \
                stream.start_time or 0
            if first > 0:
                container.seek(origin + int(first / fps / time_base), stream=stream, backward=True)
            for count, frame in enumerate(container.decode(stream)):
                index = count if frame.pts is None else round(float((frame.pts - origin) * time_base) * fps)
                if index in wanted:
                    got[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
    except (av.error.FFmpegError, IndexError, ZeroDivisionError) as err:
        raise UndecodableVideo(str(err)) from None
    if not got:
        raise UndecodableVideo(f"none of frames {first}..{last} decoded")
    decoded = sorted(got)  # a frame the stream lacks (variable rate, short tail) takes its nearest decoded one
    nearest = [decoded[min(np.searchsorted(decoded, i), len(decoded) - 1)] for i in indices]
    return np.stack([got[i] for i in nearest])


class PyAVDecoder(HostDecoder):
    name = "pyav"

    def frames(self, encoded, indices):
        return decode_frames(encoded, indices)
