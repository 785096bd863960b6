"""One batch on its way from the reading thread to the views pipelines: each clip's data (encoded, or the frames a
host decoder made of it), its plan, label and name, and the cursor after the batch (its set reader's Cursor as the
reading thread makes it, the loader's StreamCursor once the mixture has drawn it).

A Feed is always ordered: clips that reach the pipelines encoded (a DALI decoder reads them) come first, decoded ones
after (it puts itself in that order when made), so that each kind is one contiguous part of the batch, run by the
views pipeline of its kind (views_pipeline.Lane) and written into its slice of the torch batch.
"""

from dataclasses import dataclass, replace

import numpy as np

from dali_pipes.cursor import Cursor, StreamCursor


@dataclass
class Feed:
    epoch: int
    position: int  # batch number within the epoch
    data: list  # per clip: encoded bytes, frames uint8 [F, H, W, 3] from a host decoder, or the error it raised
    decoded: np.ndarray  # bool [B]: data holds frames (or a host decoder's error)
    plans: list  # per clip: sampling.SamplePlan
    labels: np.ndarray  # int64 [B]
    names: list  # per clip: 'shard.tar:offset:key.ext'
    indices: np.ndarray  # int64 [B]: the clip's number in this rank's epoch, -1 for the epoch's padding
    cursor: Cursor | StreamCursor  # where the stream stands after this batch

    def __post_init__(self):
        """Encoded clips first, a stable order (a no-op for a batch already in it)."""
        order = np.argsort(self.decoded, kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            self.data, self.decoded = [self.data[i] for i in order], self.decoded[order]
            self.plans, self.labels = [self.plans[i] for i in order], self.labels[order]
            self.names, self.indices = [self.names[i] for i in order], self.indices[order]

    def parts(self) -> dict:
        """{kind: slice of the batch} for the kinds present."""
        encoded = int((~self.decoded).sum())
        found = {"encoded": slice(0, encoded), "decoded": slice(encoded, len(self.data))}
        return {kind: part for kind, part in found.items() if part.stop > part.start}

    def failed_on_host(self) -> list[int]:
        """Clips a host decoder could not decode."""
        return [i for i, data in enumerate(self.data) if isinstance(data, Exception)]

    def substitute(self, bad: list, good: list) -> "Feed":
        """This batch with each bad clip replaced by a good one (cycling), everything about it included."""
        picks = np.arange(len(self.data))
        for k, i in enumerate(bad):
            picks[i] = good[k % len(good)]
        return replace(self, data=[self.data[j] for j in picks], decoded=self.decoded[picks],
                       plans=[self.plans[j] for j in picks], labels=self.labels[picks],
                       names=[self.names[j] for j in picks], indices=self.indices[picks])
