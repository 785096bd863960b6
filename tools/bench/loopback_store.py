"""A real S3 API on 127.0.0.1 for the tests and the benchmark's store mode (moto's server: pip install 'moto[server]',
the dev extra): moto's standalone server in a process of its own, with a user and a bucket (LoopbackStore), behind
counting reverse proxies that can also stop answering, as a store does when its network goes, and behave like a
remote store: each answer's first byte after `latency` seconds (a real store's GET: 10-50 ms), its body at most
`bandwidth` bytes/s per connection (about 100 MB/s per stream).

The proxy forwards every request unchanged (the Host header too: SigV4 signs it) and counts the GET responses and
their body bytes, so a test can compare what DALI and boto3 fetched with what the shards hold.
"""

import http.client
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# every request after the first AUTH_FREE_ACTIONS must carry a key that moto's IAM knows (moto's documented switch,
# docs.getmoto.org "IAM-like Access Control"); the first ones create that key
AUTH_FREE_ACTIONS = 3
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def free_port(low: int | None = None, high: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing holds now (for a process group's master, a loopback server): the
    kernel's choice, or one in [low, high) (a SLURM job's derived port: trainer/launchers.py JOB_PORTS)."""
    candidates = random.Random(os.getpid()).sample(range(low, high), 50) if low is not None else [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high})")


class MotoServer:
    """`python -m moto.server` on a free loopback port, stopped (and waited for) by stop(), also when it never
    answered."""

    def __init__(self):
        self.port = free_port()
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(AUTH_FREE_ACTIONS)}
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto's server did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def _forward(self):
        proxy = self.server
        if proxy.down.is_set():  # the store stops answering: the connection drops without a response
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        for attempt in range(10):  # moto's server (werkzeug's) now and then resets a new connection: connect again
            upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body,
                                 headers={k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS})
                response = upstream.getresponse()
                data = response.read()
                break
            except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
                time.sleep(0.05 * (attempt + 1))
            finally:
                upstream.close()
        if self.command == "GET":
            with proxy.served.get_lock():
                proxy.served.value += len(data)
                proxy.gets.value += 1
        time.sleep(proxy.latency.value)  # the network's round trip before the first byte
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():  # a HEAD keeps the object's Content-Length
            if key.lower() not in HOP_HEADERS | ({"content-length"} if self.command != "HEAD" else set()):
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self._send_paced(data, proxy.bandwidth.value)

    def _send_paced(self, data: bytes, bandwidth: float) -> None:
        """`data` at most `bandwidth` bytes/s (0: at once), in 256 KB pieces each sent no sooner than its share."""
        start, piece = time.perf_counter(), 1 << 18
        for offset in range(0, len(data), piece):
            if bandwidth:
                time.sleep(max(0.0, start + offset / bandwidth - time.perf_counter()))
            self.wfile.write(data[offset:offset + piece])

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    def log_message(self, *args):
        pass


def _serve(upstream_port, port, served, gets, down, latency, bandwidth) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forward)
    server.daemon_threads = True
    server.upstream_port, server.served, server.gets, server.down = upstream_port, served, gets, down
    server.latency, server.bandwidth = latency, bandwidth
    port.value = server.server_address[1]
    server.serve_forever()


class CountingProxy:
    """127.0.0.1:port -> 127.0.0.1:upstream_port, in a process of its own: DALI holds the GIL while it reads, which
    would stall a proxy thread in the reading process. bytes_served / gets: the GET response bodies and GETs so far;
    down: set it to drop every connection; latency (seconds before each answer) and bandwidth (bytes/s per
    connection, 0: unlimited) may change while it runs."""

    def __init__(self, upstream_port: int, latency: float = 0.0, bandwidth: float = 0.0):
        context = multiprocessing.get_context("spawn")
        self._port, self._served, self._gets = context.Value("i", 0), context.Value("q", 0), context.Value("q", 0)
        self.down, self._latency, self._bandwidth = context.Event(), context.Value("d", latency), context.Value(
            "d", bandwidth)
        self._process = context.Process(target=_serve, args=(upstream_port, self._port, self._served, self._gets,
                                                              self.down, self._latency, self._bandwidth), daemon=True)
        self._process.start()
        deadline = time.time() + 30
        while not self._port.value:
            if time.time() > deadline or not self._process.is_alive():
                self.stop()
                raise RuntimeError("the counting proxy did not start")
            time.sleep(0.05)
        self.port = self._port.value

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bytes_served(self) -> int:
        return self._served.value

    @property
    def gets(self) -> int:
        return self._gets.value

    def behave_remote(self, latency: float, bandwidth: float = 0.0) -> None:
        """Answer after `latency` seconds, at most `bandwidth` bytes/s per connection (0, 0: as a loopback does)."""
        self._latency.value, self._bandwidth.value = latency, bandwidth

    def reset(self) -> None:
        self._served.value = self._gets.value = 0

    def stop(self) -> None:
        self._process.terminate()
        self._process.join(10)


class LoopbackStore:
    """moto's server with a user allowed everything and one bucket; proxies in front of it (the first made here);
    env(proxy): what a process needs to reach the bucket through that proxy (endpoint, the user's key)."""

    def __init__(self, bucket: str):
        import boto3

        self.bucket, self.server, self.proxies = bucket, MotoServer(), []
        try:
            self.proxy = self.new_proxy()
            iam = boto3.session.Session().client("iam", endpoint_url=f"http://127.0.0.1:{self.server.port}",
                                                 region_name="us-east-1", aws_access_key_id="bootstrap",
                                                 aws_secret_access_key="bootstrap")
            iam.create_user(UserName="trainer")
            self.key = iam.create_access_key(UserName="trainer")["AccessKey"]
            iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
            self.s3 = boto3.session.Session(region_name="us-east-1").client(
                "s3", endpoint_url=self.proxy.url, aws_access_key_id=self.key["AccessKeyId"],
                aws_secret_access_key=self.key["SecretAccessKey"])
            self.s3.create_bucket(Bucket=bucket)
        except BaseException:
            self.stop()
            raise

    def new_proxy(self, latency: float = 0.0, bandwidth: float = 0.0) -> CountingProxy:
        self.proxies.append(CountingProxy(self.server.port, latency, bandwidth))
        return self.proxies[-1]

    def upload(self, folder: str, prefix: str, skip=lambda name: False) -> None:
        """The files of `folder` (not its subfolders) as bucket/prefix/name."""
        for name in sorted(os.listdir(folder)):
            if os.path.isfile(os.path.join(folder, name)) and not skip(name):
                self.s3.upload_file(os.path.join(folder, name), self.bucket, f"{prefix}/{name}")

    def env(self, proxy: CountingProxy) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": self.key["SecretAccessKey"],
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": proxy.url,
                "AWS_EC2_METADATA_DISABLED": "true"}  # (nothing beyond 127.0.0.1)

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        self.server.stop()
