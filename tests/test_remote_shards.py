"""Shard sets in object storage against a real S3 API on 127.0.0.1 (moto's server, behind a counting proxy): the same
losses as on disk, the bytes one epoch fetches, refusals before the start, a store that stops answering (retries,
StoreUnavailable, exit 4) or comes back (the identical stream), publishing with build_shards, the node cache (one
copy, re-used, evicted), the window of a split that does not fit (the same clips and losses as from disk, its cap,
each shard fetched once by a node's ranks and none of another node's part, resumes on fewer processes, a store that
stops answering), and an http(s) set copied once into the cache. The module streams from the store unless a test
gives the cache room (MAE_ST_SHARD_CACHE_GB=0 by default here)."""

import dataclasses
import functools
import http.server
import json
import logging
import os
import re
import subprocess
import sys
import threading

import boto3
import pytest
import torch

from conftest import make_shards, once_per_run, process_env, write_video
from dali_pipes import TrainViews, VideoLoader, ViewSpec
from dali_pipes.config import LoaderConfig
from dali_pipes.cursor import Cursor
from dali_pipes.reader import ShardReader
from dali_pipes.shard_format import read_manifest
from dali_pipes.shard_set import open_shard_set
from dali_pipes.shard_store import Expected, NodeCache, S3Store, StoreRefused, StoreUnavailable
from tools.bench.loopback_store import LoopbackStore
from tools import build_shards
from trainer import pretrain

BUCKET = "shards-bucket"
TINY = ["crop_size=32", "model.img_size=32", "num_frames=4", "model.num_frames=4", "model.pred_t_dim=2",
        "model.depth=2", "model.embed_dim=64", "model.decoder_depth=1", "num_threads=1", "image_every=0",
        "shuffle_buffer=4"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def big_shards(folder) -> str:
    """26 clips in 13 shards of 2 (the window tests' set: a cap of a few shards is a small part of it; two ranks'
    parts of 13 share shard 6)."""
    for i in range(26):
        os.makedirs(folder / "videos" / f"c{i % 4}", exist_ok=True)
        write_video(folder / "videos" / f"c{i % 4}" / f"{i}.webm", frames=24, codec="libvpx-vp9", seed=i)
    out = folder / "shards"
    assert build_shards.main(["--root", str(folder / "videos"), "--out", str(out), "--split", "train", "--codec",
                              "copy", "--max-per-shard", "2", "--min-frames", "2", "--workers", "1"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def loopback_store(tmp_path_factory):
    """(proxy, the local shards folder, the user's key): moto's server with a user, a bucket with the set under set/,
    and the counting proxy in front of it, once per test process: DALI's AWS SDK keeps the first endpoint a process
    gives it, so a second server (a module's fixture made again after pytest-xdist moved on and came back) would be
    unreachable for DALI."""
    shards = make_shards(tmp_path_factory.mktemp("remote"), n=8, frames=40)
    loopback = LoopbackStore(BUCKET)
    try:
        loopback.upload(shards, "set")
        loopback.upload(shards, "noindex", skip=lambda name: name.endswith("000001.idx"))  # a set lacking an index
        yield loopback.proxy, shards, loopback
    finally:
        loopback.stop()


@pytest.fixture(scope="module")
def store(loopback_store, tmp_path_factory):
    """(proxy, the local shards folder), the environment pointing at them (endpoint, the user's key, the node cache)
    for this module's tests."""
    proxy, shards, loopback = loopback_store
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED",
                                            "MAE_ST_SHARD_CACHE", "MAE_ST_SHARD_CACHE_GB")}
    try:
        os.environ.update(**loopback.env(proxy), MAE_ST_SHARD_CACHE=str(tmp_path_factory.mktemp("cache")),
                          MAE_ST_SHARD_CACHE_GB="0")
        os.environ.pop("AWS_DEFAULT_REGION", None)
        yield proxy, shards
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(autouse=True)
def store_answers(request):
    """Every test starts (and leaves) with the store answering."""
    yield
    if "store" in request.fixturenames:
        request.getfixturevalue("store")[0].down.clear()


def ds_config(folder):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "zero2.json")
    with open(path, "w") as f:
        json.dump({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": False},
                   "zero_optimization": {"stage": 2}}, f)
    return path


def train(data, folder, *extra):
    out = str(folder / "run")
    code = pretrain.main(pretrain.Pretraining, ["--ds_config", ds_config(folder), "--recipe", "tiny_PT", "--data",
                                                data, "--output", out, *TINY, *extra])
    return code, out


def losses(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def names(reader, batches):
    return [reader.next_batch().names for _ in range(batches)]


def reader_of(location, batch_size=1):
    config = LoaderConfig(location, batch_size=batch_size, shuffle_buffer=2)
    return ShardReader(open_shard_set(location, "train"), config, Cursor(), 1)


def test_pretraining_from_the_store_gives_the_losses_of_the_same_shards_on_disk(store, tmp_path, monkeypatch):
    proxy, shards = store
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train(shards, tmp_path / "disk", "--max-steps", "6", "log_every=1")[0] == 0
    code, out = train(f"s3://{BUCKET}/set", tmp_path / "s3", "--max-steps", "6", "log_every=1")
    assert code == 0
    assert losses(out) == losses(str(tmp_path / "disk" / "run")) and len(losses(out)) == 6


def test_one_epoch_fetches_no_more_than_the_split(store):
    proxy, shards = store
    split = json.load(open(os.path.join(shards, "manifest.json")))["splits"]["train"]
    proxy.reset()
    reader = reader_of(f"s3://{BUCKET}/set", batch_size=2)
    batches = names(reader, reader.batches_per_epoch)
    assert len({name.split(":")[-1] for batch in batches for name in batch}) == split["samples"]  # each clip once
    fetched = proxy.bytes_served
    assert reader.shards.tars[0].startswith(f"s3://{BUCKET}/set/")
    assert 0.5 * split["bytes"] < fetched <= 1.05 * split["bytes"], (fetched, split["bytes"])


@pytest.mark.parametrize("problem", ["credential", "bucket", "manifest", "index"])
def test_a_store_that_cannot_serve_the_set_is_refused_in_one_line(store, tmp_path, monkeypatch, capsys, problem):
    data, named = {"credential": (f"s3://{BUCKET}/set", f"s3://{BUCKET}/set/manifest.json"),
                   "bucket": ("s3://no-such-bucket/set", "no bucket 'no-such-bucket'"),
                   "manifest": (f"s3://{BUCKET}/nothing", f"s3://{BUCKET}/nothing has no manifest.json"),
                   "index": (f"s3://{BUCKET}/noindex", "train-000001.idx: missing")}[problem]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    if problem == "credential":
        secret = "not-the-secret-" + secret[:8]
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    code, _ = train(data, tmp_path)
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(error) == 1 and named in error[0], error
    assert secret not in error[0] and (problem != "credential" or "refused the credentials" in error[0])


def test_a_store_that_stops_answering_is_retried_then_named(store, monkeypatch, caplog):
    proxy, _ = store
    monkeypatch.setattr(ShardReader, "retry_delays", (0.05, 0.05))
    reader = reader_of(f"s3://{BUCKET}/set")
    last = reader.next_batch().names[-1]
    proxy.down.set()
    with pytest.raises(StoreUnavailable) as err:
        for _ in range(3 * reader.batches_per_epoch):
            last = reader.next_batch().names[-1]
    assert f"s3://{BUCKET}/set stopped answering" in str(err.value) and f"last sample read: {last}" in str(err.value)
    assert caplog.text.count("trying again from the cursor") == 3


def test_a_store_that_comes_back_continues_the_identical_stream(store, monkeypatch):
    proxy, _ = store
    batches = 12  # an epoch and a half
    expected = names(reader_of(f"s3://{BUCKET}/set"), batches)
    monkeypatch.setattr(ShardReader, "retry_delays", (0.5, 1, 2, 4))
    reader = reader_of(f"s3://{BUCKET}/set")
    got = names(reader, 2)
    proxy.down.set()
    threading.Timer(1.5, proxy.down.clear).start()
    got += names(reader, batches - 2)
    assert got == expected


def _fail_the_store_at_step_3(proxy):
    original = pretrain.Pretraining.loss

    def loss(self, engine, batch):
        if engine.global_steps == 2:
            proxy.down.set()
        return original(self, engine, batch)
    return loss


def test_the_trainer_exits_4_keeping_its_last_checkpoint(store, tmp_path, monkeypatch, caplog):
    proxy, _ = store
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(ShardReader, "retry_delays", (0.05,))
    monkeypatch.setattr(pretrain.Pretraining, "loss", _fail_the_store_at_step_3(proxy))
    code, out = train(f"s3://{BUCKET}/set", tmp_path, "checkpoint_every=2", "--max-steps", "40")
    assert code == 4
    latest = open(os.path.join(out, "checkpoints", "latest")).read()
    assert "stopped answering" in caplog.text
    assert f"the last good checkpoint is {out}/checkpoints/{latest}" in caplog.text
    assert os.path.isdir(os.path.join(out, "checkpoints", latest))


def test_build_shards_publishes_to_the_store_manifest_last_and_adds_a_second_split(store, tmp_path, monkeypatch,
                                                                                  capsys):
    _, shards = store
    videos = os.path.join(os.path.dirname(shards), "videos")
    uploads, put = [], S3Store.put
    monkeypatch.setattr(S3Store, "put", lambda self, path, name: (uploads.append(name), put(self, path, name)))

    def build(split):
        return build_shards.main(["--root", videos, "--out", f"s3://{BUCKET}/built", "--split", split, "--codec",
                                  "copy", "--max-per-shard", "5", "--workers", "1", "--staging",
                                  str(tmp_path / "staging")])

    assert build("train") == 0
    assert uploads[-1] == "manifest.json" and len(uploads) == 5  # 2 shards, 2 indexes, then the manifest
    assert "published 5 files" in capsys.readouterr().out
    assert build("val") == 0
    assert uploads[5:] == ["val-000000.tar", "val-000000.idx", "val-000001.tar", "val-000001.idx", "manifest.json"]
    manifest = json.loads(boto3.session.Session().client("s3").get_object(Bucket=BUCKET, Key="built/manifest.json")[
        "Body"].read())
    assert sorted(manifest["splits"]) == ["train", "val"]
    assert open_shard_set(f"s3://{BUCKET}/built", "val").num_samples == 8


def test_a_split_that_fits_the_node_cache_is_copied_once_and_read_from_there(store, tmp_path, monkeypatch):
    proxy, shards = store
    split = json.load(open(os.path.join(shards, "manifest.json")))["splits"]["train"]
    monkeypatch.setenv("MAE_ST_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MAE_ST_SHARD_CACHE_GB")  # the default: half the free space
    proxy.reset()
    reader = reader_of(f"s3://{BUCKET}/set", batch_size=2)
    copied = proxy.bytes_served
    assert not reader.shards.streamed and all(p.startswith(str(tmp_path / "cache")) for p in reader.shards.tars)
    names(reader, 3 * reader.batches_per_epoch)
    assert proxy.bytes_served == copied  # three epochs read the copy: nothing more from the store
    assert split["bytes"] < copied < 1.05 * split["bytes"] + 10_000  # the tars, the indexes and the manifest
    proxy.reset()
    again = reader_of(f"s3://{BUCKET}/set")
    assert again.shards.tars == reader.shards.tars and proxy.bytes_served < 10_000  # the manifest and a listing


def test_the_node_cache_evicts_the_split_used_longest_ago_and_windows_what_cannot_fit(store, tmp_path, monkeypatch):
    _, shards = store
    split = json.load(open(os.path.join(shards, "manifest.json")))["splits"]["train"]
    index_bytes = sum(os.path.getsize(os.path.join(shards, s["index"])) for s in split["shards"])
    monkeypatch.setenv("MAE_ST_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAE_ST_SHARD_CACHE_GB", str(1.5 * (split["bytes"] + index_bytes) / 1e9))  # one split fits
    first = open_shard_set(f"s3://{BUCKET}/set", "train")
    folder = os.path.dirname(first.tars[0])
    os.utime(folder, (1, 1))  # used long ago
    second = open_shard_set(f"s3://{BUCKET}/noindex", "train", skip_damaged=True)
    assert second.window is not None and os.path.exists(first.tars[0])  # this process holds the first: it stays
    (lease,) = [name for name in os.listdir(folder) if name.startswith(".in_use.")]
    os.rename(os.path.join(folder, lease), os.path.join(folder, ".in_use.999999999"))  # as if its process had ended
    second = open_shard_set(f"s3://{BUCKET}/noindex", "train", skip_damaged=True)
    assert second.window is None and not os.path.exists(first.tars[0])  # the first split made room for the second
    monkeypatch.setenv("MAE_ST_SHARD_CACHE_GB", str(0.5 * split["bytes"] / 1e9))  # too small for any split
    third = open_shard_set(f"s3://{BUCKET}/set", "train")  # (its window: not even its indexes fit beside the second)
    assert third.streamed and third.window is None and third.tars[0].startswith(f"s3://{BUCKET}/set/")
    assert os.path.exists(second.tars[0])  # not evicted for a split that would not have fitted anyway


FILL_THE_CACHE = """
import fcntl, os, sys, time
sys.path.insert(0, {root!r})
fcntl.flock = lambda *args: None  # a filesystem whose locks are no-ops (Lustre's localflock, NFS without lockd)
from dali_pipes.shard_format import file_sha256
from dali_pipes.shard_store import Expected, NodeCache

class Trickle:  # a slow store: the two writers' copies overlap
    def __init__(self, path):
        self.file = open(path, "rb")
    def read(self, size):
        time.sleep(0.005)
        return self.file.read(4096)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()

source, names = sys.argv[1], sys.argv[2:]
files = {{n: Expected(os.path.getsize(os.path.join(source, n)), file_sha256(os.path.join(source, n))) for n in names}}
print("filled", NodeCache("s3://bucket/set").fill(files, lambda n: Trickle(os.path.join(source, n))))
"""


def test_two_writers_without_a_working_lock_publish_whole_files(store, tmp_path):
    """One `.partial` name for every writer, guarded by a lock that a shared filesystem may not honour: two writers
    wrote into the same file (a published shard could hold zero-filled gaps, or the second rename failed). Each
    writer now copies under a name of its own and publishes only at the manifest's size and SHA-256."""
    _, shards = store
    names = sorted(n for n in os.listdir(shards) if n.endswith((".tar", ".idx")))
    env = process_env(MAE_ST_SHARD_CACHE=str(tmp_path / "cache"), MAE_ST_SHARD_CACHE_GB="1")
    writers = [subprocess.Popen([sys.executable, "-c", FILL_THE_CACHE.format(root=ROOT), shards, *names],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=120)[0] for w in writers]
    assert all("filled True" in out for out in outputs), outputs
    (folder,) = [entry.path for entry in os.scandir(tmp_path / "cache") if entry.is_dir()]
    assert sorted(os.listdir(folder)) == sorted(names + [f".in_use.{w.pid}" for w in writers])  # no partial left
    for name in names:
        assert open(os.path.join(folder, name), "rb").read() == open(os.path.join(shards, name), "rb").read(), name


def test_a_node_cache_on_a_shared_filesystem_or_a_damaged_object_is_refused_with_the_reason(store, tmp_path,
                                                                                            monkeypatch):
    from dali_pipes import shard_store

    _, shards = store
    monkeypatch.setenv("MAE_ST_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAE_ST_SHARD_CACHE_GB", "1")
    assert shard_store.filesystem_type("/proc/self") == "proc"
    monkeypatch.setattr(shard_store, "filesystem_type", lambda path: "lustre")
    with pytest.raises(StoreRefused, match="is on a lustre filesystem, which other nodes share: a node cache must be "
                                           "on the node's own disk"):
        open_shard_set(f"s3://{BUCKET}/set", "train")
    monkeypatch.undo()
    monkeypatch.setenv("MAE_ST_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAE_ST_SHARD_CACHE_GB", "1")
    name = sorted(n for n in os.listdir(shards) if n.endswith(".tar"))[0]
    wrong = Expected(os.path.getsize(os.path.join(shards, name)), "0" * 64)
    with pytest.raises(StoreRefused, match=f"{name}: the store sent .* SHA-256 is not the manifest's"):
        NodeCache(f"s3://{BUCKET}/set").fill({name: wrong}, lambda n: open(os.path.join(shards, n), "rb"))


def test_a_damaged_set_is_refused_before_anything_is_copied(store, tmp_path, monkeypatch):
    """The damage check judged the node cache's copy: a split with a missing index was copied whole, then refused."""
    from dali_pipes.shard_set import DamagedShards

    monkeypatch.setenv("MAE_ST_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAE_ST_SHARD_CACHE_GB", "1")
    with pytest.raises(DamagedShards, match="train-000001.idx: missing"):
        open_shard_set(f"s3://{BUCKET}/noindex", "train")
    copied = [name for _, _, names in os.walk(tmp_path / "cache") for name in names if name.endswith((".tar", ".idx"))]
    assert copied == []


def test_an_http_set_is_copied_once_into_the_node_cache(store, tmp_path, monkeypatch):
    _, shards = store
    monkeypatch.setenv("MAE_ST_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MAE_ST_SHARD_CACHE_GB")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=shards))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        location = f"http://127.0.0.1:{server.server_address[1]}"
        first = open_shard_set(location, "train")
        copied = len(requests)
        again = open_shard_set(location, "train")
    finally:
        server.shutdown()
        server.server_close()
    assert copied == 1 + 4  # the manifest, 2 shards and 2 indexes
    assert len(requests) == copied + 1  # the second time: the manifest alone
    assert first.tars == again.tars and all(p.startswith(str(tmp_path / "cache")) for p in first.tars)
    assert [os.path.getsize(p) for p in first.tars] == [os.path.getsize(os.path.join(shards, os.path.basename(p)))
                                                         for p in first.tars]
    assert names(ShardReader(first, LoaderConfig(location, batch_size=2), Cursor(), 1), 1)


def test_the_preflight_checks_the_store_and_measures_one_stream(store, tmp_path, monkeypatch, capsys, caplog):
    from tools import preflight
    from tools.checks.store import check_store

    _, shards = store
    assert check_store(shards, "train").status == "SKIP"
    with caplog.at_level(logging.WARNING, logger="dali_pipes"):
        good = check_store(f"s3://{BUCKET}/set", "train")
    assert good.status == "PASS" and good.figures["shards"] == 2 and good.figures["stream_mb_per_s"] > 0
    assert "the node cache is off (MAE_ST_SHARD_CACHE_GB=0): DALI streams the split" in caplog.text
    bad = check_store(f"s3://{BUCKET}/noindex", "train")
    assert bad.status == "FAIL" and "train-000001.idx: missing" in bad.summary
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # reported as the store's, not the recipe's
    assert preflight.main(["--data", f"s3://{BUCKET}/set", "--recipe", "tiny_PT", "--ds_config",
                           os.path.join(ROOT, "ds_configs", "cpu.json"), "--output", str(tmp_path / "run")]) == 1
    report = capsys.readouterr().out
    assert "FAIL  shard store" in report and "refused the credentials" in report and "FAIL  recipe" not in report


# --- the shard window: a split larger than the node cache ------------------------------------------------------------


@pytest.fixture
def big_store(store, tmp_path_factory):
    """(proxy, the local folder, its manifest's shards) of big_shards' set, in the store under big/."""
    proxy, _ = store
    local = str(once_per_run(tmp_path_factory, "big", big_shards) / "shards")
    s3 = boto3.session.Session().client("s3", endpoint_url=proxy.url)
    if "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="big/"):
        for name in os.listdir(local):
            if os.path.isfile(os.path.join(local, name)):
                s3.upload_file(os.path.join(local, name), BUCKET, f"big/{name}")
    return proxy, local, read_manifest(local)["splits"]["train"]["shards"]


def cache_gb(shards, window_shards: float) -> str:
    """MAE_ST_SHARD_CACHE_GB for a window of `window_shards` shards' bytes beside the split's indexes (cached)."""
    return str((window_shards * shards[0]["bytes"] + sum(s["index_bytes"] for s in shards)) / 1e9)


def window_reader(location, cache, shards, window_shards, world=1, rank=0, batch_size=1, cursor=None):
    os.environ.update(MAE_ST_SHARD_CACHE=str(cache), MAE_ST_SHARD_CACHE_GB=cache_gb(shards, window_shards))
    config = LoaderConfig(location, batch_size=batch_size, shuffle_buffer=2, world_size=world, rank=rank)
    return ShardReader(open_shard_set(location, "train"), config, cursor or Cursor(), 1)


def clips(reader, batches, watch=None):
    """[(name, the clip's bytes)] of the real samples of `batches` batches; watch(reader) after each."""
    found = []
    for _ in range(batches):
        batch = reader.next_batch()
        found += [(n.split(":")[-1], bytes(v)) for n, v in list(zip(batch.names, batch.encoded))[:batch.real]]
        if watch:
            watch(reader)
    return found


def test_a_split_larger_than_the_cache_is_read_through_a_window_as_from_disk(big_store, tmp_path):
    """26 clips in 13 shards through a window of 5 shards' bytes, two epochs, 30 ms before each answer: the clips
    and their bytes are those read from disk, in the same order; the window never holds more than its cap; an epoch
    fetches each shard once."""
    proxy, local, shards = big_store
    split = sum(s["bytes"] for s in shards)
    proxy.behave_remote(0.03)
    try:
        proxy.reset()
        reader = window_reader(f"s3://{BUCKET}/big", tmp_path / "cache", shards, 5)
        cap = reader.shards.window.cap
        assert reader.shards.window is not None and all(p.startswith(str(tmp_path / "cache")) for p in
                                                          reader.shards.tars)
        held = []
        got = clips(reader, 2 * reader.batches_per_epoch, lambda r: held.append(r.shards.window.held_bytes()))
        fetched = proxy.bytes_served
    finally:
        proxy.behave_remote(0)
    disk = ShardReader(open_shard_set(local, "train"), LoaderConfig(local, batch_size=1, shuffle_buffer=2), Cursor(), 1)
    assert got == clips(disk, 2 * disk.batches_per_epoch)  # the same clips, bytes and order
    assert max(held) <= cap, (max(held), cap)
    assert 2 * split <= fetched <= 2 * 1.05 * split + 100_000, (fetched, split)  # (+ indexes, manifest, listings)


def test_a_windowed_loader_resumed_mid_epoch_on_fewer_processes_goes_on_as_from_disk(big_store, tmp_path):
    """Rank 0 of two reads 5 batches, its state goes to a loader of one process: the window refills from the cursor
    and the batches are those of the same runs from disk (the window changes neither the order nor the cursor)."""
    proxy, local, shards = big_store

    def batches(location, cache):
        os.environ.update(MAE_ST_SHARD_CACHE=str(cache), MAE_ST_SHARD_CACHE_GB=cache_gb(shards, 5))
        views = TrainViews(ViewSpec(num_frames=2, crop_size=16, repeats=1, target_fps=None))
        config = LoaderConfig(location, views, batch_size=1, shuffle_buffer=2, num_threads=1, world_size=2, rank=0)
        two = VideoLoader(config)
        stream = two.endless()
        found = [next(stream)["video"].clone() for _ in range(5)]
        state = two.state_dict()
        two.close()
        one = VideoLoader(dataclasses.replace(config, world_size=1))
        one.load_state_dict(state)
        stream = one.endless()
        found += [next(stream)["video"].clone() for _ in range(20)]
        one.close()
        return found

    windowed, disk = batches(f"s3://{BUCKET}/big", tmp_path / "cache"), batches(local, tmp_path / "unused")
    assert len(windowed) == 25 and all(torch.equal(a, b) for a, b in zip(windowed, disk))


TWO_RANKS_OF_A_NODE = """
import os, sys
sys.path.insert(0, {root!r})
from dali_pipes import TrainViews, VideoLoader, ViewSpec
from dali_pipes.config import LoaderConfig
from dali_pipes.cursor import Cursor
from dali_pipes.reader import ShardReader
from dali_pipes.shard_set import open_shard_set
rank = int(sys.argv[1])
config = LoaderConfig(sys.argv[2], batch_size=1, shuffle_buffer=2, world_size=2, rank=rank)
reader = ShardReader(open_shard_set(sys.argv[2], "train"), config, Cursor(), 1)
for _ in range(reader.batches_per_epoch - 5):  # this epoch's part (not the next one's first shards)
    reader.next_batch()
print(",".join(reader.shards.window.fetched))
"""


def test_the_ranks_of_a_node_fetch_each_shard_once_and_no_shard_only_other_nodes_read(big_store, tmp_path):
    """Two ranks of one node at once (one window folder): each shard of the epoch fetched once in all. Then the same
    two ranks as two nodes (a window folder each): each fetches the shards of its own part only."""
    proxy, _, shards = big_store
    location = f"s3://{BUCKET}/big"  # a window of 12 shards of 13: nothing evicted (the ranks start seconds apart,
    # so one's early shards would be gone before the other says it will want them)

    def ranks(*caches):
        procs = [subprocess.Popen([sys.executable, "-c", TWO_RANKS_OF_A_NODE.format(root=ROOT), str(r), location],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=process_env(MAE_ST_SHARD_CACHE=str(cache), MAE_ST_SHARD_CACHE_GB=cache_gb(shards, 12)))
                 for r, cache in enumerate(caches)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        return [set(out.strip().split(",")) - {""} for out, _ in outputs]

    one_node = ranks(tmp_path / "node", tmp_path / "node")
    fetched = [name for found in one_node for name in found]
    assert len(fetched) == len(set(fetched)) and shards[6]["tar"] in fetched, one_node
    parts = [{s["tar"] for s in shards[:7]}, {s["tar"] for s in shards[6:]}]  # 13 samples a rank, shard 6 both's
    two_nodes = ranks(tmp_path / "node0", tmp_path / "node1")
    for found, own in zip(two_nodes, parts):
        assert found and found <= own, (found, own)


def test_pretraining_through_the_window_gives_the_losses_from_disk_and_logs_what_it_fetched(big_store, tmp_path,
                                                                                              monkeypatch):
    proxy, local, shards = big_store
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MAE_ST_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAE_ST_SHARD_CACHE_GB", cache_gb(shards, 11))  # the split does not fit
    assert train(local, tmp_path / "disk", "--max-steps", "16", "log_every=1")[0] == 0
    proxy.behave_remote(0.03)
    try:
        code, out = train(f"s3://{BUCKET}/big", tmp_path / "s3", "--max-steps", "16", "log_every=1")
    finally:
        proxy.behave_remote(0)
    assert code == 0
    assert losses(out) == losses(str(tmp_path / "disk" / "run")) and len(losses(out)) == 16
    # stopped mid-epoch (13 steps an epoch) at a checkpoint, started again: DALI restores its reader by reading the
    # part again from its start, a few batches on; when the window cannot hold that (here), the epoch goes on in a
    # fresh order from the cursor, said in the log (the exact case: the reader-level test below)
    assert train(f"s3://{BUCKET}/big", tmp_path / "late", "--max-steps", "8", "log_every=1")[0] == 0
    code, late = train(f"s3://{BUCKET}/big", tmp_path / "late", "--max-steps", "16", "log_every=1")
    assert code == 0 and len(losses(late)) == 16
    assert "resuming batch 8 of epoch 0 through the shard window in a fresh order" in open(
        os.path.join(late, "train.log")).read()
    log = open(os.path.join(out, "train.log")).read()
    assert "its shards go through a window on this node's disk" in log
    assert re.search(r"shard window, epoch 0: fetched 0\.00\d+ GB, the reader waited [\d.]+ s", log), log[-2000:]


def test_a_store_that_stops_answering_the_window_ends_in_store_unavailable(big_store, tmp_path, monkeypatch):
    proxy, _, shards = big_store
    monkeypatch.setattr("dali_pipes.shard_window.RETRY_DELAYS", (0.1, 0.2))
    reader = window_reader(f"s3://{BUCKET}/big", tmp_path / "cache", shards, 5)
    clips(reader, 2)
    proxy.down.set()
    with pytest.raises(StoreUnavailable, match=r"train-0000\d\d\.tar: the store did not send it in 3 tries"):
        clips(reader, reader.batches_per_epoch)


def test_a_windowed_reader_restored_from_its_checkpoint_goes_on_exactly(big_store, tmp_path):
    """DALI restores a shuffling reader by reading its part again from the start when it is built (and in its
    prefetching): the window holds that prefix first, so the clips after the restore are the uninterrupted ones."""
    proxy, local, shards = big_store
    reader = window_reader(f"s3://{BUCKET}/big", tmp_path / "cache", shards, 11)
    first = clips(reader, 3)
    restored = window_reader(f"s3://{BUCKET}/big", tmp_path / "cache", shards, 11, cursor=reader.cursor)
    disk = ShardReader(open_shard_set(local, "train"), LoaderConfig(local, batch_size=1, shuffle_buffer=2), Cursor(), 1)
    assert first + clips(restored, 20) == clips(disk, 23)
