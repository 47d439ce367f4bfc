"""Real-process tunnel tests: a local HTTP server (thread), `bidmesh client tunnel`
subprocesses, curl, and leases bought through a light client (tests/test_tunnel_proc.py,
bench/tunnel.py)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CURL = shutil.which("curl")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            # Headers, then nothing until the test releases it (bounded).
            self.send_response(200)
            self.send_header("Content-Length", "1")
            self.end_headers()
            self.wfile.flush()
            self.server.release.wait(60)
            self.wfile.write(b"x")
            return
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        view = memoryview(body)
        try:
            for i in range(0, len(view), 1 << 20):
                self.wfile.write(view[i : i + (1 << 20)])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        h, left = hashlib.sha256(), n
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        answer = json.dumps({"sha256": h.hexdigest(), "bytes": n - left}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.release = threading.Event()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@contextmanager
def http_server() -> Iterator[HttpServer]:
    srv = HttpServer()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def client_cmd(client_dir: Path, node_addr: str, network: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", "client", "--dir", str(client_dir),
            "--node", node_addr, "--network", network, *args]


@dataclass
class TunnelCmd:
    """A running `bidmesh client tunnel` (stderr collected line by line)."""

    popen: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    port: int = 0
    _thread: threading.Thread | None = None

    def _collect(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.popen.poll() is not None and self._thread is not None:
                self._thread.join(2)
                for line in list(self.lines):
                    m = re.search(pattern, line)
                    if m:
                        return m
                raise AssertionError(f"client tunnel exited {self.popen.returncode} before "
                                     f"{pattern!r}: {self.lines[-5:]}")
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s: "
                             f"{self.lines[-5:]}")

    def stop(self, timeout: float = 20.0) -> dict[str, Any]:
        """SIGTERM; the --json summary from stdout."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError("client tunnel did not stop on SIGTERM") from None
        assert self.popen.stdout is not None
        out = self.popen.stdout.read()  # a small summary: it fit in the pipe's buffer
        if self._thread is not None:
            self._thread.join(5)
        assert self.popen.returncode == 0, (self.popen.returncode, self.lines[-5:])
        summary: dict[str, Any] = json.loads(out)
        return summary

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        if self._thread is not None:
            self._thread.join(5)
        for f in (self.popen.stdout, self.popen.stderr):
            if f is not None:
                f.close()


@contextmanager
def client_tunnel(client_dir: Path, node_addr: str, network: str, lease_hex: str,
                  *extra: str, ready_timeout: float = 60.0,
                  wait_ready: bool = True) -> Iterator[TunnelCmd]:
    """`bidmesh client tunnel` under the lease, yielded once its proxy listens (with
    `wait_ready=False` at once: a lease that has not started keeps it waiting)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    popen = subprocess.Popen(
        client_cmd(client_dir, node_addr, network, "tunnel", lease_hex, "--socks",
                   "127.0.0.1:0", "--json", "--progress", "no", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    cmd = TunnelCmd(popen)
    cmd._thread = threading.Thread(target=cmd._collect, daemon=True)
    cmd._thread.start()
    try:
        if wait_ready:
            cmd.port = int(cmd.wait_line(r"SOCKS5 proxy on 127\.0\.0\.1:(\d+)",
                                         ready_timeout)[1])
        yield cmd
    finally:
        cmd.close()


def curl(socks_port: int, url: str, *args: str, timeout: float = 120.0,
         ) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", "--socks5-hostname", f"127.0.0.1:{socks_port}",
                           "--noproxy", "", *args, url],
                          capture_output=True, timeout=timeout)
