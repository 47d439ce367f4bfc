"""Fair ingest (node/ingest.py): one peer's backlog delays another's batch by at most
a slice, a peer's batches keep their order, and a failing slice does not stop it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from node.errors import UsageError
from node.ingest import FairIngest, RoundRobin


def test_round_robin_serves_keys_in_turn_and_each_in_order() -> None:
    rr: RoundRobin[str, int] = RoundRobin()
    assert rr.head() is None and len(rr) == 0
    for i in range(3):
        rr.push("a", i)
    rr.push("b", 10)
    out = []
    while (h := rr.head()) is not None:
        out.append(h)
        rr.pop()
        rr.rotate()
    assert out == [("a", 0), ("b", 10), ("a", 1), ("a", 2)]
    assert len(rr) == 0 and rr.keys == 0


def test_round_robin_head_stays_until_rotated() -> None:
    rr: RoundRobin[str, int] = RoundRobin()
    rr.push("a", 1)
    rr.push("a", 2)
    rr.push("b", 3)
    assert rr.head() == ("a", 1)
    assert rr.pop() == 1
    assert rr.head() == ("a", 2)  # a keeps its turn until rotate()
    rr.rotate()
    assert rr.head() == ("b", 3)
    assert rr.queued("a") == 1 and rr.queued("c") == 0


def _ingest(log: list[tuple[str, list[bytes]]], slice_events: int = 4,
            bad: bytes | None = None,
            gate: threading.Event | None = None) -> FairIngest[str, bytes]:
    def check(records: list[bytes]) -> list[bytes]:
        if gate is not None:
            gate.wait(30)  # the test holds the slice in progress until it is ready
        return [r.upper() for r in records]  # runs on a worker thread

    def store(peer: str, records: list[bytes], checked: list[bytes], blame: bool) -> bool:
        assert checked == [r.upper() for r in records]
        log.append((peer, records))
        if bad is not None and bad in records:
            if bad == b"boom":
                raise RuntimeError("a bug in store")
            return False
        return True

    return FairIngest(check, store, slice_events)


async def test_a_backlog_delays_another_peer_by_one_slice_at_most() -> None:
    log: list[tuple[str, list[bytes]]] = []
    # The first slice's check waits for the gate: the backlog cannot drain on a fast
    # (or slow) worker thread before the honest batch is queued behind it.
    gate = threading.Event()
    ing = _ingest(log, gate=gate)
    verdicts: dict[str, list[bool]] = {"flood": [], "honest": []}

    async def submit(peer: str, records: list[bytes]) -> None:
        verdicts[peer].append(await ing.submit(peer, records, blame=True))

    async with trio.open_nursery() as n:
        n.start_soon(ing.run)
        for j in range(5):  # 5 batches x 5 slices from the flooder, queued first
            n.start_soon(submit, "flood", [b"f%d-%d" % (j, i) for i in range(20)])
            await trio.testing.wait_all_tasks_blocked()
        mark = len(log)
        assert ing.queued() >= 4  # the flooder's backlog is still there
        n.start_soon(submit, "honest", [b"h1", b"h2"])
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
        with trio.fail_after(30):
            while len(verdicts["flood"]) < 5 or not verdicts["honest"]:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    honest_at = next(i for i, (p, _) in enumerate(log) if p == "honest")
    # At most the slice in progress, then the honest batch's turn.
    assert honest_at - mark <= 1, log[mark:honest_at + 1]
    flood = [r for p, recs in log if p == "flood" for r in recs]
    assert flood == [b"f%d-%d" % (j, i) for j in range(5) for i in range(20)]  # in order
    assert all(len(recs) <= 4 for _, recs in log)
    assert verdicts == {"flood": [True] * 5, "honest": [True]}


async def test_a_bad_slice_fails_its_batch_only_and_a_bug_does_not_stop_the_worker(
        caplog: pytest.LogCaptureFixture) -> None:
    log: list[tuple[str, list[bytes]]] = []
    ing = _ingest(log, slice_events=2, bad=b"x")
    async with trio.open_nursery() as n:
        n.start_soon(ing.run)
        with trio.fail_after(30):
            assert await ing.submit("p", [b"a", b"b", b"x", b"c"], blame=False) is False
            assert await ing.submit("p", [b"d"], blame=False) is True
        n.cancel_scope.cancel()
    assert [recs for _, recs in log] == [[b"a", b"b"], [b"x", b"c"], [b"d"]]

    log.clear()
    ing = _ingest(log, slice_events=2, bad=b"boom")
    with caplog.at_level(logging.ERROR, "bidmesh.ingest"):
        async with trio.open_nursery() as n:
            n.start_soon(ing.run)
            with trio.fail_after(30):
                assert await ing.submit("p", [b"boom", b"b", b"c"], blame=False) is False
                assert await ing.submit("q", [b"d"], blame=False) is True
            n.cancel_scope.cancel()
    assert [recs for _, recs in log] == [[b"boom", b"b"], [b"d"]]  # the rest was dropped
    assert "ingest of a received batch failed" in caplog.text


def test_slices_hold_at_least_one_record() -> None:
    with pytest.raises(UsageError):
        FairIngest(lambda r: r, lambda p, r, c, b: True, 0)


async def test_a_full_queue_refuses_the_peers_holding_it_not_a_light_peer() -> None:
    log: list[tuple[str, list[bytes]]] = []
    ing = _ingest(log, slice_events=4)
    ing.max_events = 40
    async with trio.open_nursery() as n:
        # The worker is not running yet: everything queues.
        for _ in range(4):
            assert ing.admits("a", 10)
            n.start_soon(ing.submit, "a", [b"a%d" % i for i in range(10)], True)
            await trio.testing.wait_all_tasks_blocked()
        assert ing.status()["queued_events"] == 40
        assert not ing.admits("a", 10)  # full, and "a" holds all of it
        assert ing.admits("b", 10)  # a light peer's share: 40 // 2 peers
        n.start_soon(ing.submit, "b", [b"b%d" % i for i in range(10)], True)
        await trio.testing.wait_all_tasks_blocked()
        assert not ing.admits("b", 11)  # beyond its share
        assert ing.status()["refused_batches"] == 2
        n.start_soon(ing.run)
        with trio.fail_after(30):
            while ing.status()["queued_events"]:
                await trio.sleep(0.01)
        assert ing.admits("a", 40)  # drained: room again
        n.cancel_scope.cancel()
    assert sum(len(r) for _, r in log) == 50


def test_prechecked_records_are_not_checked_again(tmp_path: Path) -> None:
    """Ledger.prechecked: a sync response's records checked on the ingest thread are
    stored with those results (node/gossip.py), not checked again on the loop."""
    from node.events import Offer, sign_event
    from node.keys import Identity
    from node.ledger import AppendResult, Ledger, Status, check_records

    led = Ledger(tmp_path / "l.db", network="ingesttest")
    ident = Identity.from_seed(bytes([9]) * 32)
    ev = sign_event(ident.seed, 1, None, 1000, Offer(services=(), currency="EUR", addrs=(),
                                                     note="x"), "ingesttest")
    fake = AppendResult(Status.REJECTED, ev.id, reason="bad_signature", detail="marked")
    with led.prechecked([ev.wire], [fake]):
        assert led.append_many([ev.wire])[0].detail == "marked"  # the given result
    assert led.append_many([ev.wire])[0].status is Status.ACCEPTED  # checked itself
    assert check_records([ev.wire], "ingesttest")[0] == ev
    with pytest.raises(UsageError), led.prechecked([ev.wire], []):
        pass
    led.close()
