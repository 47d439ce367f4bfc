"""Process sessions (`/bidmesh/<network>/process/2`): one kept stream per contractor,
pipelined requests answered by id; fallback to `/process/1`; bad input from peers."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
import trio
from conftest import wait_until
from test_dataplane import CHAIN, make_lease, packets, reference, world

from node.dataplane import DataplaneConfig
from node.dataplane.session import ProcessSession
from node.dataplane.wire import (
    SESSION_ERROR_ID,
    ProcessRequest,
    SessionResponse,
    encode_session_response,
    session_protocol,
)
from node.errors import BidmeshError
from node.p2p import P2PHost, Stream, open_host, read_frame, set_stream_handler, write_frame

NET = "dptest"
OFFERS = {"A": [("zstd", 1)], "B": [("aes-gcm", 1)]}
U64 = struct.Struct(">Q")


async def test_subcontracting_keeps_one_session_for_every_stream() -> None:
    lease = make_lease()
    async with world(OFFERS) as w:
        w.leases[lease.id] = lease
        frames = 0
        for seed in (11, 12):
            pkts = packets(300, seed=seed)
            res = await w.stream("M", lease, pkts)
            assert res.trailer.ok and res.output == reference(pkts, lease, res.stream_id)
            frames += res.frames
        a, b = w.nodes["A"].svc, w.nodes["B"].svc
        assert a.counters["sessions_opened"] == 1 and b.counters["process_sessions"] == 1
        assert b.served[w.nodes["A"].host.pubkey]["segments"] == frames
        assert a.stats()["process_sessions"]["open_to_contractors"] == 1
        assert "session_unavailable" not in a.counters


async def test_contractor_without_sessions_is_sent_single_requests() -> None:
    lease = make_lease()
    old = replace(DataplaneConfig(window=8), process_sessions=False)
    async with world(OFFERS, configs={"B": old}) as w:
        w.leases[lease.id] = lease
        pkts = packets(200, seed=13)
        res = await w.stream("M", lease, pkts)
        assert res.trailer.ok and res.output == reference(pkts, lease, res.stream_id)
        a, b = w.nodes["A"].svc, w.nodes["B"].svc
        assert a.counters["session_unavailable"] == 1 and "sessions_opened" not in a.counters
        assert "process_sessions" not in b.counters
        assert b.served[w.nodes["A"].host.pubkey]["segments"] == res.frames


async def test_idle_sessions_are_closed_and_reopened() -> None:
    lease = make_lease()
    quick = replace(DataplaneConfig(window=8), session_idle_s=0.2)
    async with world(OFFERS, configs={"A": quick}) as w:
        w.leases[lease.id] = lease
        a, b = w.nodes["A"].svc, w.nodes["B"].svc
        for seed in (14, 15):
            pkts = packets(60, seed=seed)
            res = await w.stream("M", lease, pkts)
            assert res.trailer.ok and res.output == reference(pkts, lease, res.stream_id)
            await wait_until(lambda: a.dispatcher.open_sessions == 0
                             and b.stats()["process_sessions"]["serving"] == 0,
                             what="idle close")
        assert a.counters["sessions_opened"] == 2 and b.counters["process_sessions"] == 2
        assert a.counters["contractor_failed"] == 0
        assert not [k for k in b.counters if k.startswith("process_refused")]


async def open_session(frm: P2PHost, to: P2PHost) -> object:
    await frm.connect(to.addrs[0])
    return await frm.new_stream(to.peer_id, session_protocol(NET))


async def test_session_bad_input_is_answered_or_cut_and_counted() -> None:
    lease = make_lease()
    req = ProcessRequest(lease.id, b"s1", 0, 1, ("aes-gcm",), bytes(range(32)), b"data")
    async with world(OFFERS) as w:
        w.leases[lease.id] = lease
        a, b, x = w.nodes["A"].host, w.nodes["B"].host, w.members["X"]
        counters = w.nodes["B"].svc.counters

        # A peer without an Offer: the whole session is refused, nothing is read.
        s = await open_session(x, b)
        resp = SessionResponse.decode(await read_frame(s, 4096, 10.0), None)  # type: ignore[arg-type]
        assert resp.request_id == SESSION_ERROR_ID and resp.reason == "unknown_provider"
        assert counters["process_refused:unknown_provider"] == 1

        # A known provider: a bad request or an unknown service is answered by id, and
        # the session goes on serving.
        s = await open_session(a, b)
        await write_frame(s, U64.pack(5) + b"\xff garbage", 10.0)  # type: ignore[arg-type]
        await write_frame(s, replace(req, services=("zstd",)).encode(6), 10.0)  # type: ignore[arg-type]
        await write_frame(s, req.encode(7), 10.0)  # type: ignore[arg-type]
        # A lease nobody knows (issue 13 item 1): refused by id, the session goes on.
        await write_frame(s, replace(req, lease=bytes(32)).encode(8), 10.0)  # type: ignore[arg-type]
        got = {}
        for _ in range(4):
            frame = await read_frame(s, 1 << 20, 10.0)  # type: ignore[arg-type]
            (rid,) = U64.unpack_from(frame)
            got[rid] = SessionResponse.decode(frame, 1 if rid == 7 else None)
        assert (got[5].ok, got[5].reason) == (False, "bad_request")
        assert (got[6].ok, got[6].reason) == (False, "unknown_service")
        assert got[7].ok and len(got[7].outputs[0]) == 12 + 4 + 16  # nonce, data, tag
        assert (got[8].ok, got[8].reason) == (False, "no_lease")
        assert counters["process_refused:no_lease"] == 1
        assert counters["process_refused:bad_request"] == 1
        assert counters["process_refused:unknown_service"] == 1

        # A frame too short to hold an id: the session is reset.
        await write_frame(s, b"abc", 10.0)  # type: ignore[arg-type]
        with pytest.raises(BidmeshError):
            await read_frame(s, 1 << 20, 10.0)  # type: ignore[arg-type]
        assert counters["process_refused:bad_request"] == 2

        # An oversized frame: reset without reading it.
        s = await open_session(a, b)
        await s.write(struct.pack(">I", 1 << 30))  # type: ignore[attr-defined]
        with pytest.raises(BidmeshError):
            await read_frame(s, 1 << 20, 10.0)  # type: ignore[arg-type]
        assert counters["process_refused:oversized"] == 1
        await wait_until(lambda: w.nodes["B"].svc.stats()["process_sessions"]["serving"] == 0,
                         what="sessions ended")


async def test_contractor_refusing_sessions_when_full_is_counted() -> None:
    lease = make_lease(chain=CHAIN)
    full = replace(DataplaneConfig(window=8), process_max_sessions=0)
    async with world(OFFERS, configs={"B": full}) as w:
        b = w.nodes["B"].host
        s = await open_session(w.nodes["A"].host, b)
        resp = SessionResponse.decode(await read_frame(s, 4096, 10.0), None)  # type: ignore[arg-type]
        assert resp.request_id == SESSION_ERROR_ID and resp.reason == "busy"
        assert w.nodes["B"].svc.counters["process_refused:busy"] == 1
        del lease


async def test_call_cancelled_during_its_write_keeps_the_session() -> None:
    """A call cancelled while its request is being written (the write is shielded, the
    cancellation lands once the frame is out): the contractor answers it, and that
    answer is dropped. It used to find no request in flight and fail the session, with
    every other request on it, blaming a contractor that did nothing wrong."""
    release = trio.Event()

    async def contractor(stream: Stream) -> None:  # reads only once released
        await release.wait()
        for _ in range(2):
            frame = await read_frame(stream, 4 << 20, 30.0)
            (rid,) = U64.unpack_from(frame)
            await write_frame(stream, encode_session_response(rid, [b"out%d" % rid]), 30.0)

    async with open_host(b"r" * 32) as req_host, open_host(b"c" * 32) as con_host, \
            trio.open_nursery() as nursery:
        set_stream_handler(con_host, session_protocol(NET), contractor)
        await req_host.connect(con_host.addrs[0])
        stream = await req_host.new_stream(con_host.peer_id, session_protocol(NET))
        session = ProcessSession(stream, "contractor", 8 << 20, 60.0)
        nursery.start_soon(session.run)
        # Four times yamux's initial window: the write waits for the contractor to read.
        req = ProcessRequest(bytes(32), b"s1", 0, 0, ("identity",), None, b"x" * (1 << 20))
        with trio.fail_after(60):
            with trio.CancelScope() as scope:

                async def cancel_while_writing() -> None:
                    await wait_until(session._write_lock.locked, what="the write to start")
                    scope.cancel()
                    release.set()

                nursery.start_soon(cancel_while_writing)
                await session.call(req, 1, 60.0)
            assert scope.cancelled_caught
            assert await session.call(replace(req, seq=1, data=b"y"), 1, 60.0) == [b"out1"]
        assert session.usable, session.error
        nursery.cancel_scope.cancel()
