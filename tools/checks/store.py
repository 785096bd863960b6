"""The preflight's "shard store" check, for a set in object storage or on an http(s) server: the store answers,
takes the credentials, holds every shard and index of the training split at the manifest's size (the same check
the loader makes when it opens the set, which also fills the node cache the run then reads), and one stream reads
a shard at a measured rate."""

import time

from dali_pipes.shard_set import open_shard_set
from dali_pipes.shard_store import LocalStore, StoreRefused, open_store
from tools.checks.report import FAIL, PASS, SKIP, Check


FIX = ("fix what it names: credentials and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, "
       "AWS_ENDPOINT_URL; a missing or short object: publish the set again with tools/build_shards.py --out")


def check_store(data: str, split: str) -> Check:
    store = open_store(data)
    if isinstance(store, LocalStore):
        return Check("shard store", SKIP, "a local folder (the loader checks its shards when it opens them)")
    try:
        shards = open_shard_set(data, split)
    except (StoreRefused, FileNotFoundError, ValueError) as err:
        return Check("shard store", FAIL, str(err), FIX)
    name = shards.tars[0].rsplit("/", 1)[-1]
    start = time.perf_counter()
    with store.open(name) as stream:
        size = sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 20), b""))
    rate = size / 1e6 / max(time.perf_counter() - start, 1e-9)
    summary = (f"{len(shards.tars)} {split} shards and their indexes present at their sizes in {data}; one stream "
               f"read {name} ({size / 1e6:.1f} MB) at {rate:.1f} MB/s; DALI reads "
               + ("it from the store (too large for the node cache)" if shards.streamed else "the node cache's copy"))
    return Check("shard store", PASS, summary, figures={"shards": len(shards.tars), "stream_mb_per_s": round(rate, 1)})
