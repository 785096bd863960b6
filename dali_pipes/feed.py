"""One batch on its way from the reading thread to the views pipeline, and the names of the pipeline's inputs (the
external sources views_pipeline.py declares and Feed.inputs fills, defined here once)."""

from dataclasses import dataclass, replace

import numpy as np


class Inputs:
    """External-source names of the views pipeline; per-view ones take the view's number."""

    DATA = "data"  # the encoded clip (DALI decoders), or its decoded frames uint8 [F, H, W, 3] (host decoders)
    FRAMES = "frames"  # int32 [F]: the frames to decode, ascending (DALI decoders only)
    ROTATE, ANGLE = "rotate", "angle"  # bool, float32: turn the finished views by `angle` degrees (phone videos)

    @staticmethod
    def order(v: int) -> str:  # int32 [T]: view v's frames as positions into FRAMES (absent with shared frames)
        return f"order{v}"

    @staticmethod
    def roi_start(v: int) -> str:  # float32 [2]: view v's crop, (y, x) relative to the stored frame
        return f"roi_start{v}"

    @staticmethod
    def roi_end(v: int) -> str:
        return f"roi_end{v}"

    @staticmethod
    def antialias(v: int) -> str:  # bool: the crop shrinks enough to alias
        return f"antialias{v}"

    @staticmethod
    def flip(v: int) -> str:  # int32: mirror view v
        return f"flip{v}"


@dataclass
class Feed:
    epoch: int
    position: int  # batch number within the epoch
    data: list  # per sample: encoded bytes, or decoded frames (host decoders)
    plans: list  # per sample: sampling.SamplePlan
    labels: np.ndarray  # int64 [B]
    names: list  # per sample: 'shard.tar:offset:key.ext'
    real: int  # samples that are not epoch padding (the first `real` ones)
    reader_state: str  # DALI reader checkpoint right after this batch was read

    def inputs(self, decoded: bool, shared_frames: bool, indices=None) -> dict:
        """Input name -> per-sample arrays, for all samples or those at `indices`; `decoded`: data holds frames."""
        picks = range(len(self.data)) if indices is None else indices
        plans = [self.plans[i] for i in picks]
        fed = {Inputs.DATA: [self.data[i] for i in picks], Inputs.ROTATE: [np.array(p.rotation != 0) for p in plans],
               Inputs.ANGLE: [np.array(-p.rotation, np.float32) for p in plans]}  # DALI turns counter-clockwise
        if not decoded:
            fed[Inputs.FRAMES] = [p.frames for p in plans]
        for v in range(len(plans[0].boxes)):
            if not shared_frames:
                fed[Inputs.order(v)] = [p.orders[v] for p in plans]
            fed[Inputs.roi_start(v)] = [p.boxes[v][:2] for p in plans]
            fed[Inputs.roi_end(v)] = [p.boxes[v][2:] for p in plans]
            fed[Inputs.antialias(v)] = [np.array(p.antialias[v]) for p in plans]
            fed[Inputs.flip(v)] = [np.array(p.flips[v], np.int32) for p in plans]
        return fed

    def substitute(self, bad: list, good: list) -> "Feed":
        """This batch with each bad sample replaced by a good one (cycling), labels and names included."""
        data, plans, labels, names = list(self.data), list(self.plans), self.labels.copy(), list(self.names)
        for k, i in enumerate(bad):
            j = good[k % len(good)]
            data[i], plans[i], labels[i], names[i] = data[j], plans[j], labels[j], names[j]
        return replace(self, data=data, plans=plans, labels=labels, names=names)
