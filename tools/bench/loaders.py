"""Loader measurements of tools/benchmark.py. Each function is called once in the contender's own process (the set-up:
loaders, pipelines, batches read beforehand) and returns the function that runs one round: cfg["warmup"] batches
untimed (the pipeline back to its steady state after the pause between rounds), then cfg["batches"] timed.

- loader: our loader (batches as the model takes them: normalized, on the device); the only one that reads a
  mixture of shard sets (cfg["shards"] a --data mixture spec, dali_pipes/mixture.py)
- baseline: a hand-written PyTorch DataLoader, or the mae_st way (tools/bench/baselines.py)
- decode_limit: decoding the same frames and nothing else, of batches read and planned beforehand
- stages: the views pipeline taken apart on batches read beforehand: decoding; + each view's resize; + the rest of
  the views pipeline (flip, layout); + the copy into the torch batch. Per-view cost = (full - decode) / R.
"""

import time

_KEEP_UNTIL_EXIT = []


def _timed(next_batch, cfg: dict, clips_per_batch: int):
    def run_round() -> dict:
        for _ in range(cfg["warmup"]):
            next_batch()
        start = time.perf_counter()
        for _ in range(cfg["batches"]):
            next_batch()
        return {"seconds": time.perf_counter() - start, "items": cfg["batches"] * clips_per_batch}

    return run_round


def _config(cfg: dict, decoder: str, repeats: int):
    from dali_pipes import LoaderConfig, TrainViews, ViewSpec

    segments = cfg["sampling"] == "segments"  # as the SSv2 recipes: each view its own draw, no flips
    spec = ViewSpec(num_frames=cfg["num_frames"], sampling=cfg["sampling"], stride=cfg["stride"], repeats=repeats,
                    per_view_start=segments, flip=not segments, crop_size=cfg["crop_size"])
    return LoaderConfig(cfg["shards"], TrainViews(spec), split=cfg["split"], batch_size=cfg["batch_size"],
                        decoder=decoder, num_threads=cfg["workers"], device=cfg["device"])


def loader(cfg: dict, decoder: str, repeats: int):
    import torch

    from dali_pipes import VideoLoader

    stream = VideoLoader(_config(cfg, decoder, repeats)).endless()

    def next_batch():
        video = next(stream)["video"]
        if video.is_cuda:
            torch.cuda.synchronize(video.device)

    return _timed(next_batch, cfg, cfg["batch_size"])


def baseline(cfg: dict, whole_video: bool, repeats: int):
    from dali_pipes import ViewSpec
    from dali_pipes.shard_set import open_shard_set
    from tools.bench.baselines import build_baseline_loader

    spec = ViewSpec(num_frames=cfg["num_frames"], stride=cfg["stride"], repeats=repeats, crop_size=cfg["crop_size"])
    stream = iter(build_baseline_loader(open_shard_set(cfg["shards"], cfg["split"]).tars, spec, cfg["batch_size"],
                                        cfg["workers"], whole_video))
    # Never shut down: its workers were seen to abort in their teardown ("terminate called without an active
    # exception", torch 2.13 + PyAV 18); the contender kills them with its process.
    _KEEP_UNTIL_EXIT.append(stream)
    return _timed(lambda: next(stream), cfg, cfg["batch_size"])


def _planned_batches(cfg: dict, config, count: int = 16) -> list:
    """Feeds read and planned by the loader's own reading thread, clips left encoded, recycled by the rounds (enough
    to defeat any caching)."""
    from dali_pipes.cursor import Cursor
    from dali_pipes.decoders import DecoderRoute, make_decoder
    from dali_pipes.feeder import Feeder
    from dali_pipes.shard_set import open_shard_set

    route = DecoderRoute(make_decoder("dali-cpu"), "a DALI decoder: the reading thread leaves every clip encoded")
    feeder = Feeder(config, open_shard_set(cfg["shards"], cfg["split"]), route, Cursor())
    feeds = [next(feeder) for _ in range(count)]
    feeder.stop()
    return feeds


def _cycle(items: list):
    while True:
        yield from items


def torchcodec_missing() -> str | None:
    """Why torchcodec cannot decode here (it needs FFmpeg's shared libraries and a build matching this torch), or
    None: then the benchmark measures it as a candidate host decoder beside PyAV."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as err:  # ImportError, or OSError from a library that does not load
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    return None


def _torchcodec_frames(encoded, indices):
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(bytes(encoded), seek_mode="exact", num_ffmpeg_threads=1)
    return decoder.get_frames_at(indices=[int(i) for i in indices]).data  # uint8 [F, C, H, W]


def decode_limit(cfg: dict, decoder: str):
    """Decoding alone, of the loader's own reads and frame plans prepared beforehand; outputs never copied out.
    `decoder` is a loader decoder, or "torchcodec" (a candidate host decoder, not one of the loader's)."""
    from concurrent.futures import ThreadPoolExecutor

    from dali_pipes.decoders import make_decoder
    from dali_pipes.views_pipeline import ViewsPipeline

    config = _config(cfg, "pyav" if decoder == "torchcodec" else decoder, 1)
    backend = None if decoder == "torchcodec" else make_decoder(decoder, _gpu())
    feeds = _cycle(_planned_batches(cfg, config))
    if backend is None or not backend.decodes_in_dali:
        frames, pool = backend.frames if backend else _torchcodec_frames, ThreadPoolExecutor(cfg["workers"])
        _KEEP_UNTIL_EXIT.append(pool)

        def next_batch():
            feed = next(feeds)
            list(pool.map(frames, feed.data, [p.frames for p in feed.plans]))

        return _timed(next_batch, cfg, cfg["batch_size"])
    pipeline = ViewsPipeline(config, backend, config.threads, stop_after="decode")
    return _timed(lambda: pipeline.run(next(feeds)), cfg, cfg["batch_size"])


def stages(cfg: dict, decoder: str, repeats: int):
    """Each stage of the views pipeline timed on the same batches in the same round: a round's seconds are those of
    the whole (decode, views, copy), and "stages" holds the seconds of each cumulative stage: the views pipeline
    itself stopped after decoding, after each view's resize, whole, and whole with the copy into the torch batch."""
    from dali_pipes.batch_assembler import BatchAssembler
    from dali_pipes.decoders import make_decoder
    from dali_pipes.views_pipeline import Lane, ViewsPipeline

    config, backend = _config(cfg, decoder, repeats), make_decoder(decoder, _gpu())
    if not backend.decodes_in_dali:
        raise ValueError(f"stages are measured for DALI decoders; {decoder} decodes on the host")
    feeds = _planned_batches(cfg, config)
    decode, resize, views = (ViewsPipeline(config, backend, config.threads, stop_after=stop)
                             for stop in ("decode", "resize", None))
    copy = Lane({"encoded": views}, BatchAssembler(config))
    position = [0]

    def copied(feed):
        copy.submit(feed)
        return copy.batch()

    def run_round() -> dict:
        seconds = {"decode": 0.0, "decode + resize": 0.0, "views pipeline": 0.0, "views + copy to torch": 0.0}
        for count in range(cfg["warmup"] + cfg["batches"]):
            feed = feeds[position[0] % len(feeds)]
            position[0] += 1
            for stage, work in (("decode", lambda: decode.run(feed)), ("decode + resize", lambda: resize.run(feed)),
                                ("views pipeline", lambda: views.run(feed)), ("views + copy to torch",
                                                                          lambda: copied(feed))):
                start = time.perf_counter()
                work()
                if count >= cfg["warmup"]:
                    seconds[stage] += time.perf_counter() - start
        return {"seconds": seconds["views + copy to torch"], "items": cfg["batches"] * cfg["batch_size"],
                "stages": {stage: s / cfg["batches"] for stage, s in seconds.items()}}  # per batch

    return run_round


def _gpu():
    from dali_pipes.decoders import gpu_capability

    return gpu_capability("cuda")


def available_decoders(cfg: dict) -> list[str]:
    """The loader's decoders that read every clip of the shards here, the one `auto` picks first."""
    from dali_pipes.decoders import DECODERS, choose_route
    from dali_pipes.mixture import parse_data
    from dali_pipes.shard_set import open_shard_set, summed_formats

    formats = summed_formats(open_shard_set(s.location, cfg["split"]) for s in parse_data(cfg["shards"]))
    found = []
    for decoder in DECODERS:
        try:
            choose_route(decoder, formats, _gpu())
            found.append(decoder)
        except ValueError:
            pass
    return found
