"""Fuzzing the p2p framing and the gossip batch format, without a network.

`read_frame` reads from a fake stream that hands out the bytes in hypothesis-chosen
chunks and then ends, resets or stalls; time runs on trio's MockClock, so a stall
costs nothing. Contract: only InvalidMessage / RemoteError / StreamTimeout escape
`read_frame`; only InvalidMessage / RequestRefused escape `_parse_response`; only
InvalidMessage escapes `gossip.decode_batch` and `parse_peer_id`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from testkit import Chain, sample_bodies, seed

from node import gossip, p2p
from node.errors import InvalidMessage, RemoteError, StreamClosed
from node.events import MAX_WIRE

from .mutations import FUZZ, mutated, packb, structurally_mutated


class FakeStream:
    """Just enough of INetStream for read_frame: chunked reads, then an ending."""

    def __init__(self, data: bytes, chunks: Sequence[int], ending: str) -> None:
        self.data, self.chunks, self.ending = data, list(chunks), ending
        self.pos = 0

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.pos >= len(self.data):
            if self.ending == "eof":
                raise StreamEOF("end")
            if self.ending == "reset":
                raise StreamReset("reset")
            if self.ending == "empty":
                return b""
            await trio.sleep_forever()
        size = self.chunks.pop(0) if self.chunks else 1 << 20
        want = len(self.data) - self.pos if n is None else n
        chunk = self.data[self.pos : self.pos + max(1, min(size, want))]
        self.pos += len(chunk)
        return chunk


def _read(data: bytes, chunks: Sequence[int], ending: str, max_size: int) -> bytes:
    async def main() -> bytes:
        stream: Any = FakeStream(data, chunks, ending)
        return await p2p.read_frame(stream, max_size, 5.0)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


FRAMES = st.binary(max_size=64).map(lambda b: len(b).to_bytes(4, "big") + b)


@FUZZ
@given(st.one_of(st.binary(max_size=80), FRAMES, FRAMES.flatmap(mutated)),
       st.lists(st.integers(1, 9), max_size=20),
       st.sampled_from(["eof", "reset", "empty", "stall"]),
       st.sampled_from([0, 3, 64, 1 << 20]))
def test_read_frame(data: bytes, chunks: list[int], ending: str, max_size: int) -> None:
    try:
        frame = _read(data, chunks, ending, max_size)
    except StreamClosed:
        assert ending == "eof"
        return
    except InvalidMessage as e:
        assert e.reason in {"truncated", "oversized"}
        if e.reason == "oversized":
            assert int.from_bytes(data[:4], "big") > max_size
        return
    except (RemoteError, p2p.StreamTimeout):
        assert ending in {"reset", "stall"}
        return
    n = int.from_bytes(data[:4], "big")
    assert n <= max_size and frame == data[4 : 4 + n]


def test_read_frame_huge_announced_length_reads_nothing_more() -> None:
    stream = FakeStream(b"\xff\xff\xff\xff" + b"x" * 100, [4], "stall")

    async def main() -> None:
        with pytest.raises(InvalidMessage) as ei:
            await p2p.read_frame(stream, 1 << 20, 5.0)  # type: ignore[arg-type]
        assert ei.value.reason == "oversized"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert stream.pos == 4


def test_read_frame_slowloris_is_bounded_by_the_timeout() -> None:
    """One byte per read, then silence: the whole frame has one deadline."""
    data = (50).to_bytes(4, "big") + b"x" * 30

    async def main() -> float:
        start = trio.current_time()
        with pytest.raises(p2p.StreamTimeout):
            await p2p.read_frame(FakeStream(data, [1] * 100, "stall"), 1024, 5.0)  # type: ignore[arg-type]
        return trio.current_time() - start

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 5.0


@FUZZ
@given(st.binary(max_size=80))
def test_parse_response(frame: bytes) -> None:
    try:
        body = p2p.rpc._parse_response(p2p.peer_id_from_pubkey(b"\x01" * 32), "/x/1", frame)
    except p2p.RequestRefused as e:
        assert frame[0] == 1 and isinstance(e.reason, str)
        return
    except InvalidMessage as e:
        assert e.reason == "malformed"
        return
    assert frame[0] == 0 and body == frame[1:]


# ------------------------------------------------------------------ gossip batches


WIRES = [Chain(seed(500)).next(b).wire for b in sample_bodies().values()]
BATCH = gossip.encode_batch(WIRES[:3])


def _check_batch(data: bytes) -> None:
    try:
        wires = gossip.decode_batch(data)
    except InvalidMessage as e:
        assert e.reason in {"malformed", "oversized"}
        return
    assert 0 < len(wires) <= gossip.BATCH_MAX_EVENTS
    assert all(type(w) is bytes and 0 < len(w) <= MAX_WIRE for w in wires)


@FUZZ
@given(st.binary(max_size=200))
def test_decode_batch_arbitrary_bytes(data: bytes) -> None:
    _check_batch(data)


@FUZZ
@given(mutated(BATCH))
def test_decode_batch_mutations(data: bytes) -> None:
    _check_batch(data)


@FUZZ
@given(structurally_mutated([1, WIRES[:3]]))
def test_decode_batch_structural_mutations(value: Any) -> None:
    _check_batch(packb(value))


def test_decode_batch_limits() -> None:
    for bad in ([1, []], [1, [b""]], [2, [WIRES[0]]], [True, [WIRES[0]]],
                [1, [WIRES[0]] * (gossip.BATCH_MAX_EVENTS + 1)], [1, [b"x" * (MAX_WIRE + 1)]]):
        with pytest.raises(InvalidMessage):
            gossip.decode_batch(packb(bad))


# ------------------------------------------------------------------ peer ids


@FUZZ
@given(st.one_of(st.text(max_size=60),
                 st.text(alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz",
                         max_size=60),
                 st.just(str(p2p.peer_id_from_pubkey(b"\x02" * 32))).flatmap(
                     lambda s: st.integers(0, len(s)).map(lambda i: s[:i]))))
def test_pubkey_from_peer_id_strings(text: str) -> None:
    try:
        key = p2p.pubkey_from_peer_id(text)
    except InvalidMessage as e:
        assert e.reason == "bad_peer_id"
        return
    assert len(key) == 32
