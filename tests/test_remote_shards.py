"""Shard sets in object storage against a real S3 API on 127.0.0.1 (moto's server, behind a counting proxy): the same
losses as on disk, the bytes one epoch fetches, refusals before the start, a store that stops answering (retries,
StoreUnavailable, exit 4) or comes back (the identical stream), publishing with build_shards, the node cache (one
copy, re-used, evicted, streaming when the split does not fit), and an http(s) set copied once into it. The module
streams from the store unless a test gives the cache room (MAE_ST_SHARD_CACHE_GB=0 by default here)."""

import functools
import http.server
import json
import logging
import os
import subprocess
import sys
import threading

import boto3
import pytest

from conftest import make_shards, process_env
from dali_pipes.config import LoaderConfig
from dali_pipes.cursor import Cursor
from dali_pipes.reader import ShardReader
from dali_pipes.shard_set import open_shard_set
from dali_pipes.shard_store import Expected, NodeCache, S3Store, StoreRefused, StoreUnavailable
from loopback_store import CountingProxy, MotoServer
from tools import build_shards
from trainer import pretrain

BUCKET = "shards-bucket"
TINY = ["crop_size=32", "model.img_size=32", "num_frames=4", "model.num_frames=4", "model.pred_t_dim=2",
        "model.depth=2", "model.embed_dim=64", "model.decoder_depth=1", "num_threads=1", "image_every=0",
        "shuffle_buffer=4"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def loopback_store(tmp_path_factory):
    """(proxy, the local shards folder, the user's key): moto's server with a user, a bucket with the set under set/,
    and the counting proxy in front of it, once per test process: DALI's AWS SDK keeps the first endpoint a process
    gives it, so a second server (a module's fixture made again after pytest-xdist moved on and came back) would be
    unreachable for DALI."""
    shards = make_shards(tmp_path_factory.mktemp("remote"), n=8, frames=40)
    server = MotoServer()
    proxy = None
    try:
        proxy = CountingProxy(server.port)
        iam = boto3.session.Session().client("iam", endpoint_url=f"http://127.0.0.1:{server.port}",
                                             region_name="us-east-1", aws_access_key_id="bootstrap",
                                             aws_secret_access_key="bootstrap")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        s3 = boto3.session.Session(region_name="us-east-1").client(
            "s3", endpoint_url=proxy.url, aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"])
        s3.create_bucket(Bucket=BUCKET)
        for name in os.listdir(shards):
            if os.path.isfile(os.path.join(shards, name)):
                s3.upload_file(os.path.join(shards, name), BUCKET, f"set/{name}")
                if not name.endswith("000001.idx"):  # a copy of the set that lacks one index
                    s3.upload_file(os.path.join(shards, name), BUCKET, f"noindex/{name}")
        yield proxy, shards, key
    finally:
        if proxy:
            proxy.stop()
        server.stop()


@pytest.fixture(scope="module")
def store(loopback_store, tmp_path_factory):
    """(proxy, the local shards folder), the environment pointing at them (endpoint, the user's key, the node cache)
    for this module's tests."""
    proxy, shards, key = loopback_store
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED",
                                            "MAE_ST_SHARD_CACHE", "MAE_ST_SHARD_CACHE_GB")}
    try:
        os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
                          AWS_REGION="us-east-1", AWS_ENDPOINT_URL=proxy.url,
                          AWS_EC2_METADATA_DISABLED="true",  # nothing beyond 127.0.0.1
                          MAE_ST_SHARD_CACHE=str(tmp_path_factory.mktemp("cache")), MAE_ST_SHARD_CACHE_GB="0")
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


def test_the_node_cache_evicts_the_split_used_longest_ago_and_streams_what_cannot_fit(store, tmp_path, monkeypatch):
    _, shards = store
    split = json.load(open(os.path.join(shards, "manifest.json")))["splits"]["train"]
    index_bytes = sum(os.path.getsize(os.path.join(shards, s["index"])) for s in split["shards"])
    monkeypatch.setenv("MAE_ST_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MAE_ST_SHARD_CACHE_GB", str(1.5 * (split["bytes"] + index_bytes) / 1e9))  # one split fits
    first = open_shard_set(f"s3://{BUCKET}/set", "train")
    folder = os.path.dirname(first.tars[0])
    os.utime(folder, (1, 1))  # used long ago
    second = open_shard_set(f"s3://{BUCKET}/noindex", "train", skip_damaged=True)
    assert second.streamed and os.path.exists(first.tars[0])  # this process holds the first: it stays
    (lease,) = [name for name in os.listdir(folder) if name.startswith(".in_use.")]
    os.rename(os.path.join(folder, lease), os.path.join(folder, ".in_use.999999999"))  # as if its process had ended
    second = open_shard_set(f"s3://{BUCKET}/noindex", "train", skip_damaged=True)
    assert not second.streamed and not os.path.exists(first.tars[0])  # the first split made room for the second
    monkeypatch.setenv("MAE_ST_SHARD_CACHE_GB", str(0.5 * split["bytes"] / 1e9))  # too small for any split
    third = open_shard_set(f"s3://{BUCKET}/set", "train")
    assert third.streamed and third.tars[0].startswith(f"s3://{BUCKET}/set/")
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
