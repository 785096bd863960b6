"""Where one rank's stream of batches stands, as one value. The shard reader advances it batch by batch, every Feed
carries the cursor after its batch, and the loader's state is the cursor of the last batch it handed out: resuming
from it continues with the very next batch, in the same order.
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
