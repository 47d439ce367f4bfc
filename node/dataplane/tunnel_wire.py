"""Tunnel wire formats (pure): the opening frame, the provider's reply, the typed frames
that follow and the closing summary. Specified in docs/dataplane.md §14.

Every message is a `node.p2p` frame (`u32 BE length | payload`). After the opening
exchange each payload starts with one type byte: DATA (bytes of the tunnelled TCP
connection), EOF (the sender's side half-closed) and, from the provider only, END (a
msgpack summary; the last frame of the tunnel).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .. import codec
from ..errors import InvalidMessage, Reason, UsageError

__all__ = [
    "DATA",
    "END",
    "EOF",
    "MAX_DATA",
    "MAX_OPEN",
    "TunnelEnd",
    "TunnelOpen",
    "TunnelReply",
    "tunnel_protocol",
]

VERSION: Final = 1
MAX_OPEN: Final = 1024
"""Largest opening frame (and reply) in bytes."""
MAX_DATA: Final = 256 << 10
"""Largest DATA payload either side may send (the type byte not counted)."""
DATA: Final = b"\x00"
EOF: Final = b"\x01"
END: Final = b"\x02"
MAX_HOST: Final = 253
MAX_MESSAGE: Final = 512
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?")

# Reasons a member may see (docs/dataplane.md §14). Lease reasons are an Unauthorized.
AUTH_REASONS: Final = frozenset({Reason.NO_LEASE, Reason.NOT_OUR_LEASE, Reason.OUTSIDE_WINDOW,
                                 Reason.NOT_MEMBER, Reason.BAD_DELEGATION, Reason.LEASE_CLOSED,
                                 Reason.LEASE_ENDED, Reason.WRONG_SERVICE, Reason.UNAUTHORIZED})


def tunnel_protocol(network: str) -> str:
    return f"/bidmesh/{network}/tunnel/1"


def _bad(message: str) -> InvalidMessage:
    return InvalidMessage(message, Reason.BAD_OPEN)


def check_host(host: str) -> str:
    """A destination host: an IP literal or a DNS name (ASCII, 1..253 characters)."""
    if not isinstance(host, str) or not 1 <= len(host) <= MAX_HOST:
        raise _bad(f"host must be 1..{MAX_HOST} characters")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host) or ".." in host:
        raise _bad(f"host {host[:64]!r} is neither an IP address nor a DNS name")
    return host.lower()


def _dict(data: bytes, what: str) -> dict[str, Any]:
    d = codec.unpack(data, MAX_OPEN)
    if not isinstance(d, dict):
        raise _bad(f"{what} must be a msgpack map")
    if d.get("v") != VERSION:
        raise InvalidMessage(f"unsupported {what} version {d.get('v')!r}", Reason.BAD_VERSION)
    return d


def _str(d: Mapping[str, Any], k: str, limit: int = MAX_MESSAGE) -> str:
    v = d.get(k, "")
    if not isinstance(v, str):
        raise _bad(f"{k} must be a string")
    return v[:limit]


def _uint(d: Mapping[str, Any], k: str, hi: int = 1 << 62) -> int | None:
    v = d.get(k)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise _bad(f"{k} must be an integer in 0..{hi} or nil")
    return v


@dataclass(frozen=True)
class TunnelOpen:
    """The member's opening frame: which lease, who (delegation), and where to."""

    lease: bytes
    host: str
    port: int
    delegation: bytes | None = None

    def __post_init__(self) -> None:
        if len(self.lease) != 32:
            raise UsageError("TunnelOpen.lease must be the 32-byte lease id")
        if not 1 <= self.port <= 65535:
            raise UsageError("TunnelOpen.port must be 1..65535")
        if self.delegation is not None and not 1 <= len(self.delegation) <= 512:
            raise UsageError("a delegation token is 1..512 bytes")
        try:
            object.__setattr__(self, "host", check_host(self.host))
        except InvalidMessage as e:
            raise UsageError(str(e)) from None

    def encode(self) -> bytes:
        return codec.pack({"v": VERSION, "lease": self.lease, "host": self.host,
                           "port": self.port, "delegation": self.delegation})

    @classmethod
    def decode(cls, data: bytes) -> TunnelOpen:
        d = _dict(data, "tunnel opening frame")
        lease, port, host = d.get("lease"), d.get("port"), d.get("host")
        if not isinstance(lease, bytes) or len(lease) != 32:
            raise _bad("lease must be the 32-byte lease id")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise _bad("port must be an integer in 1..65535")
        if not isinstance(host, str):
            raise _bad("host must be a string")
        host = check_host(host)
        delegation = d.get("delegation")
        if delegation is not None and (not isinstance(delegation, bytes)
                                       or not 1 <= len(delegation) <= 512):
            raise _bad("delegation must be the token bytes (1..512) or nil")
        return cls(lease, host, port, delegation)


@dataclass(frozen=True)
class TunnelReply:
    """The provider's answer to the opening frame: ok (with the address it connected to
    and the lease's limits) or a reason code. After a refusal the provider closes."""

    ok: bool
    reason: str = ""
    error: str = ""
    addr: str = ""  # the IP address the provider connected to
    max_rate_bps: int | None = None
    min_rate_bps: int | None = None
    end_ms: int | None = None

    def encode(self) -> bytes:
        if self.ok:
            return codec.pack({"v": VERSION, "ok": True, "addr": self.addr,
                               "max_rate_bps": self.max_rate_bps,
                               "min_rate_bps": self.min_rate_bps, "end_ms": self.end_ms})
        return codec.pack({"v": VERSION, "ok": False, "reason": self.reason[:64],
                           "error": self.error[:MAX_MESSAGE]})

    @classmethod
    def decode(cls, data: bytes) -> TunnelReply:
        d = _dict(data, "tunnel reply")
        ok = d.get("ok")
        if not isinstance(ok, bool):
            raise _bad("ok must be a boolean")
        if not ok:
            return cls(False, _str(d, "reason", 64) or "refused", _str(d, "error"))
        return cls(True, addr=_str(d, "addr", 64), max_rate_bps=_uint(d, "max_rate_bps"),
                   min_rate_bps=_uint(d, "min_rate_bps"), end_ms=_uint(d, "end_ms"))


@dataclass(frozen=True)
class TunnelEnd:
    """The provider's last frame: why the tunnel ended and what it carried.

    `bytes_up`: member → destination; `bytes_down`: destination → member."""

    ok: bool
    reason: str = ""
    error: str = ""
    bytes_up: int = 0
    bytes_down: int = 0

    def encode(self) -> bytes:
        return END + codec.pack({"ok": self.ok, "reason": self.reason[:64],
                                 "error": self.error[:MAX_MESSAGE],
                                 "bytes_up": self.bytes_up, "bytes_down": self.bytes_down})

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> TunnelEnd:
        """`payload`: the frame without its END type byte."""
        d = codec.unpack(bytes(payload), MAX_OPEN)
        if not isinstance(d, dict) or not isinstance(d.get("ok"), bool):
            raise InvalidMessage("malformed tunnel END frame", Reason.BAD_FRAME)
        return cls(d["ok"], _str(d, "reason", 64), _str(d, "error"),
                   _uint(d, "bytes_up") or 0, _uint(d, "bytes_down") or 0)
