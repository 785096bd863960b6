"""DALI's per-view outputs -> the torch batch the model takes: every view of every part of a batch copied straight
into its slice of one tensor on the device, laid out as the views say (view-major for training, clip-major with each
row's video index for testing), the labels alongside."""

import weakref

import torch
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type


class BatchAssembler:
    def __init__(self, config):
        self.device, self.dtype, self.layout = config.device, config.dtype, config.views.layout
        self.views_per_clip = config.views.views_per_clip
        self._buffers, self._turn = [(None, lambda: None)] * 2, 0  # (buffer, the batch tensor made from it)

    def _output_buffer(self, shape, dtype) -> torch.Tensor:
        """Two output buffers used in turn: a fresh 40 MB tensor per batch costs more in page faults than the copy
        into it (CPU, measured: 14.6 ms against 2.5 ms). A buffer whose last batch is still referenced (someone
        kept it, e.g. list(loader)) is left to its holder and replaced."""
        self._turn = 1 - self._turn
        buffer, handed_out = self._buffers[self._turn]
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or handed_out() is not None:
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
        return buffer

    def __call__(self, feed, parts: list) -> dict:
        """The batch of `feed` from [(slice of the batch, its views: R DALI TensorLists)]."""
        first = parts[0][1][0].as_tensor()  # [b, C, T, S, S]
        views_per_clip = self.views_per_clip
        out = self._output_buffer((views_per_clip, len(feed.data), *first.shape()[1:]), to_torch_type[first.dtype])
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for part, views in parts:
            for v, view in enumerate(views):
                feed_ndarray(view.as_tensor(), out[v, part], cuda_stream=stream)
        labels = torch.from_numpy(feed.labels)
        if self.device.type == "cuda":  # from pinned memory, without blocking the host
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        if self.layout == "view-major":  # row v * B + b is view v of clip b
            video = out.flatten(0, 1).to(self.dtype)
            self._buffers[self._turn] = (out, weakref.ref(video))
            return {"video": video, "label": labels.repeat(views_per_clip)}
        # clip-major: a video's views together, sharing its index; the padding at the end of an epoch keeps its
        # place (every rank runs the same forward passes, which ZeRO-3 needs) with index -1. Each row also says which
        # video it is (the sample's name in its shard) and the first frame its view starts at (what an index of
        # extracted features records)
        video = out.transpose(0, 1).flatten(0, 1).to(self.dtype)
        index = torch.from_numpy(feed.indices).to(self.device)
        starts = [int(plan.frames[order[0]]) for plan in feed.plans for order in plan.orders]
        return {"video": video, "label": labels.repeat_interleave(views_per_clip),
                "video_index": index.repeat_interleave(views_per_clip),
                "name": [name for name in feed.names for _ in range(views_per_clip)],
                "start_frame": torch.tensor(starts)}
