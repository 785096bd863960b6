"""Where one rank's stream of batches stands, as one value. Each set's shard reader advances its Cursor batch by
batch; the loader draws each batch from one set of its mixture (dali_pipes/mixture.py) and every Feed it hands on
carries the StreamCursor after its batch: all the sets' Cursors and the stream's batch count. The loader's state is
the StreamCursor of the last batch it handed out: resuming from it continues with the very next batch, same order.
"""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0  # of the next batch
    position: int = 0  # its number within the epoch
    # The DALI reader behind the stream: the epoch it was started at seeds its shuffle (each epoch after it draws a
    # fresh order), and its checkpoint after the previous batch resumes that shuffle exactly (None: a fresh reader).
    reader_start: int = 0
    reader_state: str | None = None
    # The position its first batch was given: 0, except after a resume on another layout of ranks, where a fresh
    # reader takes over in the middle of an epoch (and is replaced by a fresh one when that epoch ends).
    reader_offset: int = 0

    @property
    def reader_epochs(self) -> int:
        """Epochs the reader has finished (DALI moves each rank on to the next rank's part every epoch)."""
        return self.epoch - self.reader_start

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "Cursor":
        return cls(**state)

    @classmethod
    def fresh(cls, epoch: int, position: int = 0) -> "Cursor":
        """Batch `position` of `epoch`, read by a new reader started there with an order of its own."""
        return cls(epoch, position, reader_start=epoch, reader_offset=position)


@dataclass(frozen=True)
class StreamCursor:
    """Where a loader's stream of batches stands when it mixes sets (one set: the mixture of one): the stream's
    epoch and position (its batch count), and the Cursor of each set's reader. The loader's state is this value."""

    epoch: int = 0  # of the next batch of the stream: an epoch is as many batches as all the sets make
    position: int = 0  # its number within the epoch
    sets: tuple = (Cursor(),)  # per set, in the mixture's order: where its reader stands

    def after(self, index: int, cursor: Cursor, epoch_length: int) -> "StreamCursor":
        """The stream after a batch of set `index` that left its reader at `cursor`."""
        sets = self.sets[:index] + (cursor,) + self.sets[index + 1:]
        position = self.position + 1
        return StreamCursor(self.epoch + position // epoch_length, position % epoch_length, sets)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "sets": [c.as_dict() for c in self.sets]}

    @classmethod
    def from_dict(cls, state: dict) -> "StreamCursor":
        """A state saved before mixtures (a plain Cursor's) is the stream of its one set."""
        if "sets" not in state:
            cursor = Cursor.from_dict(state)
            return cls(cursor.epoch, cursor.position, (cursor,))
        return cls(state["epoch"], state["position"], tuple(Cursor.from_dict(c) for c in state["sets"]))
