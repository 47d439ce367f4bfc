"""atheris: `Ledger.append_many`, `Ledger.add_fork_proof` and `ledger.read_stream`
(export files), on an in-memory ledger holding a few valid chains.

The input is read as an export file; its records are appended as one batch and as
a fork proof. Nothing may raise; a batch with nothing accepted changes nothing."""

from __future__ import annotations

import _common

_common.instrument()

from testkit import NETWORK, Chain, sample_bodies, seed  # noqa: E402

from node.errors import InvalidEvent  # noqa: E402
from node.ledger import Ledger, Status, read_stream  # noqa: E402

BODIES = list(sample_bodies().values())
CHAINS = [Chain(seed(10 + a)) for a in range(2)]
STORED = [c.next(BODIES[i % len(BODIES)]) for c in CHAINS for i in range(3)]
NEXT = [c.next(BODIES[0]) for c in CHAINS]


def _fresh() -> Ledger:
    led = Ledger(":memory:", network=NETWORK)
    led.append_many([e.wire for e in STORED])
    return led


LEDGER = _fresh()


def _state(led: Ledger) -> tuple[object, ...]:
    return (led.digest(), led.count(), led.heads(), led.forked(), led.pending_count)


def test_one(data: bytes) -> None:
    global LEDGER
    records = []
    for item in read_stream(data, max_records=64):
        if isinstance(item, InvalidEvent):
            if item.reason not in ("truncated", "malformed"):
                raise AssertionError(f"read_stream reason {item.reason!r}")
        else:
            records.append(item)
    if not records:
        records = [data]
    before = _state(LEDGER)
    results = LEDGER.append_many(records)
    nothing_stored = all(r.status in (Status.REJECTED, Status.DUPLICATE) for r in results)
    if nothing_stored and _state(LEDGER) != before:
        raise AssertionError("a rejected batch changed the ledger")
    if len(records) >= 2:
        LEDGER.add_fork_proof(records[0], records[1])
    for e in STORED:
        if not LEDGER.has(e.id):
            raise AssertionError("an accepted event disappeared")
    if LEDGER.count() > 200:  # keep iterations cheap
        LEDGER.close()
        LEDGER = _fresh()


SEEDS = [b"".join(e.wire for e in STORED + NEXT), NEXT[0].wire, STORED[2].wire + NEXT[1].wire]

if __name__ == "__main__":
    _common.main("ledger", test_one, SEEDS)
