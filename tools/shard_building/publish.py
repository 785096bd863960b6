"""A set built into --out s3://bucket/prefix (or gs://): built in a local staging folder as any set is, then
published. Commit-then-publish: the shards and indexes go up first, the manifest last, so a build killed while
uploading never lists a shard that is not there in full; the next run uploads what the store still lacks."""

import hashlib
import os
import tempfile

from dali_pipes.shard_format import MANIFEST


def staging_folder(location: str) -> str:
    """The default --staging of a store location: one folder per location under the system's temp folder."""
    return os.path.join(tempfile.gettempdir(), "mae_st_staging", hashlib.sha256(location.encode()).hexdigest()[:16])


def publish(store, staging: str, names: list[str]) -> tuple[int, int]:
    """Upload `names` from `staging` that the store lacks or holds at another size, then the manifest; returns (files
    uploaded, bytes)."""
    present = store.sizes()
    todo = [name for name in names if present.get(name) != os.path.getsize(os.path.join(staging, name))]
    for name in todo + [MANIFEST]:
        store.put(os.path.join(staging, name), name)
    files = todo + [MANIFEST]
    return len(files), sum(os.path.getsize(os.path.join(staging, name)) for name in files)
