"""atheris: p2p framing and gossip: `p2p.read_frame` over a fake stream (chunked
reads, then EOF), `p2p.rpc._parse_response` and `gossip.decode_batch`. Only the
documented errors may escape."""

from __future__ import annotations

import contextlib

import _common

_common.instrument()

import trio  # noqa: E402
import trio.testing  # noqa: E402
from libp2p.network.stream.exceptions import StreamEOF  # noqa: E402
from testkit import Chain, sample_bodies, seed  # noqa: E402

from node import gossip, p2p  # noqa: E402
from node.errors import InvalidMessage, RemoteError, StreamClosed  # noqa: E402
from node.p2p import rpc  # noqa: E402

PEER = p2p.peer_id_from_pubkey(b"\x01" * 32)


class Stream:
    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.pos >= len(self.data):
            raise StreamEOF("end")
        k = min(self.step, n or self.step)
        chunk = self.data[self.pos:self.pos + k]
        self.pos += len(chunk)
        return chunk


def test_one(data: bytes) -> None:
    step = (data[0] % 16 + 1) if data else 1

    async def read() -> bytes:
        stream: object = Stream(data, step)
        return await p2p.read_frame(stream, 1 << 12, 5.0)  # type: ignore[arg-type]

    with contextlib.suppress(InvalidMessage, RemoteError, StreamClosed, p2p.StreamTimeout):
        trio.run(read, clock=trio.testing.MockClock(autojump_threshold=0))
    with contextlib.suppress(InvalidMessage, p2p.RequestRefused):
        rpc._parse_response(PEER, "/x/1", data)
    with contextlib.suppress(InvalidMessage):
        gossip.decode_batch(data)


WIRES = [Chain(seed(30)).next(b).wire for b in sample_bodies().values()]
SEEDS = [len(b"hello").to_bytes(4, "big") + b"hello", b"\x00ok", b"\x01\x03bad message",
         gossip.encode_batch(WIRES[:3])]

if __name__ == "__main__":
    _common.main("p2p", test_one, SEEDS)
