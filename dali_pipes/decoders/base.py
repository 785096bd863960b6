"""What a video decoder is to the loader. Two kinds, by where the frames come from:

- a DALI decoder decodes inside the views pipeline: the pipeline receives the encoded clip and the frame indices,
  and the decoder adds the operator that turns them into frames (on the GPU with NVDEC, or on the CPU);
- a host decoder decodes in the loader's reading thread, before DALI (PyAV, or any Python library): the pipeline
  then receives the frames, uint8 [F, H, W, 3], and only makes the views.
A decoder says which formats it reads and whether it needs a GPU; dali_pipes/decoders/__init__.py routes each
format of a shard set to one. Formats are named as the shard builder records them: "codec/pix_fmt" ("h264/yuv420p";
"h264" alone when the pixel format is not known). Frame `i` always means the i-th frame that decodes (the shard
builder's count), and indices arrive ascending; past the last frame, a decoder repeats it.
"""


class UndecodableVideo(Exception):
    """A host decoder could not decode this clip (the loader replaces it by a good clip of the same batch)."""


def split_format(fmt: str) -> tuple[str, str]:
    """"h264/yuv420p" -> ("h264", "yuv420p"); "h264" -> ("h264", "")."""
    codec, _, pix_fmt = fmt.partition("/")
    return codec, pix_fmt


class Decoder:
    name: str = ""
    # codec -> the pixel formats it reads (an empty set: any); None: whatever FFmpeg reads
    formats: dict | None = None
    needs_gpu: bool = False
    decodes_in_dali: bool = True  # False: a host decoder (frames())

    def can_read(self, fmt: str) -> bool:
        """Whether it decodes clips of format `fmt` ("codec/pix_fmt", or "codec" when the pixel format is unknown)."""
        if self.formats is None:
            return True
        codec, pix_fmt = split_format(fmt)
        return codec in self.formats and (not pix_fmt or not self.formats[codec] or pix_fmt in self.formats[codec])

    def unreadable(self, formats) -> dict:
        """The {format: clips} of `formats` (a dict, or any iterable of names) it cannot decode."""
        counts = formats if isinstance(formats, dict) else dict.fromkeys(formats, 0)
        return {fmt: n for fmt, n in counts.items() if not self.can_read(fmt)}

    def dali_node(self, encoded, frames):
        """DALI decoders: the operator decoding `encoded` (uint8 bytes) at `frames` (int32 [F]) inside a pipeline,
        uint8 [F, H, W, 3] out."""
        raise NotImplementedError(f"{self.name} decodes on the host, before the pipeline")

    def frames(self, encoded, indices):
        """Host decoders: the frames `indices` (ascending) of an encoded clip as uint8 [F, H, W, 3]; raises
        UndecodableVideo for a clip it cannot read."""
        raise NotImplementedError(f"{self.name} decodes inside the DALI pipeline")

    def __repr__(self) -> str:
        return self.name


class DaliDecoder(Decoder):
    """DALI's video decoder on `dali_device` ('mixed': NVDEC, or 'cpu')."""

    dali_device = "cpu"

    def dali_node(self, encoded, frames):
        from nvidia.dali import fn

        # pad_mode edge: a frame past the last one DALI counts repeats the last frame (the default pads black)
        return fn.decoders.video(encoded, device=self.dali_device, frames=frames, pad_mode="edge")


class HostDecoder(Decoder):
    decodes_in_dali = False
