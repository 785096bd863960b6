"""Where a shard set lives, chosen from its location string: a local folder, an S3 bucket (or an S3-compatible
store), Google Cloud Storage through its S3-interoperable API, or a plain http(s) server. A store reads the set's
JSON files, lists its objects' sizes (what the damage check compares with the manifest) and says which path DALI
reads for a file.

A remote split is copied once into a node-local cache (NodeCache) when it fits there, and DALI reads the copy: on
a loopback S3 store (README, "Data in object storage") DALI streaming the objects itself (its bundled AWS SDK, with
ranged GETs) fetched 1.14x the split per epoch and the trainer waited for data 72% of the time against 5.5% from
disk, while the cached copy costs one pass over the split, once, and then reads at disk speed. A split that does not
fit goes through a shard window on the node's disk (dali_pipes/shard_window.py: the shards its ranks read next,
fetched whole ahead of the reader, given back once read); with the cache off (MAE_ST_SHARD_CACHE_GB=0) DALI streams
it straight from the store (docs.nvidia.com/deeplearning/dali, "Reading from S3": AWS_* from the environment). DALI
reads nothing over http, so an http(s) split must fit the cache. Credentials come only from
the environment, never from the command line, and no message carries them.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from tqdm import tqdm

log = logging.getLogger("dali_pipes")
GCS_HELP = ("gs:// is read through Google Cloud Storage's S3-interoperable XML API: create an HMAC key for a service "
            "account (cloud.google.com/storage/docs/interoperability) and set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY to it and AWS_ENDPOINT_URL=https://storage.googleapis.com")
CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
                     "403"}


@dataclass(frozen=True)
class Expected:
    """What a set's manifest says of one of its files (None: not recorded, as in sets built before it was)."""

    size: int | None = None
    sha256: str | None = None


class StoreRefused(FileNotFoundError):
    """The store cannot serve the set (unreachable, credentials refused, no such bucket or object): one line naming
    what, never a secret. A FileNotFoundError, so that whatever refuses a missing local set refuses this too."""


class StoreUnavailable(RuntimeError):
    """The store stopped answering in the middle of a run and did not come back within the reader's retries."""


class LocalStore:
    """A folder on this machine (or a shared filesystem)."""

    streamed = False  # DALI reads the files here, not over a network
    lists = True  # sizes() reads the files themselves: a damaged set is judged before anything is fetched

    def __init__(self, folder: str):
        self.location = folder

    def read_json(self, name: str) -> dict | None:
        """The JSON file `name` of the set, or None when it is absent."""
        if not os.path.isdir(self.location):
            raise StoreRefused(f"no shards folder {self.location}")
        path = os.path.join(self.location, name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def fetch(self, files: dict) -> None:
        """Make {name: Expected} readable by DALI: here they already are."""

    def sizes(self) -> dict:
        """{file name: bytes} of every file of the set."""
        return {entry.name: entry.stat().st_size for entry in os.scandir(self.location) if entry.is_file()}

    def dali_path(self, name: str) -> str:
        return os.path.join(self.location, name)

    def open(self, name: str):
        """A stream of the file's bytes (the preflight times one)."""
        return open(os.path.join(self.location, name), "rb")


class S3Store:
    """s3://bucket/prefix, read with boto3 here and by DALI's AWS SDK in the pipelines; the endpoint, region and
    credentials are the standard environment variables, which both read."""

    lists = True  # sizes() lists the objects: a damaged set is judged before anything is copied

    def __init__(self, location: str, bucket: str, prefix: str):
        import boto3  # only a remote set needs it

        self.location, self.bucket, self.prefix = location, bucket, prefix.strip("/")
        # a session of its own: boto3's default one keeps the credentials it first found in the environment
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.client = boto3.session.Session(region_name=region).client("s3")
        self.cache, self.cached = NodeCache(location), set()
        self.streamed = True  # DALI reads the objects from the store (False once the split is in the node cache)
        self.windowed = False  # the split does not fit the cache: its shards go through a window (shard_window.py)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read_json(self, name: str) -> dict | None:
        with self.refusals(name):
            try:
                return json.loads(self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read())
            except self.client.exceptions.NoSuchKey:
                return None

    def fetch(self, files: dict) -> None:
        """Copy {name: Expected} into the node cache when they fit there (those the store holds at their size: the
        damage check judges the store's listing), else leave DALI to stream them."""
        listed = self.sizes()
        whole = {name: e for name, e in files.items() if name in listed and e.size in (None, listed[name])}
        split = sum(listed.get(name, 0) for name in files) / 1e9
        if not self.cache.enabled:
            log.warning("%s: the node cache is off (MAE_ST_SHARD_CACHE_GB=0): DALI streams the split (%.3f GB) from "
                        "the store every epoch", self.location, split)
        elif self.cache.fill(whole, self.open):
            if self.cache.wrong_sizes:  # (listed whole a moment ago: the objects are being replaced)
                raise StoreRefused(f"{self.location}: the store sent {', '.join(sorted(self.cache.wrong_sizes))} at "
                                   "other sizes than it listed them: is the set being published again?")
            self.cached, self.streamed = set(whole), False
        else:  # the indexes (DALI reads them all when it starts) copied; the shards through the window
            indexes = {name: e for name, e in whole.items() if not name.endswith(".tar")}
            if not self.cache.fill(indexes, self.open):
                log.warning("%s: not even the split's indexes fit the node cache %s (%.3f GB, MAE_ST_SHARD_CACHE_GB) "
                            "beside the splits in use: DALI streams the split from the store every epoch",
                            self.location, self.cache.root, self.cache.limit() / 1e9)
                return
            self.cached, self.streamed, self.windowed = set(indexes), False, True
            log.info("%s: the split (%.1f GB) does not fit the node cache %s (%.1f GB, MAE_ST_SHARD_CACHE_GB): its "
                     "shards go through a window on this node's disk, fetched ahead of the reader", self.location,
                     split, self.cache.root, self.cache.limit() / 1e9)

    def sizes(self) -> dict:
        """One paginated listing of the prefix."""
        found, start = {}, len(self.key(""))
        with self.refusals(self.key("")):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key("")):
                found.update({item["Key"][start:]: item["Size"] for item in page.get("Contents", [])})
        return found

    @property
    def window_folder(self) -> str:
        """Where the split's shard window lives: beside its cached indexes."""
        return os.path.join(self.cache.folder, "window")

    def dali_path(self, name: str) -> str:
        if name in self.cached:
            return self.cache.path(name)
        return os.path.join(self.window_folder, name) if self.windowed else f"s3://{self.bucket}/{self.key(name)}"

    def open(self, name: str):
        """A stream of the object, or None when the store has none."""
        with self.refusals(name):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
            except self.client.exceptions.NoSuchKey:
                return None

    def put(self, path: str, name: str) -> None:
        """Upload a local file as the set's `name` (boto3's managed transfer: multipart for large files)."""
        with self.refusals(name):
            self.client.upload_file(path, self.bucket, self.key(name))

    @contextlib.contextmanager
    def refusals(self, name: str):
        """boto3's errors about `name` as one StoreRefused line."""
        import botocore.exceptions as bx

        where, endpoint = f"s3://{self.bucket}/{self.key(name)}", self.client.meta.endpoint_url
        try:
            yield
        except bx.NoCredentialsError:
            raise StoreRefused(f"{where}: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
                               "environment") from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError):
            raise StoreRefused(f"{where}: the store at {endpoint} does not answer (AWS_ENDPOINT_URL, network)") \
                from None
        except bx.ClientError as err:
            code = str(err.response.get("Error", {}).get("Code"))
            if code in CREDENTIAL_ERRORS:
                raise StoreRefused(f"{where}: the store at {endpoint} refused the credentials ({code}): check "
                                   "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment") from None
            if code == "NoSuchBucket":
                raise StoreRefused(f"{where}: no bucket {self.bucket!r} at {endpoint}") from None
            raise StoreRefused(f"{where}: the store at {endpoint} answered {code}") from None


class NodeCache:
    """A node-local folder of remote splits: MAE_ST_SHARD_CACHE (default: the system's temporary folder, which is on
    the node's own disk on most clusters), one folder per location, at most MAE_ST_SHARD_CACHE_GB in all (default:
    half the free space there, plus what the cache holds; 0 turns caching off). Every rank of the node shares it:
    the first copies, the others find the copy (a lock makes them wait rather than copy too). Each writer copies into
    a temporary name of its own and publishes a file (an atomic rename) only at the size and SHA-256 the manifest
    gives it, so two writers never mix their bytes, even where the lock is a no-op. A process using a split holds a
    lease on it (a file named after its PID, live while the process is); the splits used longest ago are evicted to
    make room for a new one, never one a live process holds. The folder must be node-local: on a network filesystem
    (NFS, Lustre, GPFS, ...) locks may be no-ops and the eviction of one node would delete another's split in use,
    so such a folder is refused with the reason."""

    def __init__(self, location: str):
        self.root = os.environ.get("MAE_ST_SHARD_CACHE") or os.path.join(tempfile.gettempdir(), "mae_st_shards")
        self.folder = os.path.join(self.root, hashlib.sha256(location.encode()).hexdigest()[:16])
        self.wrong_sizes = {}  # files the store sent at another size than the manifest's: not published

    @property
    def enabled(self) -> bool:
        return os.environ.get("MAE_ST_SHARD_CACHE_GB") not in ("0", "0.0")

    def held(self) -> int:
        """Bytes the cache holds: its splits' copies and indexes (a window's shards are not counted here)."""
        return sum(_folder_bytes(e.path) for e in os.scandir(self.root) if e.is_dir()) if os.path.isdir(
            self.root) else 0

    def limit(self) -> float:
        """Bytes the cache may hold."""
        limit = os.environ.get("MAE_ST_SHARD_CACHE_GB")
        return float(limit) * 1e9 if limit else shutil.disk_usage(self.root).free / 2 + self.held()

    def room(self) -> float:
        """Bytes left for a window of this location's split: the limit less what the cache holds."""
        return max(0.0, self.limit() - self.held())

    def fill(self, files: dict, open_file) -> bool:
        """Copy {name: Expected} with open_file(name) (a stream, or None when the store has no such file), those
        already here whole left alone, and hold this split; False, copying nothing, when it does not fit."""
        os.makedirs(self.folder, exist_ok=True)
        _refuse_network_filesystem(self.root)
        with open(os.path.join(self.root, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            present = self.sizes()
            todo = {name: e for name, e in files.items()
                    if name not in present or (e.size is not None and present[name] != e.size)}
            if not self._make_room(sum(e.size or 0 for e in todo.values())):
                return False
            self._hold()
            os.utime(self.folder)  # last used: what eviction goes by
            with tqdm(total=sum(e.size or 0 for e in todo.values()), unit="B", unit_scale=True, disable=None,
                      desc=f"copying into the node cache {self.folder}") as progress:
                for name, expected in todo.items():
                    self._copy(name, expected, open_file)
                    progress.update(expected.size or 0)
            if todo:
                log.info("copied %d files (%.1f MB) into the node cache %s", len(todo),
                         sum(e.size or 0 for e in todo.values()) / 1e6, self.folder)
            return True

    def _hold(self) -> None:
        """This process's lease on the split: eviction leaves a split alone while a process holding it lives."""
        open(os.path.join(self.folder, f".in_use.{os.getpid()}"), "w").close()

    def _make_room(self, needed: int) -> bool:
        """Evict other splits no live process holds, those used longest ago first, until `needed` bytes fit."""
        held = {entry.path: _folder_bytes(entry.path) for entry in os.scandir(self.root) if entry.is_dir()}
        limit = self.limit()
        if needed + held.get(self.folder, 0) > limit:
            return False
        for folder in sorted(set(held) - {self.folder}, key=os.path.getmtime):
            if needed + sum(held.values()) <= limit:
                break
            if _in_use(folder):
                continue
            log.info("node cache: evicting %s (%.1f MB, last used %s)", folder, held[folder] / 1e6,
                     time.ctime(os.path.getmtime(folder)))
            shutil.rmtree(folder, ignore_errors=True)
            del held[folder]
        return needed + sum(held.values()) <= limit

    def _copy(self, name: str, expected: Expected, open_file) -> None:
        response = open_file(name)
        if response is None:
            return  # the damage check names it missing
        partial = os.path.join(self.folder, f".{name}.{socket.gethostname()}.{os.getpid()}.partial")  # this writer's
        digest = hashlib.sha256()
        with response, open(partial, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        got = os.path.getsize(partial)
        if expected.size is not None and got != expected.size:
            os.remove(partial)
            self.wrong_sizes[name] = got
            return
        if expected.sha256 is not None and digest.hexdigest() != expected.sha256:
            os.remove(partial)
            raise StoreRefused(f"{name}: the store sent {got:,} bytes whose SHA-256 is not the manifest's: the object "
                               "is damaged in the store (publish the set again: tools/build_shards.py --out)")
        os.replace(partial, os.path.join(self.folder, name))

    def sizes(self) -> dict:
        found = {entry.name: entry.stat().st_size for entry in os.scandir(self.folder)
                 if entry.is_file() and not entry.name.startswith(".")} if os.path.isdir(self.folder) else {}
        return {**found, **self.wrong_sizes}

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)


# filesystems whose folders other nodes also see (their locks may be no-ops: NFS without lockd, Lustre's localflock)
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "glusterfs",
                       "fuse.glusterfs", "panfs", "wekafs", "orangefs", "afs", "9p", "fuse.sshfs", "fuse.s3fs",
                       "fuse.gcsfuse", "fuse.juicefs", "fuse.ceph"}


def filesystem_type(path: str) -> str:
    """The type of the filesystem `path` is on, from /proc/mounts (the longest mount point above it); "" if unknown."""
    path, best, kind = os.path.realpath(path), "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mount = fields[1].replace("\\040", " ")
                    if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                        best, kind = mount, fields[2]
    except OSError:
        return ""
    return kind


def _refuse_network_filesystem(root: str) -> None:
    kind = filesystem_type(root)
    if kind in NETWORK_FILESYSTEMS:
        raise StoreRefused(f"the node cache {root} is on a {kind} filesystem, which other nodes share: a node cache "
                           "must be on the node's own disk (its lock and eviction assume one node). Set "
                           "MAE_ST_SHARD_CACHE to a local folder (/tmp, a local NVMe), or copy the set to the shared "
                           "filesystem once and give --data that folder")


def _in_use(folder: str) -> bool:
    """Whether a live process of this node holds the split in `folder` (leases of dead processes are removed)."""
    live = False
    for entry in os.scandir(folder):
        if entry.name.startswith(".in_use."):
            try:
                os.kill(int(entry.name.rsplit(".", 1)[1]), 0)
                live = True
            except ProcessLookupError:
                os.remove(entry.path)
            except (PermissionError, ValueError):  # another user's live process; a name not ours
                live = True
    return live


def _folder_bytes(folder: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file())


class HttpStore:
    """http(s)://host/path: DALI cannot read it, so each split must fit the node cache and is read from there."""

    streamed = False  # DALI reads the node's copy
    lists = False  # an http server lists nothing: sizes() are the node cache's copies

    def __init__(self, location: str):
        self.location = location.rstrip("/")
        self.cache = NodeCache(self.location)

    def open(self, name: str):
        """The server's response for the file, or None when it has none."""
        url = f"{self.location}/{urllib.parse.quote(name)}"
        try:
            return urllib.request.urlopen(url, timeout=60)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise StoreRefused(f"{url}: the server answered {err.code} {err.reason}") from None
        except (urllib.error.URLError, TimeoutError) as err:
            raise StoreRefused(f"{url}: the server does not answer ({getattr(err, 'reason', err)})") from None

    def read_json(self, name: str) -> dict | None:
        response = self.open(name)
        if response is None:
            return None
        with response:
            return json.load(response)

    def fetch(self, files: dict) -> None:
        """Copy {name: Expected} into the node cache."""
        why = "the node cache is off (MAE_ST_SHARD_CACHE_GB=0)" if not self.cache.enabled else None
        if why is None and not self.cache.fill(files, self.open):
            why = (f"the split ({sum(e.size or 0 for e in files.values()) / 1e9:.1f} GB) does not fit the node cache "
                   f"{self.cache.root} (MAE_ST_SHARD_CACHE, MAE_ST_SHARD_CACHE_GB)")
        if why:
            raise StoreRefused(f"{self.location}: {why}, and DALI cannot read http: copy the set to a filesystem or an "
                               "S3 store")

    def sizes(self) -> dict:
        return self.cache.sizes()

    def dali_path(self, name: str) -> str:
        return self.cache.path(name)


def open_store(location: str):
    """The store of a location: s3://bucket/prefix, gs://bucket/prefix, http(s)://..., or a local folder."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme in ("s3", "gs"):
        if not parsed.netloc:
            raise StoreRefused(f"{location}: no bucket (write {parsed.scheme}://bucket/prefix)")
        if parsed.scheme == "gs" and not os.environ.get("AWS_ENDPOINT_URL"):
            raise StoreRefused(f"{location}: {GCS_HELP}")
        return S3Store(location, parsed.netloc, parsed.path)
    if parsed.scheme in ("http", "https"):
        return HttpStore(location)
    return LocalStore(location)
