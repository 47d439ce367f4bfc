"""The local control socket's wire format and its blocking client.

`control.sock` (mode 0600, in the node's data dir) speaks u32-big-endian-length-
prefixed msgpack maps `{"op": ..., ...}` -> `{"ok": true, ...}` /
`{"ok": false, "error", "reason"}`; the server side is node/control_server.py.
This module needs no trio or libp2p, so the CLI, tests and benches can use it cheaply.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

from . import codec
from .errors import OperationError, RemoteError

CONTROL_MAX = 8 * 1024 * 1024
LEN = struct.Struct(">I")


def control_call(data_dir: str | Path, request: dict[str, Any], timeout: float = 30.0,
                 ) -> dict[str, Any]:
    """Blocking client for a running node's control socket."""
    path = Path(data_dir) / "control.sock"
    data = codec.pack(request)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(LEN.pack(len(data)) + data)
            head = _recv_exact(s, LEN.size)
            (n,) = LEN.unpack(head)
            resp = codec.unpack(_recv_exact(s, n), CONTROL_MAX)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise OperationError(f"no node running with data dir {data_dir} ({e.strerror})") from e
    except OSError as e:
        raise OperationError(f"control socket {path}: {e}") from e
    if not isinstance(resp, dict):
        raise RemoteError("malformed control response")
    if not resp.get("ok"):
        raise RemoteError(f"{resp.get('reason')}: {resp.get('error')}")
    return resp


class ControlConnection:
    """One control connection for many calls (`with ControlConnection(dir) as c:
    c.call(req)`): a client calling often (a publisher's events) spares the node an
    accept, a handler task and a close per call, most of a small call's cost there."""

    def __init__(self, data_dir: str | Path, timeout: float = 30.0) -> None:
        self.path = Path(data_dir) / "control.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self._sock.close()
            raise OperationError(f"no node running with data dir {data_dir} "
                                 f"({e.strerror})") from e
        except OSError as e:
            self._sock.close()
            raise OperationError(f"control socket {self.path}: {e}") from e

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        data = codec.pack(request)
        try:
            self._sock.sendall(LEN.pack(len(data)) + data)
            (n,) = LEN.unpack(_recv_exact(self._sock, LEN.size))
            resp = codec.unpack(_recv_exact(self._sock, n), CONTROL_MAX)
        except OSError as e:
            raise OperationError(f"control socket {self.path}: {e}") from e
        if not isinstance(resp, dict):
            raise RemoteError("malformed control response")
        if not resp.get("ok"):
            raise RemoteError(f"{resp.get('reason')}: {resp.get('error')}")
        return resp

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OperationError("control socket closed before the answer")
        buf += chunk
    return bytes(buf)

