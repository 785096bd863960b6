"""A real S3 API on 127.0.0.1 for the tests: moto's standalone server in a process of its own, behind a counting
reverse proxy that can also stop answering, as a store does when its network goes.

The proxy forwards every request unchanged (the Host header too: SigV4 signs it) and counts the body bytes of the
responses to GETs, so a test can compare what DALI and boto3 fetched with what the shards hold.
"""

import http.client
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import free_port

# every request after the first AUTH_FREE_ACTIONS must carry a key that moto's IAM knows (moto's documented switch,
# docs.getmoto.org "IAM-like Access Control"); the first ones create that key
AUTH_FREE_ACTIONS = 3
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


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
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():  # a HEAD keeps the object's Content-Length
            if key.lower() not in HOP_HEADERS | ({"content-length"} if self.command != "HEAD" else set()):
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    def log_message(self, *args):
        pass


def _serve(upstream_port, port, served, down) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forward)
    server.daemon_threads = True
    server.upstream_port, server.served, server.down = upstream_port, served, down
    port.value = server.server_address[1]
    server.serve_forever()


class CountingProxy:
    """127.0.0.1:port -> 127.0.0.1:upstream_port, in a process of its own: DALI holds the GIL while it reads, which
    would stall a proxy thread in the reading process. bytes_served: the GET response bodies so far; down: set it to
    drop every connection."""

    def __init__(self, upstream_port: int):
        context = multiprocessing.get_context("spawn")
        self._port, self._served, self.down = context.Value("i", 0), context.Value("q", 0), context.Event()
        self._process = context.Process(target=_serve, args=(upstream_port, self._port, self._served, self.down),
                                        daemon=True)
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

    def reset(self) -> None:
        self._served.value = 0

    def stop(self) -> None:
        self._process.terminate()
        self._process.join(10)
