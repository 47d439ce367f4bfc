"""Dataplane wire formats (pure): the ingest header and trailer, the provider-to-provider
process request and response, and the per-lease key agreement.

Every message is validated into a frozen dataclass on decode; bad input raises
`InvalidMessage` (a PeerError) with a reason code. Formats: docs/dataplane.md §8–9.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import codec
from ..errors import InvalidMessage, PeerError, Reason, UsageError
from ..keys import Identity
from ..segments import MAX_CHAINS, PROTOCOLS

__all__ = [
    "SESSION_ERROR_ID",
    "TRAILER_SEQ",
    "U64",
    "ProcessRequest",
    "SegmentLimits",
    "SessionResponse",
    "StreamHeader",
    "Trailer",
    "decode_outputs",
    "encode_outputs",
    "encode_session_error",
    "encode_session_response",
    "lease_key",
    "process_protocol",
    "session_protocol",
    "session_response_parts",
    "stream_protocol",
]

VERSION: Final = 1
TRAILER_SEQ: Final = (1 << 64) - 1
"""The output frame with this seq is the trailer, not a result."""
MAX_SERVICE_NAME: Final = 64
MAX_STREAM_ID: Final = 64
KEY_INFO: Final = b"bidmesh/lease-key/v1"
SESSION_ERROR_ID: Final = (1 << 64) - 1
"""A process-session response with this id refuses the whole session."""
_U32: Final = struct.Struct(">I")
U64: Final = struct.Struct(">Q")
"""Big-endian u64: output frames' seq, process-session request ids."""


def stream_protocol(network: str) -> str:
    return f"/bidmesh/{network}/stream/1"


def process_protocol(network: str) -> str:
    return f"/bidmesh/{network}/process/1"


def session_protocol(network: str) -> str:
    """Process sessions: many pipelined process requests over one kept stream."""
    return f"/bidmesh/{network}/process/2"


def _bad(message: str, reason: str = Reason.BAD_HEADER) -> InvalidMessage:
    return InvalidMessage(message, reason)


def _int(d: Mapping[str, Any], k: str, lo: int, hi: int, default: int | None = None) -> int:
    v = d.get(k, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(f"{k} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _bytes(d: Mapping[str, Any], k: str, lo: int, hi: int) -> bytes:
    v = d.get(k)
    if not isinstance(v, bytes) or not lo <= len(v) <= hi:
        raise _bad(f"{k} must be {lo}..{hi} bytes")
    return v


def check_chains(chains: Any, max_chains: int = MAX_CHAINS, max_len: int = 8) -> tuple[
    tuple[str, ...], ...
]:
    if not isinstance(chains, list | tuple) or not 1 <= len(chains) <= max_chains:
        raise _bad(f"chains must be a list of 1..{max_chains} service chains")
    out = []
    for c in chains:
        if not isinstance(c, list | tuple) or not 1 <= len(c) <= max_len:
            raise _bad(f"each chain must list 1..{max_len} services")
        for s in c:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_SERVICE_NAME:
                raise _bad(f"service names are 1..{MAX_SERVICE_NAME} characters, got {s!r}")
        out.append(tuple(c))
    return tuple(out)


@dataclass(frozen=True)
class SegmentLimits:
    """How the provider cuts the stream: see `Segmenter`. `max_age_ms=None`: no time cuts."""

    max_packets: int = 256
    max_bytes: int = 1 << 20
    max_age_ms: int | None = None

    def __post_init__(self) -> None:
        if self.max_packets < 1 or self.max_bytes < 5:
            raise UsageError("SegmentLimits needs max_packets >= 1 and max_bytes >= 5")
        if self.max_age_ms is not None and self.max_age_ms < 0:
            raise UsageError("SegmentLimits.max_age_ms must be >= 0 or None")


@dataclass(frozen=True)
class StreamHeader:
    """First frame of an ingest stream (msgpack map, see docs/dataplane.md §8)."""

    lease: bytes
    stream_id: bytes
    protocol: str
    options: Mapping[str, Any]
    chains: tuple[tuple[str, ...], ...]
    limits: SegmentLimits = field(default_factory=SegmentLimits)
    delegation: bytes | None = None

    def __post_init__(self) -> None:
        if len(self.lease) != 32:
            raise UsageError("StreamHeader.lease must be the 32-byte lease id")
        if not 1 <= len(self.stream_id) <= MAX_STREAM_ID:
            raise UsageError(f"StreamHeader.stream_id must be 1..{MAX_STREAM_ID} bytes")
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"unknown packet protocol {self.protocol!r}")
        try:
            check_chains(self.chains)
        except PeerError as e:
            raise UsageError(str(e)) from None

    def parser_options(self) -> dict[str, Any]:
        """Keyword arguments for `new_parser(protocol, ...)` (n_chains added)."""
        opts: dict[str, Any] = {"n_chains": len(self.chains)}
        if self.protocol == "lp" and "max_packet" in self.options:
            opts["max_packet"] = self.options["max_packet"]
        if self.protocol == "ts":
            if "pid_chains" in self.options:
                opts["pid_chains"] = dict(self.options["pid_chains"])
            if "default_chain" in self.options:
                opts["default_chain"] = self.options["default_chain"]
        return opts

    def encode(self) -> bytes:
        opts: dict[str, Any] = {}
        if "max_packet" in self.options:
            opts["max_packet"] = self.options["max_packet"]
        if "pid_chains" in self.options:
            pids = dict(self.options["pid_chains"])
            opts["pid_chains"] = [[p, c] for p, c in sorted(pids.items())]
        if "default_chain" in self.options:
            opts["default_chain"] = self.options["default_chain"]
        body: dict[str, Any] = {
            "v": VERSION, "lease": self.lease, "stream": self.stream_id, "proto": self.protocol,
            "opts": opts, "chains": [list(c) for c in self.chains],
            "seg": {"max_packets": self.limits.max_packets, "max_bytes": self.limits.max_bytes,
                    "max_age_ms": self.limits.max_age_ms},
            "delegation": self.delegation,
        }
        return codec.pack(body)

    @classmethod
    def decode(cls, data: bytes, max_size: int, max_chains: int = 16,
               max_chain_len: int = 8) -> StreamHeader:
        d = codec.unpack(data, max_size)
        if not isinstance(d, dict):
            raise _bad("stream header must be a msgpack map")
        if d.get("v") != VERSION:
            raise _bad(f"unsupported stream header version {d.get('v')!r}", Reason.BAD_VERSION)
        proto = d.get("proto")
        if proto not in PROTOCOLS:
            raise _bad(f"unknown packet protocol {proto!r}; known: {sorted(PROTOCOLS)}",
                       Reason.UNKNOWN_PROTOCOL)
        chains = check_chains(d.get("chains"), max_chains, max_chain_len)
        raw_opts = d.get("opts", {})
        if not isinstance(raw_opts, dict):
            raise _bad("opts must be a map")
        opts: dict[str, Any] = {}
        if proto == "lp" and "max_packet" in raw_opts:
            opts["max_packet"] = _int(raw_opts, "max_packet", 1, (1 << 32) - 1)
        if proto == "ts":
            if "default_chain" in raw_opts:
                opts["default_chain"] = _int(raw_opts, "default_chain", 0, len(chains) - 1)
            pids = raw_opts.get("pid_chains", [])
            if not isinstance(pids, list) or len(pids) > 8192:
                raise _bad("pid_chains must be a list of [pid, chain] pairs")
            pid_map: dict[int, int] = {}
            for pair in pids:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise _bad("pid_chains must be a list of [pid, chain] pairs")
                pid = _int({"pid": pair[0]}, "pid", 0, (1 << 13) - 1)
                pid_map[pid] = _int({"chain": pair[1]}, "chain", 0, len(chains) - 1)
            if pid_map:
                opts["pid_chains"] = pid_map
        seg = d.get("seg", {})
        if not isinstance(seg, dict):
            raise _bad("seg must be a map")
        age = seg.get("max_age_ms")
        limits = SegmentLimits(
            _int(seg, "max_packets", 1, 1 << 20, 256),
            _int(seg, "max_bytes", 5, 1 << 30, 1 << 20),
            None if age is None else _int(seg, "max_age_ms", 0, 1 << 31),
        )
        delegation = d.get("delegation")
        if delegation is not None and (not isinstance(delegation, bytes)
                                       or not 1 <= len(delegation) <= 512):
            raise _bad("delegation must be the token bytes or nil")
        return cls(_bytes(d, "lease", 32, 32), _bytes(d, "stream", 1, MAX_STREAM_ID), proto,
                   opts, chains, limits, delegation)


@dataclass(frozen=True)
class Trailer:
    """Last frame of an ingest stream (seq TRAILER_SEQ): success plus counts, or an error."""

    ok: bool
    reason: str = ""
    error: str = ""
    segments: int = 0
    packets: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    garbage_bytes: int = 0
    subcontracted: int = 0
    redispatched: int = 0

    _INTS = ("segments", "packets", "bytes_in", "bytes_out", "garbage_bytes", "subcontracted",
             "redispatched")

    def encode(self) -> bytes:
        d: dict[str, Any] = {"ok": self.ok, "reason": self.reason, "error": self.error[:1024]}
        for k in self._INTS:
            d[k] = getattr(self, k)
        return codec.pack(d)

    @classmethod
    def decode(cls, data: bytes) -> Trailer:
        d = codec.unpack(data, 8192)
        if not isinstance(d, dict) or not isinstance(d.get("ok"), bool):
            raise _bad("malformed trailer", Reason.MALFORMED_TRAILER)
        reason, error = d.get("reason", ""), d.get("error", "")
        if not isinstance(reason, str) or not isinstance(error, str) or len(reason) > 64:
            raise _bad("malformed trailer", Reason.MALFORMED_TRAILER)
        ints = {k: _int(d, k, 0, 1 << 62, 0) for k in cls._INTS}
        return cls(d["ok"], reason, error, **ints)


# ------------------------------------------------------------------ process protocol


@dataclass(frozen=True)
class ProcessRequest:
    """One step of one segment, handed to another provider.

    Wire: `u32 BE length | msgpack header | data`; the header is
    `[v, lease, stream, seq, step, services, key]`. The key (the per-lease key, for
    aes-gcm) travels inside the noise-encrypted libp2p channel.
    """

    lease: bytes
    stream_id: bytes
    seq: int
    step: int
    services: tuple[str, ...]
    key: bytes | None
    data: bytes

    def encode(self, request_id: int | None = None) -> bytes:
        """The /1 request; with `request_id`, the process-session request frame body
        (`u64 BE request id` first)."""
        return self.encode_head(request_id) + self.data

    def encode_head(self, request_id: int | None = None) -> bytes:
        """`encode()` without the data that ends it (write both without joining them)."""
        head = codec.pack([VERSION, self.lease, self.stream_id, self.seq, self.step,
                           list(self.services), self.key])
        rid = b"" if request_id is None else U64.pack(request_id)
        return b"".join((rid, _U32.pack(len(head)), head))

    @classmethod
    def decode(cls, payload: bytes, offset: int = 0) -> ProcessRequest:
        """Decode the request at `payload[offset:]` (a session frame has its id first)."""
        if len(payload) - offset < 4:
            raise _bad("process request too short", Reason.BAD_REQUEST)
        (n,) = _U32.unpack_from(payload, offset)
        start = offset + 4
        if n > 8192 or start + n > len(payload):
            raise _bad("process request header length out of range", Reason.BAD_REQUEST)
        h = codec.unpack(payload[start : start + n], 8192)
        if not isinstance(h, list) or len(h) != 7 or h[0] != VERSION:
            raise _bad("process request header must be [1, lease, stream, seq, step, "
                       "services, key]", Reason.BAD_REQUEST)
        _, lease, stream, seq, step, services, key = h
        ok = (isinstance(lease, bytes) and len(lease) == 32
              and isinstance(stream, bytes) and 1 <= len(stream) <= MAX_STREAM_ID
              and isinstance(seq, int) and 0 <= seq < TRAILER_SEQ
              and isinstance(step, int) and 0 <= step < 1 << 16
              and (key is None or (isinstance(key, bytes) and len(key) == 32)))
        if not ok:
            raise _bad("process request header has a field out of range", Reason.BAD_REQUEST)
        try:
            chain = check_chains([services])[0]
        except PeerError as e:
            raise _bad(str(e), Reason.BAD_REQUEST) from None
        return cls(lease, stream, seq, step, chain, key, payload[start + n :])


def encode_outputs(outputs: Sequence[bytes], prefix: bytes = b"") -> bytes:
    """Process response: `u8 count`, then `u32 BE length | bytes` per service of the step
    (every intermediate output, so the requester can verify each service). `prefix` goes
    first, in the same copy."""
    parts = [prefix, bytes([len(outputs)])]
    for o in outputs:
        parts.append(_U32.pack(len(o)))
        parts.append(o)
    return b"".join(parts)


def decode_outputs(data: bytes | memoryview, expected: int) -> list[bytes]:
    if not data or data[0] != expected:
        raise InvalidMessage(f"process response must hold {expected} outputs", Reason.BAD_RESPONSE)
    out, pos = [], 1
    for _ in range(expected):
        if len(data) - pos < 4:
            raise InvalidMessage("process response truncated", Reason.BAD_RESPONSE)
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > len(data) - pos:
            raise InvalidMessage("process response output runs past its end", Reason.BAD_RESPONSE)
        out.append(bytes(data[pos : pos + n]))
        pos += n
    if pos != len(data):
        raise InvalidMessage("process response has trailing bytes", Reason.BAD_RESPONSE)
    return out


# Process-session responses: `u64 BE request id | u8 status | body`; status 0: the
# outputs (`encode_outputs`), status 1: `u8 n | n bytes ASCII reason | UTF-8 message`.

_S_OK: Final = 0
_S_ERR: Final = 1


def encode_session_response(request_id: int, outputs: Sequence[bytes]) -> bytes:
    return b"".join(session_response_parts(request_id, outputs))


def session_response_parts(request_id: int, outputs: Sequence[bytes]) -> tuple[bytes, bytes]:
    """The response as (head, data) whose concatenation is `encode_session_response`;
    `data` is the output itself when there is one (no copy of it)."""
    head = U64.pack(request_id) + bytes([_S_OK])
    if len(outputs) == 1:
        return head + bytes([1]) + _U32.pack(len(outputs[0])), outputs[0]
    return head, encode_outputs(outputs)


def encode_session_error(request_id: int, reason: str, message: str) -> bytes:
    code = reason.encode("ascii", "replace")[:64]
    return b"".join((U64.pack(request_id), bytes([_S_ERR, len(code)]), code,
                     message.encode("utf-8", "replace")[:1024]))


@dataclass(frozen=True)
class SessionResponse:
    """One decoded process-session response: `outputs` when ok, else `reason`/`message`."""

    request_id: int
    ok: bool
    outputs: tuple[bytes, ...] = ()
    reason: str = ""
    message: str = ""

    @classmethod
    def decode(cls, frame: bytes, expected: int | None) -> SessionResponse:
        """`expected`: outputs the request asked for (None: the id is not ours, which
        only the session-error id may be)."""
        if len(frame) < 9:
            raise InvalidMessage("process-session response shorter than its header",
                                 Reason.BAD_RESPONSE)
        (rid,) = U64.unpack_from(frame)
        return cls.decode_body(rid, memoryview(frame)[8:], expected)

    @classmethod
    def decode_body(cls, rid: int, body: bytes | memoryview,
                    expected: int | None) -> SessionResponse:
        """`decode` of a frame whose 8-byte id was already read: `body` starts at the
        status byte."""
        if len(body) < 1:
            raise InvalidMessage("process-session response without a status",
                                 Reason.BAD_RESPONSE)
        status = body[0]
        view = memoryview(body)[1:]
        if status == _S_ERR:
            if len(view) < 1 or len(view) < 1 + view[0]:
                raise InvalidMessage("malformed process-session error", Reason.BAD_RESPONSE)
            reason = bytes(view[1 : 1 + view[0]]).decode("ascii", "replace")
            return cls(rid, False, reason=reason,
                       message=bytes(view[1 + view[0] :]).decode("utf-8", "replace"))
        if status != _S_OK or expected is None:
            raise InvalidMessage("malformed process-session response", Reason.BAD_RESPONSE)
        return cls(rid, True, tuple(decode_outputs(view, expected)))


# ------------------------------------------------------------------------ lease key


def lease_key(own: Identity, other: bytes, lease_id: bytes, member: bytes,
              provider: bytes) -> bytes:
    """The 32-byte aes-gcm key of (lease, member), agreed without a secret on the ledger.

    X25519 between the two Ed25519 keys (converted to Curve25519), then
    HKDF-SHA256(salt = lease id, info = "bidmesh/lease-key/v1" ‖ member ‖ provider).
    The member calls it with `other` = provider key, the provider with `other` = member
    key; both get the same bytes. A low-order (all-zero) shared secret is refused.
    """
    if len(other) != 32 or len(lease_id) != 32 or len(member) != 32 or len(provider) != 32:
        raise UsageError("lease_key needs 32-byte keys and lease id")
    if own.public not in (member, provider) or other not in (member, provider):
        raise UsageError("lease_key: own and other must be the member and the provider")
    _, sk = nacl.bindings.crypto_sign_seed_keypair(own.seed)
    try:
        x_sk = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(sk)
        x_pk = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(other)
        shared = nacl.bindings.crypto_scalarmult(x_sk, x_pk)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, RuntimeError) as e:
        raise PeerError(f"cannot agree a key with {other.hex()[:12]}: {e}", Reason.BAD_KEY) from e
    if shared == bytes(32):
        raise PeerError("key agreement gave a low-order point", Reason.BAD_KEY)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=lease_id,
                info=KEY_INFO + member + provider)
    return hkdf.derive(shared)
