"""Hostile peers at the network level, against real node processes: invalid
signatures, malformed and oversized gossip, floods beyond the limits, replays,
equivocation across nodes, a dataplane peer without a lease, slowloris streams on
the stream and query protocols; and (real hosts in one process) a subcontractor
that returns subtly wrong results. Each is rejected or contained and counted, the
peer cut off where that is right, and nothing accepted before is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_helpers import ROOT, Cluster, Proc, cluster, wait_for
from proc_helpers import FlakyAesGcm
from test_dataplane import make_lease as dp_lease
from test_dataplane import packets, reference, subcontracts, world

from node import codec, gossip, query
from node.dataplane import LeaseRefused, stream_protocol, stream_through_lease
from node.dataplane.wire import TRAILER_SEQ, Trailer
from node.errors import BidmeshError, InvalidMessage, RemoteError
from node.events import MAX_WIRE, Offer, sign_event
from node.keys import Identity
from node.ledger import Ledger
from node.p2p import P2PHost, RequestRefused, make_pubsub, open_host, read_frame, request
from node.processors.pool import WorkerPool

from .faultnet import NETWORK, assert_verified, lease_events, stored, wait_converged

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("procs")]

OVERRIDES = {"gossip": {"fault_threshold": 5, "block_s": 120.0},
             "dataplane": {"workers": 1}}


def evil(name: str) -> Identity:
    return Identity.from_seed(name.encode().ljust(32, b"!"))


def offer(i: int, note: str = "") -> Offer:
    return Offer(services=(), currency="EUR", addrs=(), note=f"{note}{i}")


def status(c: Cluster, p: Proc) -> dict[str, Any]:
    return c.status(p)


def show(p: Proc, event_id: bytes) -> dict[str, Any] | None:
    """`bidmesh ledger show ID --json`; None if the node does not hold the event."""
    r = subprocess.run([sys.executable, "-m", "node.cli", "ledger", "--data-dir", str(p.data_dir),
                        "show", event_id.hex(), "--json"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode != 0 and "no event" in r.stderr:
        return None
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


async def submit(host: P2PHost, p: Proc, wires: list[bytes]) -> query.Submitted:
    data = await request(host, p.peer_id, query.protocol_id(NETWORK),
                         query.Submit(tuple(wires)).encode(), query.MAX_RESPONSE, 10.0)
    resp = query.decode_response(data)
    assert isinstance(resp, query.Submitted)
    return resp


def hostile_message(i: int, wires: list[bytes]) -> bytes:
    """The i-th hostile gossip message (each one distinct: no duplicate message ids)."""
    w = wires[i % len(wires)]
    kind = i % 5
    if kind == 0:  # a valid envelope with a forged signature
        return gossip.encode_batch([codec.pack([codec.unpack(w, MAX_WIRE)[0], bytes(64)])])
    if kind == 1:
        return b"\xc1not msgpack" + i.to_bytes(4, "big")
    if kind == 2:  # one record over the size limit
        return codec.pack([1, [i.to_bytes(4, "big") * (MAX_WIRE // 4 + 1)]])
    if kind == 3:  # ~1 MB: over the batch limit
        return codec.pack([1, [i.to_bytes(4, "big") + b"x" * 996] * 1000])
    return codec.pack([2, [w]])  # an unknown batch version


async def slowloris(host: P2PHost, p: Proc, protocol: str, out: dict[str, Any]) -> None:
    """Three bytes of a frame header, then silence: how long until the node ends it."""
    await host.connect(p.addr)
    stream = await host.new_stream(p.peer_id, protocol)
    t0 = trio.current_time()
    await stream.write(b"\x00\x00\x10")
    try:
        frame = await read_frame(stream, 1 << 16, 30.0)
        out[protocol] = ("frame", frame, trio.current_time() - t0)
    except (RemoteError, InvalidMessage) as e:
        out[protocol] = ("ended", e, trio.current_time() - t0)
    finally:
        await stream.reset()


async def test_hostile_peers_against_node_processes(tmp_path: Path) -> None:
    with cluster(tmp_path, 2, overrides=OVERRIDES) as c:
        await trio.to_thread.run_sync(c.start_all)
        n0, n1 = c.procs
        acked = await trio.to_thread.run_sync(c.publish, n0, 50)
        await trio.to_thread.run_sync(wait_converged, c)
        with Ledger(n0.data_dir / "ledger.db", network=NETWORK, readonly=True) as led:
            stored_wires = [w for w in (led.get_wire(i) for i in acked) if w is not None]
        loris: dict[str, Any] = {}

        async with open_host(evil("loris").seed) as lh, trio.open_nursery() as bg:
            # Slowloris on the stream and query protocols runs beside everything else.
            bg.start_soon(slowloris, lh, n0, stream_protocol(NETWORK), loris)
            bg.start_soon(slowloris, lh, n0, query.protocol_id(NETWORK), loris)

            # 1. Gossip garbage: bad signatures, malformed, oversized batches, oversized
            #    records. Counted, then the forwarder is cut off.
            async with open_host(evil("gossiper").seed) as eh, make_pubsub(eh) as eps:
                await eh.connect(n0.addr)
                topic = eps.topic(gossip.topic_name(NETWORK))
                sub = await topic.subscribe()
                del sub
                with trio.fail_after(60):
                    while n0.peer_id not in {str(p) for p in topic.peers()}:
                        await trio.sleep(0.05)
                sent = 0
                with trio.fail_after(90):
                    while True:
                        st = await trio.to_thread.run_sync(status, c, n0)
                        if st["gossip"]["cut_off"] >= 1:
                            break
                        with trio.move_on_after(2):
                            await topic.publish(hostile_message(sent, stored_wires), timeout=2)
                        sent += 1
                        await trio.sleep(0.05)
                st = await trio.to_thread.run_sync(status, c, n0)
                faults = st["gossip"]["faults"]
                assert str(eh.peer_id) in st["blocked"], st["blocked"]
                assert sum(faults.values()) >= 5, faults
                assert {"bad_signature", "batch_malformed", "batch_oversized"} & set(faults)
                with trio.fail_after(30):
                    while eh.is_connected(n0.peer_id):
                        await trio.sleep(0.05)
                # A blocked peer cannot come back before its time is up.
                with pytest.raises(BidmeshError):
                    await eh.connect(n0.addr, timeout=3)
                    await request(eh, n0.peer_id, query.protocol_id(NETWORK),
                                  query.GetDigest().encode(), query.MAX_RESPONSE, 3)

            # 2. Replays of stored events, by gossip from another peer: duplicates only.
            async with open_host(evil("replayer").seed) as rh, make_pubsub(rh) as rps:
                await rh.connect(n0.addr)
                rtopic = rps.topic(gossip.topic_name(NETWORK))
                sub = await rtopic.subscribe()
                del sub
                with trio.fail_after(60):
                    while n0.peer_id not in {str(p) for p in rtopic.peers()}:
                        await trio.sleep(0.05)
                before = (await trio.to_thread.run_sync(status, c, n0))["gossip"]
                for i in range(0, len(stored_wires), 5):
                    await rtopic.publish(gossip.encode_batch(stored_wires[i : i + 5][::-1]))
                await rtopic.publish(gossip.encode_batch(stored_wires[:3] * 2))

                def dup_count() -> int:
                    return int(status(c, n0)["gossip"]["events"].get("duplicate", 0))

                await trio.to_thread.run_sync(
                    wait_for, lambda: dup_count() >= before["events"].get("duplicate", 0) + 50,
                    60, "the replays to be seen as duplicates")
                after = (await trio.to_thread.run_sync(status, c, n0))["gossip"]
                assert after["cut_off"] == before["cut_off"]
                assert str(rh.peer_id) not in (await trio.to_thread.run_sync(
                    status, c, n0))["blocked"]
                assert sum(after["faults"].values()) == sum(before["faults"].values())

            # 3. Submit flood beyond the rate limit (50 events/s, burst 200).
            flooder = evil("flooder")
            chain = []
            prev = None
            for i in range(16):
                ev = sign_event(flooder.seed, i + 1, prev, 1000 + i, offer(i, "flood"), NETWORK)
                chain.append(ev.wire)
                prev = ev.id
            async with open_host(flooder.seed) as fh:
                await fh.connect(n0.addr)
                refused = 0
                cut = False
                # Until it is cut off for submitting on after refusals (SUBMIT_REFUSALS_MAX
                # in a row), not a fixed number of tries: on a loaded host the tries
                # are slow enough for the bucket to refill between some of them.
                for _ in range(400):
                    try:
                        await submit(fh, n0, chain)
                    except RequestRefused as e:
                        assert e.reason == "rate_limited"
                        refused += 1
                    except BidmeshError:  # disconnected, and refused from now on
                        cut = True
                        break
                assert cut and refused >= query.SUBMIT_REFUSALS_MAX - 1, refused
                qs = (await trio.to_thread.run_sync(status, c, n0))["services"]["query"]
                # The last refusal's answer may lose the race with the disconnect.
                assert qs["rate_limited"] in (refused, refused + 1), (qs, refused)
                assert qs["submit_cut_off"] == 1, qs

            # 4. Equivocation: two different events at one seq, one to each node; the
            #    author's later events count for nothing anywhere.
            liar = evil("equivocator")
            e1 = sign_event(liar.seed, 1, None, 10_000, offer(1, "eq"), NETWORK)
            x = sign_event(liar.seed, 2, e1.id, 10_001, offer(2, "left"), NETWORK)
            y = sign_event(liar.seed, 2, e1.id, 10_001, offer(2, "right"), NETWORK)
            later = sign_event(liar.seed, 3, x.id, 10_002, offer(3, "later"), NETWORK)
            async with open_host(liar.seed) as qh:
                await qh.connect(n0.addr)
                await qh.connect(n1.addr)
                r0 = await submit(qh, n0, [e1.wire, x.wire, later.wire])
                r1 = await submit(qh, n1, [e1.wire, y.wire])
                assert [r.status for r in r0.results] == ["accepted"] * 3
                assert [r.status for r in r1.results][1] in ("accepted", "fork")
            await trio.to_thread.run_sync(wait_converged, c)
            for p in c.procs:
                st = await trio.to_thread.run_sync(status, c, p)
                assert st["forked_authors"] == 1
                shown = await trio.to_thread.run_sync(show, p, later.id)
                # Stored where it chains (n0) but excluded; not even stored elsewhere.
                assert (shown is None and p is n1) or (shown is not None and
                                                       shown["counts"] is False), shown

            # 5. A dataplane peer without a lease.
            stranger = evil("no-lease")
            _, lease = lease_events(stranger, n0.ident, "zstd", ("identity",))
            async with open_host(stranger.seed) as sh:
                await sh.connect(n0.addr)
                with trio.fail_after(20), pytest.raises(LeaseRefused) as e:
                    await stream_through_lease(sh, n0.peer_id, lease, stranger,
                                               [b"\x00\x00\x00\x03abc"], "lp", [("identity",)],
                                               network=NETWORK, timeout=10)
                assert e.value.reason == "no_lease"
            dp = (await trio.to_thread.run_sync(status, c, n0))["services"]["dataplane"]
            assert dp["counters"].get("refused:no_lease") == 1

            with trio.fail_after(60):
                while len(loris) < 2:
                    await trio.sleep(0.1)
        # Slowloris: both ended by the node (its bound is 10 s), not by us: our own read
        # would have timed out at 30 s with StreamTimeout, which slowloris() does not
        # catch. No wall-clock bound: a loaded host adds seconds to any of them.
        kind, frame, took = loris[stream_protocol(NETWORK)]
        assert kind == "frame" and int.from_bytes(frame[:8], "big") == TRAILER_SEQ, loris
        assert Trailer.decode(frame[8:]).reason == "timeout"
        kind, _err, took = loris[query.protocol_id(NETWORK)]
        assert kind == "ended", loris
        dp = (await trio.to_thread.run_sync(status, c, n0))["services"]["dataplane"]
        assert dp["counters"].get("refused:timeout") == 1

        # Nothing accepted before was lost; the ledgers verify; the honest node was
        # never cut off.
        await trio.to_thread.run_sync(wait_converged, c)
        for p in c.procs:
            assert stored(p, acked) == len(acked)
            assert_verified(p)
            st = await trio.to_thread.run_sync(status, c, p)
            assert str(c.procs[1 - p.index].peer_id) not in st["blocked"]
        print(f"hostile gossip messages sent before the cut-off: {sent}; "
              f"slowloris ended after {took:.1f} s")


async def test_subcontractor_returning_wrong_results_is_redispatched() -> None:
    """B corrupts one byte of every third segment (plausible, well-formed output):
    A's verification catches it, B is avoided, C does the work; output byte-exact."""
    lease = dp_lease()
    pkts = packets(400, seed=8)
    flaky = WorkerPool({"aes-gcm": FlakyAesGcm()}, 1)
    async with flaky, world({"A": [("zstd", 1)], "B": [("aes-gcm", 1)], "C": [("aes-gcm", 5)]},
                            pools={"B": flaky}) as w:
        w.leases[lease.id] = lease
        # Workers up and their processors loaded first: on a loaded host starting them
        # took longer than the subcontract timeout (5 s), and B (or C) timed out before
        # it ever answered.
        with trio.fail_after(300):
            await flaky.start()
            await w.pool.start()
        with trio.fail_after(120):
            res = await w.stream("M", lease, pkts)
        assert res.trailer.ok and res.output == reference(pkts, lease, res.stream_id)
        a = w.nodes["A"].svc
        assert a.counters["contractor_garbage"] >= 1 and res.trailer.redispatched >= 1
        subs = {s.contractor for s in subcontracts(w.nodes["A"])}
        assert w.nodes["C"].host.pubkey in subs
        # What B got right before it was caught is credited; what it got wrong is not.
        assert sum(s.segments for s in subcontracts(w.nodes["A"])) == res.frames
