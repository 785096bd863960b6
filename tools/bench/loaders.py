"""Loader measurements for tools/benchmark.py: our DALI loader, the two baselines, and bare decoding.
Each function runs in its own process and returns {"seconds": [...], "items": n}: the time of each of cfg["reps"]
runs of cfg["batches"] batches (n clips), after cfg["warmup"] batches."""

import time

_KEEP_UNTIL_EXIT = []


def time_calls(next_batch, batches: int, warmup: int, reps: int) -> list[float]:
    """Seconds per rep of `batches` calls, after `warmup` calls."""
    for _ in range(warmup):
        next_batch()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(batches):
            next_batch()
        times.append(time.perf_counter() - start)
    return times


def _repeat(loader):
    while True:
        yield from loader


def measure_loader(cfg: dict, decoder: str, repeats: int) -> dict:
    from dali_pipes import build_pretrain_loader

    loader = build_pretrain_loader(cfg["shards"], batch_size=cfg["batch_size"], repeats=repeats,
                                   num_frames=cfg["num_frames"], stride=cfg["stride"], crop_size=cfg["crop_size"],
                                   decoder=decoder, num_threads=cfg["workers"], split=cfg["split"])
    stream = _repeat(loader)
    seconds = time_calls(lambda: next(stream), cfg["batches"], cfg["warmup"], cfg["reps"])
    loader.close()
    return {"seconds": seconds, "items": cfg["batches"] * cfg["batch_size"]}


def measure_baseline(cfg: dict, whole_video: bool, repeats: int) -> dict:
    from dali_pipes.sampling import ViewSpec
    from dali_pipes.shard_set import open_shard_set
    from tools.bench.baselines import build_baseline_loader

    spec = ViewSpec(num_frames=cfg["num_frames"], stride=cfg["stride"], repeats=repeats, crop_size=cfg["crop_size"])
    loader = build_baseline_loader(open_shard_set(cfg["shards"], cfg["split"]).tars, spec, cfg["batch_size"],
                                   cfg["workers"], whole_video)
    stream = iter(loader)
    seconds = time_calls(lambda: next(stream), cfg["batches"], cfg["warmup"], cfg["reps"])
    # Not shut down: its workers were seen to abort in their teardown ("terminate called without an active
    # exception", torch 2.13 + PyAV 18), after the measurement; benchmark.py kills them with the process.
    _KEEP_UNTIL_EXIT.append(stream)
    return {"seconds": seconds, "items": cfg["batches"] * cfg["batch_size"]}


def measure_decode_limit(cfg: dict, decoder: str) -> dict:
    """Decoding alone, of the loader's own reads and frame plans prepared beforehand; outputs never copied out."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    from dali_pipes.decoders.pyav import decode_frames
    from dali_pipes.reader import ShardReader
    from dali_pipes.sampling import ViewSpec, plan_train_sample
    from dali_pipes.shard_format import unpack_info
    from dali_pipes.shard_set import open_shard_set

    shards = open_shard_set(cfg["shards"], cfg["split"])
    reader = ShardReader(shards, cfg["batch_size"], 0, 1, 0, True, 1024, cfg["workers"])
    spec = ViewSpec(num_frames=cfg["num_frames"], stride=cfg["stride"], repeats=1, crop_size=cfg["crop_size"])
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(min(cfg["batches"], 16)):  # recycled: enough distinct batches to defeat any caching
        encoded, info, _, _ = reader.next_batch()
        metas = [unpack_info(row.tobytes()) for row in info]
        frames = [plan_train_sample(m["num_frames"], m["fps_milli"] / 1000, m["height"], m["width"], spec, rng).frames
                  for m in metas]
        batches.append((encoded, frames))
    count = [0]

    def next_inputs():
        count[0] += 1
        return batches[count[0] % len(batches)]

    if decoder == "pyav":
        with ThreadPoolExecutor(cfg["workers"]) as pool:
            seconds = time_calls(lambda: list(pool.map(decode_frames, *next_inputs())), cfg["batches"],
                                 cfg["warmup"], cfg["reps"])
        return {"seconds": seconds, "items": cfg["batches"] * cfg["batch_size"]}

    @pipeline_def(batch_size=cfg["batch_size"], num_threads=cfg["workers"], device_id=None if decoder == "dali-cpu"
                  else 0, prefetch_queue_depth=1)
    def decode_only():
        data = fn.external_source(name="data", dtype=types.UINT8)
        frames = fn.external_source(name="frames", dtype=types.INT32)
        return fn.decoders.video(data, device="cpu" if decoder == "dali-cpu" else "mixed", frames=frames)

    pipe = decode_only()
    pipe.build()

    def next_batch():
        encoded, frames = next_inputs()
        pipe.feed_input("data", encoded)
        pipe.feed_input("frames", frames)
        pipe.run()

    seconds = time_calls(next_batch, cfg["batches"], cfg["warmup"], cfg["reps"])
    return {"seconds": seconds, "items": cfg["batches"] * cfg["batch_size"]}


def available_decoders(cfg: dict) -> list[str]:
    from dali_pipes.decoders import DECODERS, choose_decoder, gpu_available
    from dali_pipes.shard_set import open_shard_set

    codecs, gpu = open_shard_set(cfg["shards"], cfg["split"]).codecs, gpu_available()
    found = []
    for decoder in DECODERS:
        try:
            choose_decoder(decoder, codecs, gpu)
            found.append(decoder)
        except ValueError:
            pass
    return found
