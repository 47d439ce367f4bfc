"""atheris: anti-entropy sync messages (`sync.decode_request`, `decode_response`) and
the server's `sync.handle`. Only InvalidMessage may escape the decoders; `handle`
never raises and answers something `decode_response` accepts."""

from __future__ import annotations

import _common

_common.instrument()

from testkit import NETWORK, Chain, fake_id, sample_bodies, seed  # noqa: E402

from node import sync  # noqa: E402
from node.errors import InvalidMessage  # noqa: E402
from node.ledger import Ledger  # noqa: E402

CHAIN = Chain(seed(20))
EVENTS = [CHAIN.next(b) for b in sample_bodies().values()]
LEDGER = Ledger(":memory:", network=NETWORK)
LEDGER.append_many([e.wire for e in EVENTS])
A = CHAIN.public


def test_one(data: bytes) -> None:
    for decode in (sync.decode_request, sync.decode_response):
        try:
            msg = decode(data)
        except InvalidMessage:
            continue
        if decode(msg.encode()) != msg:
            raise AssertionError("decoded message does not round-trip")
    sync.decode_response(sync.handle(LEDGER, data))


SEEDS = [m.encode() for m in (
    sync.DigestRequest(), sync.HeadsRequest(None, 10), sync.RangeRequest(A, 1, 5, 4096),
    sync.ForksRequest(A), sync.DigestResponse(fake_id("d"), 1, 0),
    sync.HeadsResponse((sync.HeadEntry(A, 3, EVENTS[2].id, None),), True),
    sync.RangeResponse((EVENTS[0].wire,), False), sync.ForksResponse(()),
    sync.ErrorResponse("x", "y"))]

if __name__ == "__main__":
    _common.main("sync", test_one, SEEDS)
