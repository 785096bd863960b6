"""The benchmark's store mode: the real trainer reading one shard set from local disk, and from a loopback S3 store
that behaves like a remote one (tools/bench/loopback_store.py: moto's server behind a proxy that waits `latency`
before each answer's first byte and sends at most --store-bandwidth bytes/s per connection), through the shard window (dali_pipes/shard_window.py, a cap of --window-share of
the set) at each of --latencies, and through DALI's own ranged GETs (the node cache off) at --ranged-latency (< 0:
not);
contenders taking turns round by round like every group. The set should have many shards (a window of 10% of the
set holds 10% of its shards) and the trainer a small shuffle buffer (the window holds it, and a few batches)."""

import atexit
import os
import tempfile

from dali_pipes.shard_format import read_manifest
from tools.bench.contender import Contender

BUCKET = "bench"


def group_store(cfg: dict, _=None) -> list[Contender]:
    from tools.bench.loopback_store import LoopbackStore

    store = LoopbackStore(BUCKET)
    atexit.register(store.stop)  # (the contenders read from it until the benchmark ends)
    store.upload(cfg["shards"], "set")
    shards = read_manifest(cfg["shards"])["splits"][cfg["split"]]["shards"]
    window_gb = cfg["window_share"] * sum(s["bytes"] for s in shards) / 1e9
    indexes_gb = sum(s.get("index_bytes", 0) for s in shards) / 1e9  # (copied whole beside the window)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    common = dict(recipe=cfg["e2e_recipe"], ds_config=os.path.join(root, cfg["e2e_ds_config"]),
                  steps=cfg["e2e_steps"], overrides=cfg["e2e_overrides"].split() + cfg["store_overrides"].split())
    found = [Contender("store local disk", "tools.bench.model:e2e", cfg, **common)]
    latencies = [float(v) for v in cfg["latencies"].split(",")]
    for latency in latencies:
        env = {**store.env(store.new_proxy(latency, cfg["store_bandwidth"])),
               "MAE_ST_SHARD_CACHE": tempfile.mkdtemp(prefix="bench-window-"),
               "MAE_ST_SHARD_CACHE_GB": str(window_gb + indexes_gb)}
        found.append(Contender(f"store window {1000 * latency:.0f} ms", "tools.bench.model:e2e", cfg,
                               data=f"s3://{BUCKET}/set", env=env, **common))
    if cfg["ranged_latency"] >= 0:
        ranged = cfg["ranged_latency"]
        env = {**store.env(store.new_proxy(ranged, cfg["store_bandwidth"])), "MAE_ST_SHARD_CACHE_GB": "0"}
        found.append(Contender(f"store ranged GETs {1000 * ranged:.0f} ms", "tools.bench.model:e2e", cfg,
                               data=f"s3://{BUCKET}/set", env=env, **common))
    return found


def store_ratios(by_name: dict, per_round_ratio) -> dict:
    """Each streamed contender's clips/s over local disk's, round by round; its bytes fetched per clip read over
    the set's bytes per clip (1.0: each shard once an epoch)."""
    found = {}
    for name in by_name:
        if name.startswith("store ") and name != "store local disk":
            key = name.removeprefix("store ").replace(" ", "_")
            found[f"store_{key}_vs_disk"] = per_round_ratio(by_name, name, "store local disk")
    return found
