"""Packet parsers of the dataplane core, sans-I/O (split from `segments`, which
re-exports every name): `lp` and MPEG-TS streams cut into packets under any chunking,
the `lp` encoding, and parsers by protocol name. Formats: docs/dataplane.md.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .errors import PeerError, Reason, UsageError

__all__ = [
    "DEFAULT_MAX_PACKET",
    "MAX_CHAINS",
    "PROTOCOLS",
    "TS_PACKET",
    "LengthPrefixed",
    "MpegTs",
    "Packet",
    "PacketParser",
    "encode_lp",
    "new_parser",
]


DEFAULT_MAX_PACKET = 1 << 20
MAX_CHAINS = 256  # the length-prefixed chain index is one byte
TS_PACKET = 188
TS_SYNC = 0x47
_LP_HEAD = struct.Struct(">IB")
_NO_PIDS: Mapping[int, int] = MappingProxyType({})


# --------------------------------------------------------------------------- packets


@dataclass(frozen=True, slots=True)
class Packet:
    """One input packet. `chain` indexes the stream's declared chains of services."""

    data: bytes
    chain: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes):
            raise UsageError("Packet.data must be bytes")
        if not isinstance(self.chain, int) or not 0 <= self.chain < MAX_CHAINS:
            raise UsageError(f"Packet.chain must be 0..{MAX_CHAINS - 1}, got {self.chain!r}")


class PacketParser(abc.ABC):
    """Incremental parser: `feed` any chunking of the stream, get whole packets back.

    Counters: `packets` emitted, `bytes` fed, `garbage_bytes` skipped, `oversized`
    packets refused. After a PeerError the stream cannot continue; feeding again is
    a UsageError. Call `end()` at end of stream for the final packets.
    """

    def __init__(self, n_chains: int) -> None:
        if not 1 <= n_chains <= MAX_CHAINS:
            raise UsageError(f"n_chains must be 1..{MAX_CHAINS}, got {n_chains}")
        self.n_chains = n_chains
        self.packets = 0
        self.bytes = 0
        self.garbage_bytes = 0
        self.oversized = 0
        self._buf = bytearray()
        self._failed: PeerError | None = None
        self._ended = False

    def feed(self, data: bytes) -> list[Packet]:
        self._check_usable()
        self.bytes += len(data)
        self._buf += data
        try:
            out = self._parse(final=False)
        except PeerError as e:
            self._failed = e
            raise
        self.packets += len(out)
        return out

    def end(self) -> list[Packet]:
        """End of stream: emit what is decidable now; leftovers are garbage or an error."""
        self._check_usable()
        self._ended = True
        try:
            out = self._parse(final=True)
        except PeerError as e:
            self._failed = e
            raise
        self.packets += len(out)
        return out

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise UsageError(f"parser already failed ({self._failed.reason}); close the stream")
        if self._ended:
            raise UsageError("parser already ended")

    @abc.abstractmethod
    def _parse(self, final: bool) -> list[Packet]:
        """Packets complete in the buffer (all of it when `final`)."""

    def _chain(self, idx: int) -> int:
        if idx >= self.n_chains:
            raise PeerError(
                f"packet names chain {idx} but the stream declared {self.n_chains}",
                Reason.UNKNOWN_CHAIN,
            )
        return idx


class LengthPrefixed(PacketParser):
    """Packets framed as `u32 BE payload length, u8 chain index, payload`.

    The length excludes the 5-byte header. A length above `max_packet` is a PeerError
    ("oversized_packet"): the framing gives no way to resync after it.
    """

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET, n_chains: int = MAX_CHAINS) -> None:
        super().__init__(n_chains)
        if not 0 < max_packet < 1 << 32:
            raise UsageError(f"max_packet must be 1..2^32-1, got {max_packet}")
        self.max_packet = max_packet

    def _parse(self, final: bool) -> list[Packet]:
        buf, pos, out = self._buf, 0, []
        while len(buf) - pos >= 5:
            n, idx = _LP_HEAD.unpack_from(buf, pos)
            if n > self.max_packet:
                self.oversized += 1
                raise PeerError(
                    f"packet of {n} bytes exceeds the {self.max_packet}-byte limit",
                    Reason.OVERSIZED_PACKET,
                )
            chain = self._chain(idx)
            if len(buf) - pos - 5 < n:
                break
            out.append(Packet(bytes(buf[pos + 5 : pos + 5 + n]), chain))
            pos += 5 + n
        del buf[:pos]
        if final and buf:
            self.garbage_bytes += len(buf)
            raise PeerError(
                f"stream ended inside a packet ({len(buf)} bytes)", Reason.TRUNCATED_PACKET
            )
        return out


class MpegTs(PacketParser):
    """MPEG-TS: 188-byte packets starting with 0x47.

    Starts unlocked. To lock, a 0x47 must be followed by another at +188 (or by the
    end of the stream). Once locked, a packet whose successor does not start with 0x47
    is still kept unless a confirmed sync starts inside it (then it was garbage that
    began with 0x47). Every decision waits for the bytes it looks at, so any chunking
    of the input yields the same packets. Skipped bytes count as `garbage_bytes`.
    The chain of a packet comes from its PID via `pid_chains` (else `default_chain`).
    """

    def __init__(
        self,
        pid_chains: Mapping[int, int] = _NO_PIDS,
        default_chain: int = 0,
        n_chains: int = MAX_CHAINS,
    ) -> None:
        super().__init__(n_chains)
        for pid, idx in pid_chains.items():
            if not 0 <= pid < 1 << 13 or not 0 <= idx < n_chains:
                raise UsageError(f"pid_chains: PID {pid} → chain {idx} is out of range")
        if not 0 <= default_chain < n_chains:
            raise UsageError(f"default_chain {default_chain} is not a declared chain")
        self.pid_chains = dict(pid_chains)
        self.default_chain = default_chain
        self._locked = False

    def _parse(self, final: bool) -> list[Packet]:
        buf, pos, out = self._buf, 0, []
        n = len(buf)
        while n - pos >= TS_PACKET:
            if not self._locked:
                start = buf.find(TS_SYNC, pos)
                if start < 0:
                    start = n
                self.garbage_bytes += start - pos
                pos = start
                if n - pos < TS_PACKET:
                    break
                if n - pos == TS_PACKET and not final:
                    break  # cannot see +188 yet: wait rather than guess
                if n - pos > TS_PACKET and buf[pos + TS_PACKET] != TS_SYNC:
                    self.garbage_bytes += 1
                    pos += 1
                    continue
                self._locked = True
            if buf[pos] != TS_SYNC:
                self._locked = False
                continue
            nxt = pos + TS_PACKET
            if nxt == n and not final:
                break  # wait for the next sync byte before trusting this packet
            if nxt < n and buf[nxt] != TS_SYNC:
                # Either a good packet followed by garbage, or garbage that happened to
                # start with 0x47 and overlaps a real packet. A confirmed sync inside the
                # span tells them apart; it needs up to nxt + 188 to be visible.
                if n <= nxt + TS_PACKET and not final:
                    break
                if self._confirmed_sync(pos + 1, nxt + 1, final):
                    self._locked = False
                    continue
            pid = ((buf[pos + 1] & 0x1F) << 8) | buf[pos + 2]
            chain = self._chain(self.pid_chains.get(pid, self.default_chain))
            out.append(Packet(bytes(buf[pos : pos + TS_PACKET]), chain))
            pos += TS_PACKET
        if final:
            self.garbage_bytes += n - pos
            pos = n
        del buf[:pos]
        return out

    def _confirmed_sync(self, lo: int, hi: int, final: bool) -> bool:
        """Is there a 0x47 in buf[lo:hi] with another at +188 (or ending the stream)?"""
        buf, n = self._buf, len(self._buf)
        q = buf.find(TS_SYNC, lo, hi)
        while q >= 0:
            after = q + TS_PACKET
            if (after < n and buf[after] == TS_SYNC) or (final and after == n):
                return True
            q = buf.find(TS_SYNC, q + 1, hi)
        return False


def encode_lp(packets: Iterable[Packet | bytes]) -> bytes:
    """The `lp` ingest encoding (`u32 length, u8 chain, payload`) of packets; plain bytes
    go to chain 0. What a member sends; `LengthPrefixed` parses it back."""
    parts: list[bytes] = []
    for p in packets:
        pkt = p if isinstance(p, Packet) else Packet(p)
        parts.append(_LP_HEAD.pack(len(pkt.data), pkt.chain))
        parts.append(pkt.data)
    return b"".join(parts)


PROTOCOLS: dict[str, Callable[..., PacketParser]] = {"lp": LengthPrefixed, "ts": MpegTs}


def new_parser(protocol: str, **options: Any) -> PacketParser:
    """A parser for a protocol named by a peer; unknown names are the peer's error."""
    factory = PROTOCOLS.get(protocol)
    if factory is None:
        raise PeerError(
            f"unknown packet protocol {protocol!r}; known: {sorted(PROTOCOLS)}",
            Reason.UNKNOWN_PROTOCOL,
        )
    return factory(**options)
