"""atheris: event records (`events.decode_wire`, `events.decode_signed`).

First byte picks the mode: 0 the bytes are a wire record; 1 they are envelope bytes
signed here with the author's real key (so the schema is reached). Only InvalidEvent
may escape; accepted records re-encode to the same bytes."""

from __future__ import annotations

import _common

_common.instrument()

from testkit import NETWORK, Chain, sample_bodies, seed, sign_raw  # noqa: E402

from node import codec  # noqa: E402
from node.errors import InvalidEvent  # noqa: E402
from node.events import decode_signed, decode_wire  # noqa: E402

SEED = seed(1)
CHAIN = Chain(SEED)
EVENTS = [CHAIN.next(b) for b in sample_bodies().values()]


def test_one(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 2, data[1:]
    try:
        if mode == 0:
            ev = decode_wire(rest, NETWORK)
            if ev.wire != rest:
                raise AssertionError("accepted a non-canonical wire record")
            return
        ev = decode_signed(rest, sign_raw(SEED, rest), NETWORK)
    except InvalidEvent as e:
        if not e.reason:
            raise AssertionError("rejection without a reason code") from e
        return
    again = codec.pack([1, ev.author, ev.seq, ev.prev, ev.ts_ms, ev.kind, ev.body.to_map()])
    if again != rest:
        raise AssertionError("accepted envelope does not re-encode to the same bytes")


SEEDS = [b"\x00" + e.wire for e in EVENTS] + [b"\x01" + e.signed for e in EVENTS]

if __name__ == "__main__":
    _common.main("events", test_one, SEEDS)
