"""What a video decoder is to the loader. Two kinds, by where the frames come from:

- a DALI decoder decodes inside the views pipeline: the pipeline receives the encoded clip and the frame indices,
  and the decoder adds the operator that turns them into frames (on the GPU with NVDEC, or on the CPU);
- a host decoder decodes in the loader's reading thread, before DALI (PyAV, or any Python library): the pipeline
  then receives the frames, uint8 [F, H, W, 3], and only makes the views.
A decoder says which codecs it reads (None: whatever FFmpeg reads) and whether it needs a GPU; dali_pipes/decoders/
__init__.py chooses one for a shard set. Frame `i` always means the i-th frame that decodes (the shard builder's
count), and indices arrive ascending; past the last frame, a decoder repeats it.
"""


class UndecodableVideo(Exception):
    """A host decoder could not decode this clip (the loader replaces it by a good clip of the same batch)."""


class Decoder:
    name: str = ""
    codecs: frozenset | None = None  # the codecs it reads, as the shard builder names them; None: anything
    needs_gpu: bool = False
    decodes_in_dali: bool = True  # False: a host decoder (frames())

    def reads(self, codecs) -> list[str]:
        """The codecs among `codecs` it cannot read."""
        return [] if self.codecs is None else sorted(set(codecs) - self.codecs)

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
