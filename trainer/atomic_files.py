"""Writing a file so that a crash at any moment leaves either the old file or the whole new one, never half: write
beside it, flush it to disk, rename it over the old one (an atomic step on POSIX filesystems). Every file the
project writes whole goes through here: checkpoints, their `latest` pointer, exports, manifests, sidecars."""

import contextlib
import os


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """with atomic_file(path) as f: ... -- `path` appears, whole, when the block ends without an error."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the block failed: nothing half-written is left behind
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)
