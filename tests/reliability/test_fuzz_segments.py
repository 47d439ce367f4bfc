"""Fuzzing the dataplane's sans-I/O decoders: packet parsers (length-prefixed and
MPEG-TS), the segment packet encoding and the output-stream FrameReader.

Contract: only PeerError escapes on peer bytes (a UsageError only when the caller
keeps feeding a parser that already failed); parsing is independent of how the
stream is chunked; nothing is buffered beyond what the limits allow."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from node.errors import PeerError
from node.segments import (
    TS_PACKET,
    FrameReader,
    LengthPrefixed,
    MpegTs,
    Packet,
    PacketParser,
    decode_packets,
    encode_frame,
    encode_packets,
)

from .mutations import FUZZ, mutated


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


def _same_outcome(a: list[Any], err_a: str | None, b: list[Any], err_b: str | None) -> None:
    """Chunking must not change the outcome. On an error the stream is dead; the
    items a failing feed() call had parsed before the error are not returned, so with
    an error one side may hold a prefix of the other."""
    assert err_a == err_b, "chunking must not change the outcome"
    if err_a is None:
        assert a == b, "chunking must not change the outcome"
    else:
        short, long = sorted((a, b), key=len)
        assert long[: len(short)] == short


def _parse(parser: PacketParser, chunks: list[bytes]) -> tuple[list[Packet], str | None]:
    out: list[Packet] = []
    try:
        for c in chunks:
            out += parser.feed(c)
        out += parser.end()
    except PeerError as e:
        return out, e.reason
    return out, None


LP_STREAM = b"".join(len(p).to_bytes(4, "big") + bytes([i % 3]) + p
                     for i, p in enumerate([b"a" * 10, b"", b"b" * 300, b"c"]))
TS_STREAM = b"".join(bytes([0x47, i >> 8 & 0x1F, i & 0xFF]) + bytes(185) for i in range(6))


@FUZZ
@given(st.one_of(st.binary(max_size=400), mutated(LP_STREAM)),
       st.lists(st.integers(0, 1000), max_size=8), st.sampled_from([1, 3, 256]),
       st.sampled_from([0, 16, 1 << 20]))
def test_length_prefixed(data: bytes, cuts: list[int], n_chains: int, max_packet: int) -> None:
    whole, err = _parse(LengthPrefixed(max(1, max_packet), n_chains), [data])
    parts, err2 = _parse(LengthPrefixed(max(1, max_packet), n_chains), _split(data, cuts))
    _same_outcome(whole, err, parts, err2)
    assert err in {None, "oversized_packet", "unknown_chain", "truncated_packet"}
    assert all(p.chain < n_chains and len(p.data) <= max(1, max_packet) for p in whole)
    if err is None:
        assert b"".join(len(p.data).to_bytes(4, "big") + bytes([p.chain]) + p.data
                        for p in whole) == data


@FUZZ
@given(st.one_of(st.binary(max_size=600), mutated(TS_STREAM, max_ops=6)),
       st.lists(st.integers(0, 2000), max_size=8),
       st.dictionaries(st.integers(0, 8), st.integers(0, 3), max_size=3))
def test_mpeg_ts(data: bytes, cuts: list[int], pids: dict[int, int]) -> None:
    whole, err = _parse(MpegTs(pids, 0, 4), [data])
    parts, err2 = _parse(MpegTs(pids, 0, 4), _split(data, cuts))
    assert err is None
    _same_outcome(whole, err, parts, err2)
    for p in whole:
        assert len(p.data) == TS_PACKET and p.data[0] == 0x47


def test_mpeg_ts_unknown_chain_is_a_peer_error() -> None:
    _, err = _parse(MpegTs({5: 0}, 0, 1), [TS_STREAM])
    assert err is None
    parser = MpegTs({}, 0, 4)
    parser.pid_chains[1] = 7  # as if misconfigured after construction: still contained
    _, err = _parse(parser, [TS_STREAM])
    assert err == "unknown_chain"


PACKETS = [b"", b"x", b"y" * 200]


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(encode_packets(PACKETS))),
       st.sampled_from([1, 2, 1 << 20]))
def test_decode_packets(data: bytes, max_packets: int) -> None:
    try:
        out = decode_packets(data, max_packets)
    except PeerError as e:
        assert e.reason == "malformed_segment"
        return
    assert encode_packets(out) == data and len(out) <= max_packets


FRAMES = encode_frame(0, b"first") + encode_frame(7, b"") + encode_frame(2, b"z" * 100)


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(FRAMES)),
       st.lists(st.integers(0, 400), max_size=6), st.sampled_from([8, 64, 64 << 20]))
def test_frame_reader(data: bytes, cuts: list[int], max_frame: int) -> None:
    def run(chunks: list[bytes]) -> tuple[list[tuple[int, bytes]], str | None]:
        r, out = FrameReader(max_frame), []
        try:
            for c in chunks:
                out += r.feed(c)
            r.end()
        except PeerError as e:
            return out, e.reason
        return out, None

    whole, err = run([data])
    parts, err2 = run(_split(data, cuts))
    _same_outcome(whole, err, parts, err2)
    assert err in {None, "malformed_frame", "truncated_frame"}
    if err is None:
        assert b"".join(encode_frame(s, r) for s, r in whole) == data


def test_frame_reader_refuses_a_huge_announced_frame_before_buffering_it() -> None:
    r = FrameReader(1 << 10)
    try:
        r.feed(b"\xff\xff\xff\xff" + bytes(8))
    except PeerError as e:
        assert e.reason == "malformed_frame"
    else:
        raise AssertionError("a 4 GiB frame must be refused at its header")
