"""atheris: dataplane sans-I/O decoders: `LengthPrefixed` and `MpegTs` packet
parsers, `decode_packets` and the output `FrameReader`. Only PeerError may escape,
and the outcome does not depend on how the stream is chunked."""

from __future__ import annotations

import _common

_common.instrument()

from node.errors import PeerError  # noqa: E402
from node.segments import (  # noqa: E402
    FrameReader,
    LengthPrefixed,
    MpegTs,
    PacketParser,
    decode_packets,
    encode_frame,
    encode_packets,
)


def _parse(parser: PacketParser, chunks: list[bytes]) -> tuple[list[object], str | None]:
    out: list[object] = []
    try:
        for c in chunks:
            out += parser.feed(c)
        out += parser.end()
    except PeerError as e:
        return out, e.reason
    return out, None


def _frames(chunks: list[bytes]) -> tuple[list[object], str | None]:
    r, out = FrameReader(1 << 16), []
    try:
        for c in chunks:
            out += r.feed(c)
        r.end()
    except PeerError as e:
        return list(out), e.reason
    return list(out), None


def test_one(data: bytes) -> None:
    cut = data[0] if data else 0
    halves = [data[:cut], data[cut:]]
    for make in (lambda: LengthPrefixed(4096, 4), lambda: MpegTs({1: 1}, 0, 4)):
        a, b = _parse(make(), [data]), _parse(make(), halves)
        if a[1] != b[1] or (a[1] is None and a[0] != b[0]):
            raise AssertionError(f"chunking changed the outcome: {a[1]} vs {b[1]}")
    a, b = _frames([data]), _frames(halves)
    if a[1] != b[1] or (a[1] is None and a[0] != b[0]):
        raise AssertionError("chunking changed the FrameReader outcome")
    try:
        if encode_packets(decode_packets(data, 1 << 12)) != data:
            raise AssertionError("decode_packets does not invert encode_packets")
    except PeerError:
        pass


SEEDS = [
    b"".join(len(p).to_bytes(4, "big") + b"\x01" + p for p in (b"abc", b"", b"x" * 50)),
    b"".join(bytes([0x47, 0, i]) + bytes(185) for i in range(3)),
    encode_frame(0, b"one") + encode_frame(1, b""), encode_packets([b"a", b"", b"bc"]),
]

if __name__ == "__main__":
    _common.main("segments", test_one, SEEDS)
