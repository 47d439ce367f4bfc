"""node/p2p/ on real py-libp2p hosts over loopback."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Any

import pytest
import trio
from conftest import wait_until

from node.errors import (
    InvalidMessage,
    OperationError,
    PeerError,
    RemoteError,
    StreamClosed,
    UsageError,
)
from node.p2p import (
    P2PHost,
    PubSub,
    RequestRefused,
    StreamTimeout,
    Subscription,
    make_pubsub,
    open_host,
    peer_id_from_pubkey,
    pubkey_from_peer_id,
    read_frame,
    remote_pubkey,
    request,
    serve_requests,
    set_stream_handler,
    write_frame,
)

PROTO = "/bidmesh-test/echo/1"


def seed(i: int) -> bytes:
    return bytes([i]) * 32


@asynccontextmanager
async def hosts(n: int, **kwargs: int) -> AsyncIterator[list[P2PHost]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_host(seed(i + 1), **kwargs)) for i in range(n)]




async def echo(pubkey: bytes, payload: bytes) -> bytes:
    return pubkey + payload


# --------------------------------------------------------------------------- identity, hosts


async def test_peer_id_derives_from_seed() -> None:
    async with open_host(seed(7)) as h1:
        first_id, pub = h1.peer_id, h1.pubkey
        assert all(a.endswith(f"/p2p/{first_id}") for a in h1.addrs)
    async with open_host(seed(7)) as h2:
        assert h2.peer_id == first_id
    assert len(pub) == 32
    assert peer_id_from_pubkey(pub) == first_id
    assert pubkey_from_peer_id(first_id) == pub
    assert pubkey_from_peer_id(str(first_id)) == pub
    with pytest.raises(UsageError):
        peer_id_from_pubkey(b"short")
    with pytest.raises(InvalidMessage):
        pubkey_from_peer_id("not-a-peer-id-0OIl")


async def test_bad_seed_is_usage_error() -> None:
    with pytest.raises(UsageError):
        async with open_host(b"x" * 31):
            pass


async def test_three_hosts_connect_and_disconnect() -> None:
    async with hosts(3) as (a, b, c):
        with trio.fail_after(5):
            assert await b.connect(a.addrs[0]) == a.peer_id
            await c.connect(a.addrs[0])
            await c.connect(b.addrs[0])
            assert await c.connect(b.addrs[0]) == b.peer_id  # already connected: no-op
        await wait_until(lambda: set(a.connected_peers()) == {b.peer_id, c.peer_id})
        assert set(c.connected_peers()) == {a.peer_id, b.peer_id}
        await c.disconnect(a.peer_id)
        await wait_until(lambda: c.peer_id not in a.connected_peers())
        with pytest.raises(UsageError):
            await a.connect("/ip4/127.0.0.1/tcp/1")  # no /p2p/ part


async def test_connection_cap_refuses_extra_peers_and_frees_slots() -> None:
    async with hosts(4, max_connections=2) as (a, b, c, d):
        await b.connect(a.addrs[0])
        await c.connect(a.addrs[0])
        # a refuses by closing the new connection once it is registered: the close
        # may reach d before connect() returns (OperationError) or just after it.
        with suppress(OperationError):
            await d.connect(a.addrs[0])
        await wait_until(lambda: not d.is_connected(a.peer_id))
        assert set(a.connected_peers()) == {b.peer_id, c.peer_id}

        def slots_used() -> int:
            used: int = a.resources.status()["connections"]["inbound"]
            return used

        # Slots are freed on disconnect, repeatedly (upstream leaked inbound slots).
        for _ in range(3):
            await b.disconnect(a.peer_id)
            await wait_until(lambda: b.peer_id not in a.connected_peers() and slots_used() < 2)
            await d.connect(a.addrs[0])
            await d.disconnect(a.peer_id)
            await wait_until(lambda: d.peer_id not in a.connected_peers() and slots_used() < 2)
            await b.connect(a.addrs[0])


async def test_block_keeps_peer_out() -> None:
    async with hosts(2) as (a, b):
        await b.connect(a.addrs[0])
        serve_requests(a, PROTO, echo, max_request=1024)
        a.block(b.peer_id, 1.5)
        await wait_until(lambda: not a.connected_peers() and not b.connected_peers())
        # b dials again: a closes the connection as soon as it registers.
        with pytest.raises(OperationError):
            await b.connect(a.addrs[0])
            await wait_until(lambda: not b.is_connected(a.peer_id), 5)
            await request(b, a.peer_id, PROTO, b"x", max_response=1024, timeout=2)
        await wait_until(lambda: not a._swarm.connections.get(b.peer_id))
        with pytest.raises(OperationError):
            await a.connect(b.addrs[0])
        # After the block expires the peer is welcome again.
        await wait_until(lambda: not a.is_blocked(b.peer_id), 5)
        await b.connect(a.addrs[0])
        reply = await request(b, a.peer_id, PROTO, b"x", max_response=1024, timeout=5)
        assert reply == b.pubkey + b"x"


# ------------------------------------------------------------ frames, request/response


async def test_request_response_roundtrip() -> None:
    async with hosts(2) as (a, b):
        serve_requests(a, PROTO, echo, max_request=1 << 20)
        await b.connect(a.addrs[0])
        for size in (0, 1, 100_000, 1 << 20):
            payload = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
            reply = await request(b, a.peer_id, PROTO, payload, max_response=2 << 20, timeout=10)
            assert reply == b.pubkey + payload
        with pytest.raises(InvalidMessage) as err:
            await request(b, a.peer_id, PROTO, b"x" * 100, max_response=50, timeout=5)
        assert err.value.reason == "oversized"


async def test_oversized_request_rejected_server_survives() -> None:
    async with hosts(2) as (a, b):
        serve_requests(a, PROTO, echo, max_request=1000)
        await b.connect(a.addrs[0])
        # 2 MiB is far beyond yamux's 256 KiB window: the answer still arrives.
        for size in (1001, 2 << 20):
            with trio.fail_after(5), pytest.raises(RequestRefused) as err:
                await request(b, a.peer_id, PROTO, b"x" * size, max_response=1024, timeout=5)
            assert err.value.reason == "oversized"
        assert await request(b, a.peer_id, PROTO, b"ok", max_response=1024, timeout=5)
        assert b.is_connected(a.peer_id)


async def test_handler_exception_resets_stream() -> None:
    async def crash(pubkey: bytes, payload: bytes) -> bytes:
        raise RuntimeError("boom (expected in this test)")

    async def refuse(pubkey: bytes, payload: bytes) -> bytes:
        raise InvalidMessage("no thanks", "not_today")

    async with hosts(2) as (a, b):
        serve_requests(a, "/crash/1", crash, max_request=1024)
        serve_requests(a, "/refuse/1", refuse, max_request=1024)
        serve_requests(a, PROTO, echo, max_request=1024)
        await b.connect(a.addrs[0])
        with trio.fail_after(3), pytest.raises(RemoteError) as crashed:
            await request(b, a.peer_id, "/crash/1", b"x", max_response=1024, timeout=30)
        assert not isinstance(crashed.value, RequestRefused)
        with trio.fail_after(3), pytest.raises(RequestRefused) as refused:
            await request(b, a.peer_id, "/refuse/1", b"x", max_response=1024, timeout=30)
        assert refused.value.reason == "not_today"
        with trio.fail_after(3), pytest.raises(OperationError):
            await request(b, a.peer_id, "/nobody/home/1", b"x", max_response=1024, timeout=30)
        assert await request(b, a.peer_id, PROTO, b"y", max_response=1024, timeout=5)


async def test_raw_stream_handler_exception_resets() -> None:
    async def bad(stream: object) -> None:
        raise ValueError("handler bug (expected in this test)")

    async with hosts(2) as (a, b):
        set_stream_handler(a, "/raw/1", bad)  # type: ignore[arg-type]
        await b.connect(a.addrs[0])
        stream = await b.new_stream(a.peer_id, "/raw/1")
        with trio.fail_after(3), pytest.raises(RemoteError):
            await read_frame(stream, 1024, 30)


async def test_timeouts_are_bounded() -> None:
    async def slow(pubkey: bytes, payload: bytes) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def silent(stream: object) -> None:
        await trio.sleep(5)

    async with hosts(2) as (a, b):
        serve_requests(a, "/slow/1", slow, max_request=1024, timeout=1.0)
        set_stream_handler(a, "/silent/1", silent)  # type: ignore[arg-type]
        await b.connect(a.addrs[0])
        start = trio.current_time()
        with pytest.raises(StreamTimeout):
            await request(b, a.peer_id, "/slow/1", b"x", max_response=1024, timeout=0.5)
        assert trio.current_time() - start < 2
        # A server-side timeout also ends the exchange (the stream is reset).
        with trio.fail_after(3), pytest.raises(RemoteError):
            await request(b, a.peer_id, "/slow/1", b"x", max_response=1024, timeout=30)
        stream = await b.new_stream(a.peer_id, "/silent/1")
        start = trio.current_time()
        with pytest.raises(StreamTimeout):
            await read_frame(stream, 1024, 0.3)
        assert trio.current_time() - start < 2
        await stream.reset()


async def test_eof_mid_frame_is_invalid_message_and_a_clean_eof_is_not() -> None:
    async def truncated(stream: object) -> None:
        await stream.write(b"\x00\x00\x00\x0a" + b"abc")  # type: ignore[attr-defined]

    async def empty(stream: object) -> None:
        await trio.lowlevel.checkpoint()

    async def silent(stream: object) -> None:
        await read_frame(stream, 1024, 5)  # type: ignore[arg-type]

    async def framed(stream: object) -> None:
        await write_frame(stream, b"hello")  # type: ignore[arg-type]
        assert len(remote_pubkey(stream)) == 32  # type: ignore[arg-type]

    async with hosts(2) as (a, b):
        set_stream_handler(a, "/trunc/1", truncated)  # type: ignore[arg-type]
        set_stream_handler(a, "/empty/1", empty)  # type: ignore[arg-type]
        set_stream_handler(a, "/framed/1", framed)  # type: ignore[arg-type]
        await b.connect(a.addrs[0])
        stream = await b.new_stream(a.peer_id, "/trunc/1")
        with pytest.raises(InvalidMessage) as err:
            await read_frame(stream, 1024, 5)
        assert err.value.reason == "truncated"
        stream = await b.new_stream(a.peer_id, "/empty/1")
        with pytest.raises(StreamClosed) as closed:  # a clean end, not invalid input
            await read_frame(stream, 1024, 5)
        assert closed.value.reason == "eof" and not isinstance(closed.value, PeerError)
        stream = await b.new_stream(a.peer_id, "/framed/1")
        assert await read_frame(stream, 5, 5) == b"hello"
        stream = await b.new_stream(a.peer_id, "/framed/1")
        with pytest.raises(InvalidMessage) as err:
            await read_frame(stream, 4, 5)
        assert err.value.reason == "oversized"
        # A server that reads the request and closes without answering: the request
        # fails as an operation (the sync client then fails the session, counting no
        # fault against the peer), not as invalid input from it.
        set_stream_handler(a, "/silent/1", silent)  # type: ignore[arg-type]
        with pytest.raises(StreamClosed) as closed:
            await request(b, a.peer_id, "/silent/1", b"x", max_response=1024, timeout=10)
        assert isinstance(closed.value, OperationError)


# --------------------------------------------------------------------------- gossipsub


@asynccontextmanager
async def gossip_net(n: int, **kwargs: float) -> AsyncIterator[tuple[list[P2PHost], list[PubSub]]]:
    async with hosts(n) as hs, AsyncExitStack() as stack:
        pss = [await stack.enter_async_context(make_pubsub(h, **kwargs)) for h in hs]  # type: ignore[arg-type]
        for i, h in enumerate(hs):
            for other in hs[i + 1 :]:
                await other.connect(h.addrs[0])
        yield hs, pss


async def collect(sub: Subscription, into: list[tuple[bytes, bytes]]) -> None:
    async with sub:
        async for item in sub:
            into.append(item)


async def test_gossip_500_messages_three_hosts_zero_loss() -> None:
    n_msgs = 500
    async with gossip_net(3) as (hs, pss), trio.open_nursery() as nursery:
        topics = [ps.topic("bidmesh/test") for ps in pss]
        received: list[list[tuple[bytes, bytes]]] = [[] for _ in hs]
        for t, into in zip(topics, received, strict=True):
            nursery.start_soon(collect, await t.subscribe(), into)
        others = {hs[1].peer_id, hs[2].peer_id}
        await wait_until(lambda: topics[0].mesh_peers() == others)
        for i in range(n_msgs):
            await topics[0].publish(i.to_bytes(4, "big") + b"x" * 200)
        await wait_until(lambda: all(len(r) == n_msgs for r in received), 20)
        for r in received:
            assert {origin for origin, _ in r} == {hs[0].pubkey}
            assert sorted(int.from_bytes(d[:4], "big") for _, d in r) == list(range(n_msgs))
        assert all(t.dropped == 0 for t in topics)
        nursery.cancel_scope.cancel()


async def test_raising_validator_does_not_kill_pubsub() -> None:
    def validator(forwarder: object, data: bytes) -> bool:
        if data.startswith(b"bad"):
            raise ValueError("validator bug (expected in this test)")
        return data.startswith(b"good")

    async with gossip_net(2) as (hs, pss), trio.open_nursery() as nursery:
        pub, sub = pss[0].topic("t"), pss[1].topic("t")
        sub.set_validator(validator)
        got: list[tuple[bytes, bytes]] = []
        nursery.start_soon(collect, await sub.subscribe(), got)
        await wait_until(lambda: hs[1].peer_id in pub.peers())
        for payload in (b"bad1", b"good1", b"ugly", b"bad2", b"good2"):
            await pub.publish(payload)
        await wait_until(lambda: len(got) == 2)
        assert [d for _, d in got] == [b"good1", b"good2"]
        await wait_until(lambda: sub.rejected == 3)
        assert pss[1].pubsub.manager.is_running
        await pub.publish(b"good3")
        await wait_until(lambda: len(got) == 3)
        nursery.cancel_scope.cancel()


async def test_recent_deliveries_stay_bounded() -> None:
    """Upstream never prunes recent_message_deliveries with adaptive gossip off."""
    async with (
        gossip_net(2, prune_interval=0.05, delivery_window=0.2) as (hs, pss),
        trio.open_nursery() as nursery,
    ):
        pub, sub = pss[0].topic("mem"), pss[1].topic("mem")
        got: list[tuple[bytes, bytes]] = []
        nursery.start_soon(collect, await sub.subscribe(), got)
        await wait_until(lambda: hs[1].peer_id in pub.peers())
        router = pss[0].router

        def tracked() -> int:
            return sum(len(v) for v in router.recent_message_deliveries.values())

        peak = 0
        for i in range(5000):
            await pub.publish(i.to_bytes(4, "big"))
            if i % 100 == 0:
                await trio.sleep(0)  # let the prune task run between bursts
                peak = max(peak, tracked())
        assert 0 < peak < 5000
        await wait_until(lambda: tracked() == 0, 5)
        await wait_until(lambda: len(got) == 5000, 30)
        # The other structures that grow per message are bounded upstream:
        await wait_until(lambda: len(router.equivocation_detection) <= 1000, 5)
        nursery.cancel_scope.cancel()


async def test_publish_rejects_oversized_and_subscribe_twice() -> None:
    async with gossip_net(1) as (_, (ps,)):
        topic = ps.topic("x")
        with pytest.raises(UsageError):
            await topic.publish(b"x" * (1 << 20))
        it = await topic.subscribe()
        with pytest.raises(UsageError):
            await topic.subscribe()
        await it.aclose()
        it = await topic.subscribe()
        await topic.publish(b"self")
        with trio.fail_after(5):
            origin, data = await it.__anext__()
        assert (origin, data) == (ps.host.pubkey, b"self")
        await it.aclose()


async def test_read_frame_math_inf_timeout_and_write_limits() -> None:
    async with hosts(2) as (a, b):
        set_stream_handler(a, "/echo-frame/1", _echo_frame)  # type: ignore[arg-type]
        await b.connect(a.addrs[0])
        stream = await b.new_stream(a.peer_id, "/echo-frame/1")
        await write_frame(stream, b"ping")
        assert await read_frame(stream, 16, math.inf) == b"ping"
        await stream.close()


async def _echo_frame(stream: object) -> None:
    data = await read_frame(stream, 16, 5)  # type: ignore[arg-type]
    await write_frame(stream, data)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- upstream workarounds


async def _sink(stream: object) -> None:
    """Read and discard until EOF (the receiving end of a raw stream)."""
    try:
        while await read_frame(stream, 1 << 20, 10):  # type: ignore[arg-type]
            pass
    except (InvalidMessage, OperationError):
        pass


async def test_yamux_credit_is_released_in_half_window_steps() -> None:
    """Upstream sends a WINDOW_UPDATE after almost every read; `open_host` makes the
    receiver return credit only once half the window is consumed (as go-yamux does),
    and flow control still moves data far larger than the window."""
    received: list[object] = []

    async def keep(stream: object) -> None:
        received.append(stream)
        await _sink(stream)

    async with hosts(2) as (a, b):
        set_stream_handler(a, "/sink/1", keep)  # type: ignore[arg-type]
        await b.connect(a.addrs[0])
        stream = await b.new_stream(a.peer_id, "/sink/1")
        await write_frame(stream, b"x" * 1000)
        await wait_until(lambda: bool(received))
        inbound: Any = received[0]
        ms = inbound.muxed_stream
        full = ms.target_recv_window
        # 50 small frames, well under half the window: read, but no credit returned.
        for _ in range(50):
            await write_frame(stream, b"y" * 1000)
        await wait_until(lambda: len(ms.conn.stream_buffers.get(ms.stream_id, b"")) == 0)
        await trio.sleep(0.05)
        assert full - ms.recv_window >= 50 * 1000
        # Past half the window the credit comes back in one update.
        for _ in range(100):
            await write_frame(stream, b"z" * 1000)
        await wait_until(lambda: full - ms.recv_window < full // 2)
        # 8 MiB through a 256 KiB window: flow control neither stalls nor loses data.
        chunk = b"w" * (256 * 1024)
        with trio.fail_after(30):
            for _ in range(32):
                await write_frame(stream, chunk)
        await stream.close()


async def test_slow_reader_keeps_a_fast_writer_alive() -> None:
    """A reader slower than half a window per 5 s (a provider enforcing a low lease
    rate) must not starve the writer: upstream's writer gives up after 5 s at a zero
    window, so credit is returned at once while the writer is nearly out of it."""
    done = trio.Event()
    got = [0]

    async def slow(stream: object) -> None:
        # 4 KiB every 0.2 s (20 KiB/s): half of a 256 KiB window takes 6.4 s.
        with suppress(InvalidMessage, OperationError):
            while data := await read_frame(stream, 1 << 20, 30):  # type: ignore[arg-type]
                got[0] += len(data)
                await trio.sleep(0.2)
        done.set()

    async with hosts(2) as (a, b):
        set_stream_handler(a, "/slow/1", slow)  # type: ignore[arg-type]
        await b.connect(a.addrs[0])
        stream = await b.new_stream(a.peer_id, "/slow/1")
        with trio.fail_after(60):
            for _ in range(100):  # 400 KiB: the window, then 144 KiB at the reader's pace
                await write_frame(stream, b"s" * 4096, timeout=30)
            await stream.close()
        assert got[0] >= 100 * 4096 - (256 << 10) - 4096  # the window's worth may be unread


async def test_signed_peer_record_check_is_cached_but_exact() -> None:
    """Upstream verifies the sender's signed peer record on every pubsub RPC; we
    verify each (peer, record bytes) once, and anything else is checked as before."""
    from libp2p.peer.peerstore import env_to_send_in_RPC
    from libp2p.pubsub import pubsub as upstream
    from libp2p.pubsub.pb import rpc_pb2

    from node.p2p import _compat

    async with gossip_net(2) as (hs, _):
        consume = upstream.maybe_consume_signed_record  # type: ignore[attr-defined]
        assert _compat.is_ours(consume)
        record, _ = env_to_send_in_RPC(hs[1].libp2p)

        def rpc(data: bytes) -> Any:
            r = rpc_pb2.RPC()
            r.senderRecord = data
            return r

        me = hs[0].libp2p
        assert consume(rpc(record), me, hs[1].peer_id) is True
        assert consume(rpc(record), me, hs[1].peer_id) is True  # from the cache
        assert consume(rpc(record), me, hs[0].peer_id) is False  # someone else's record
        tampered = bytearray(record)
        tampered[-1] ^= 1
        assert consume(rpc(bytes(tampered)), me, hs[1].peer_id) is False
        assert consume(rpc_pb2.RPC(), me, hs[1].peer_id) is True  # no record attached


def test_another_libp2p_release_is_refused_with_both_versions_named() -> None:
    from node.errors import IncompatibleDependency
    from node.p2p import _compat

    _compat.check_version()  # the installed (pinned) release passes
    with pytest.raises(IncompatibleDependency) as err:
        _compat.check_version("0.9.0")
    assert "0.8.1" in str(err.value) and "0.9.0" in str(err.value)


def test_upstream_replacements_are_installed_once() -> None:
    from libp2p.pubsub import gossipsub as upstream_gossipsub
    from libp2p.pubsub import pubsub as upstream_pubsub
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    from node.p2p import _compat

    _compat.install()
    consume = upstream_pubsub.maybe_consume_signed_record  # type: ignore[attr-defined]
    window = YamuxStream._auto_tune_and_send_window_update
    _compat.install()  # again: nothing is wrapped a second time
    assert upstream_pubsub.maybe_consume_signed_record is consume  # type: ignore[attr-defined]
    assert upstream_gossipsub.maybe_consume_signed_record is consume  # type: ignore[attr-defined]
    assert YamuxStream._auto_tune_and_send_window_update is window
    assert _compat.is_ours(consume) and _compat.is_ours(window)


async def test_per_object_edits_are_made_once() -> None:
    import random

    from node.p2p import _compat, _compat_gossipsub

    async with open_host(seed(40)) as h, make_pubsub(h) as ps:
        swarm: Any = h._swarm
        upgrade = swarm.upgrade_inbound_raw_conn
        router: Any = ps.router
        handle, select = router.handle_prune, router._select_peers_for_pruning
        push: Any = ps.pubsub.push_msg
        assert _compat.is_ours(upgrade) and _compat.is_ours(handle) and _compat.is_ours(select)
        assert _compat.is_ours(push)
        peers_to_send = router._get_peers_to_send
        assert _compat.is_ours(peers_to_send)
        _compat_gossipsub.one_copy_at_a_time(ps.pubsub, lambda msg: None, router=ps.router)
        assert ps.pubsub.push_msg is push and router._get_peers_to_send is peers_to_send
        _compat.limit_inbound_handshakes(swarm)  # again: not a second queue around the first
        _compat_gossipsub.track_prunes(ps.router, {}, {})
        _compat_gossipsub.prune_at_random(ps.router, random.Random(1))
        assert swarm.upgrade_inbound_raw_conn is upgrade
        assert router.handle_prune is handle and router._select_peers_for_pruning is select


async def test_a_copy_seen_while_it_waited_for_a_validator_slot_is_not_validated() -> None:
    """Upstream checks the seen-cache before a copy waits for an async-validator slot;
    a copy whose message another copy got delivered (and marked seen) meanwhile is
    rejected, not validated, delivered and forwarded to the mesh once more."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2

    async with open_host(seed(41)) as h, make_pubsub(h) as ps:
        topic = ps.topic("late")
        seen: list[bytes] = []

        async def validator(forwarder: ID, origin: ID, data: bytes) -> bool:
            seen.append(data)
            return True

        topic.set_async_validator(validator)
        relay = peer_id_from_pubkey(bytes(seed(42)))
        msgs = [rpc_pb2.Message(from_id=relay.to_bytes(), seqno=i.to_bytes(8, "big"),
                                data=b"m%d" % i, topicIDs=["late"]) for i in (1, 2)]
        upstream: Any = ps.pubsub
        assert await topic._validate_async(relay, msgs[0]) is True
        upstream._mark_msg_seen(msgs[0])  # what push_msg does once a copy is valid
        # Another copy of it, past the seen check before that: rejected, not counted
        # as invalid; a message not seen yet is still validated.
        assert await topic._validate_async(relay, msgs[0]) is False
        assert await topic._validate_async(relay, msgs[1]) is True
        assert seen == [b"m1", b"m2"]
        assert (topic.late_copies, topic.rejected) == (1, 0)


async def test_a_copy_of_a_message_being_handled_is_dropped_at_the_door() -> None:
    """While one copy of a message is being validated, another (from another mesh
    peer) is dropped before upstream checks its signature or validates it; once the
    first is delivered, upstream's seen-cache drops later copies."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

    async with (
        hosts(2) as (a, b),
        make_pubsub(a) as psa,
        make_pubsub(b) as psb,
        trio.open_nursery() as nursery,
    ):
        topic = psb.topic("copies")
        release = trio.Event()
        calls: list[bytes] = []

        async def validator(forwarder: ID, origin: ID, data: bytes) -> bool:
            calls.append(data)
            await release.wait()
            return True

        topic.set_async_validator(validator)
        got: list[tuple[bytes, bytes]] = []
        nursery.start_soon(collect, await topic.subscribe(), got)
        signer: Any = psa.pubsub
        msg = rpc_pb2.Message(data=b"batch", topicIDs=["copies"], from_id=a.peer_id.to_bytes(),
                              seqno=(1).to_bytes(8, "big"))
        msg.signature = signer.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode()
                                             + msg.SerializeToString())
        msg.key = a.libp2p.get_public_key().serialize()
        upstream: Any = psb.pubsub
        msg_id = upstream.get_message_id(msg)
        nursery.start_soon(upstream.push_msg, a.peer_id, msg)
        await wait_until(lambda: calls == [b"batch"])
        relay = peer_id_from_pubkey(bytes(seed(45)))
        await upstream.push_msg(relay, msg)  # returns at once: the first copy is in hand
        assert topic.concurrent_copies == 1
        assert upstream.validation_cache.get(msg_id) is None  # this copy was not validated
        release.set()
        await wait_until(lambda: len(got) == 1)
        assert upstream.validation_cache.get(msg_id).is_valid
        await upstream.push_msg(relay, msg)  # seen: upstream drops it
        assert calls == [b"batch"] and len(got) == 1
        assert (topic.concurrent_copies, topic.rejected) == (1, 0)
        nursery.cancel_scope.cancel()


async def test_a_message_the_precheck_refuses_is_dropped_before_upstream() -> None:
    """A topic's precheck runs when a message arrives: a refusal drops it before
    upstream checks its signature or validates it (no verdict cached, not marked
    seen, so another copy is judged on its own); anything else is what the
    validator gets in place of the data, and nothing is left behind."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

    async with (
        hosts(2) as (a, b),
        make_pubsub(a) as psa,
        make_pubsub(b) as psb,
        trio.open_nursery() as nursery,
    ):
        topic = psb.topic("pre")
        refuse = {b"over"}
        prechecked: list[tuple[bytes, bytes]] = []
        validated: list[object] = []

        def precheck(forwarder: ID, origin: ID, data: bytes) -> object:
            prechecked.append((forwarder.to_bytes(), data))
            return False if data in refuse else data.upper()

        async def validator(forwarder: ID, origin: ID, pre: object) -> bool:
            validated.append(pre)
            return True

        topic.set_async_validator(validator, precheck)
        got: list[tuple[bytes, bytes]] = []
        nursery.start_soon(collect, await topic.subscribe(), got)
        signer: Any = psa.pubsub

        def signed(seqno: int, data: bytes, forge: bool = False) -> rpc_pb2.Message:
            msg = rpc_pb2.Message(data=data, topicIDs=["pre"], from_id=a.peer_id.to_bytes(),
                                  seqno=seqno.to_bytes(8, "big"))
            msg.signature = signer.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode()
                                                 + msg.SerializeToString())
            if forge:
                msg.data = data + b"!"  # the signature no longer matches
            msg.key = a.libp2p.get_public_key().serialize()
            return msg

        upstream: Any = psb.pubsub
        over = signed(1, b"over")
        await upstream.push_msg(a.peer_id, over)
        msg_id = upstream.get_message_id(over)
        assert topic.refused_early == 1 and validated == []
        assert upstream.validation_cache.get(msg_id) is None
        assert not upstream.seen_messages.has(msg_id)
        refuse.clear()  # the same message again (another forwarder's copy): judged anew
        await upstream.push_msg(a.peer_id, over)
        await upstream.push_msg(a.peer_id, signed(2, b"fine"))
        await wait_until(lambda: len(got) == 2)
        assert validated == [b"OVER", b"FINE"]
        # Admitted by the precheck, refused by upstream's signature check: released.
        await upstream.push_msg(a.peer_id, signed(3, b"forged", forge=True))
        assert len(prechecked) == 4 and validated == [b"OVER", b"FINE"]
        assert topic._prechecked == {} and (topic.refused_early, topic.rejected) == (1, 0)
        nursery.cancel_scope.cancel()


async def test_a_message_is_not_forwarded_to_a_peer_that_sent_a_copy_meanwhile() -> None:
    """A peer whose copy arrived (and was dropped) while the first copy was being
    validated holds the message: it is left out when the message is forwarded; a
    peer that sent none still gets it."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

    async with gossip_net(3) as (hs, pss), trio.open_nursery() as nursery:
        a, _, c = hs
        relay, far = pss[1].topic("fwd"), pss[2].topic("fwd")
        release = trio.Event()

        async def validator(forwarder: ID, origin: ID, data: bytes) -> bool:
            if data == b"m1":
                await release.wait()
            return True

        relay.set_async_validator(validator)
        seen_far: list[bytes] = []
        far.set_validator(lambda forwarder, data: seen_far.append(data) is None)
        for t in (relay, far, pss[0].topic("fwd")):
            nursery.start_soon(collect, await t.subscribe(), [])
        await wait_until(lambda: c.peer_id in relay.mesh_peers())
        signer: Any = pss[0].pubsub

        def signed(seqno: int, data: bytes) -> rpc_pb2.Message:
            msg = rpc_pb2.Message(data=data, topicIDs=["fwd"], from_id=a.peer_id.to_bytes(),
                                  seqno=seqno.to_bytes(8, "big"))
            msg.signature = signer.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode()
                                                 + msg.SerializeToString())
            msg.key = a.libp2p.get_public_key().serialize()
            return msg

        upstream: Any = pss[1].pubsub
        m1, m2 = signed(1 << 40, b"m1"), signed((1 << 40) + 1, b"m2")
        done = trio.Event()

        async def first_copy() -> None:
            await upstream.push_msg(a.peer_id, m1)
            done.set()

        nursery.start_soon(first_copy)
        await wait_until(lambda: len(relay._validating) == 1)
        await upstream.push_msg(c.peer_id, m1)  # c's copy, while a's is validated
        assert relay.concurrent_copies == 1
        release.set()
        await done.wait()
        assert pss[1].copies_held_back == 1
        await upstream.push_msg(a.peer_id, m2)  # one copy only: forwarded to c
        await wait_until(lambda: b"m2" in seen_far)
        assert b"m1" not in seen_far
        nursery.cancel_scope.cancel()


async def test_an_ihave_for_a_message_in_hand_asks_no_iwant() -> None:
    """Heartbeat gossip naming a message whose copy is being validated: that id is
    not asked for again (its copy would only be dropped); the others still are."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

    async with gossip_net(2) as (hs, pss), trio.open_nursery() as nursery:
        a = hs[0]
        topic = pss[1].topic("ihave")
        release = trio.Event()

        async def validator(forwarder: ID, origin: ID, data: bytes) -> bool:
            await release.wait()
            return True

        topic.set_async_validator(validator)
        nursery.start_soon(collect, await topic.subscribe(), [])
        signer: Any = pss[0].pubsub
        msg = rpc_pb2.Message(data=b"held", topicIDs=["ihave"], from_id=a.peer_id.to_bytes(),
                              seqno=(7).to_bytes(8, "big"))
        msg.signature = signer.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode()
                                             + msg.SerializeToString())
        msg.key = a.libp2p.get_public_key().serialize()
        upstream: Any = pss[1].pubsub
        router: Any = pss[1].router
        asked: list[list[bytes]] = []
        emit_iwant = router.emit_iwant

        async def record(msg_ids: list[bytes], to_peer: ID) -> None:
            asked.append(list(msg_ids))
            await emit_iwant(msg_ids, to_peer)

        router.emit_iwant = record
        nursery.start_soon(upstream.push_msg, a.peer_id, msg)
        await wait_until(lambda: len(topic._validating) == 1)
        held, other = upstream.get_message_id(msg), a.peer_id.to_bytes() + bytes(8)
        await router.handle_ihave(rpc_pb2.ControlIHave(topicID="ihave",
                                                       messageIDs=[held, other]), a.peer_id)
        assert asked == [[other]] and pss[1].iwant_spared == 1
        release.set()
        nursery.cancel_scope.cancel()


async def test_an_id_asked_of_one_peer_is_not_asked_of_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream asks IWANT of every peer that announces a message not yet seen; an id
    asked within `IWANT_FOLLOWUP_S` is left out of later IHAVEs, and asked again
    once that time has passed without the message."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2

    from node.p2p import _compat_gossipsub

    async with gossip_net(2) as (hs, pss):
        a = hs[0]
        router: Any = pss[1].router
        asked: list[list[bytes]] = []
        emit_iwant = router.emit_iwant

        async def record(msg_ids: list[bytes], to_peer: ID) -> None:
            asked.append(list(msg_ids))
            await emit_iwant(msg_ids, to_peer)

        router.emit_iwant = record
        wanted, other = a.peer_id.to_bytes() + bytes(8), a.peer_id.to_bytes() + bytes(7) + b"\x01"
        ihave = rpc_pb2.ControlIHave(topicID="t", messageIDs=[wanted])
        await router.handle_ihave(ihave, a.peer_id)
        await router.handle_ihave(rpc_pb2.ControlIHave(topicID="t", messageIDs=[wanted, other]),
                                  a.peer_id)
        assert asked == [[wanted], [other]] and pss[1].iwant_spared == 1
        # Read at each IHAVE: as if the follow-up time had passed without the message.
        monkeypatch.setattr(_compat_gossipsub, "IWANT_FOLLOWUP_S", 0.0)
        await router.handle_ihave(ihave, a.peer_id)
        assert asked[-1] == [wanted]


async def test_a_copy_of_a_seen_message_gets_no_task() -> None:
    """The stream reader asks whether we want a message before giving it a task: a
    message already seen is refused there (upstream's push_msg would only drop it)."""
    from libp2p.pubsub.pb import rpc_pb2

    async with open_host(seed(47)) as h, make_pubsub(h) as ps:
        sub = await ps.topic("seen").subscribe()
        upstream: Any = ps.pubsub
        origin = peer_id_from_pubkey(bytes(seed(48))).to_bytes()
        msg = rpc_pb2.Message(from_id=origin, seqno=(1).to_bytes(8, "big"), data=b"x",
                              topicIDs=["seen"])
        elsewhere = rpc_pb2.Message(from_id=origin, seqno=(2).to_bytes(8, "big"), data=b"y",
                                    topicIDs=["other"])
        assert upstream._is_subscribed_to_msg(msg) is True
        assert upstream._is_subscribed_to_msg(elsewhere) is False
        upstream._mark_msg_seen(msg)
        assert upstream._is_subscribed_to_msg(msg) is False
        assert ps.seen_copies == 1
        await sub.aclose()


async def test_score_gates_answer_without_scores_only_at_open_thresholds() -> None:
    """With every threshold at -inf the gates' answers do not depend on a score:
    allowed for any topic list but an empty one, never graylisted. A router whose
    thresholds are set keeps upstream's gates."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.score import ScoreParams

    from node.p2p import _compat, _compat_gossipsub

    async with open_host(seed(49)) as h, make_pubsub(h) as ps:
        scorer: Any = ps.router.scorer
        gate = scorer.allow_publish
        assert _compat.is_ours(gate) and _compat.is_ours(scorer.is_graylisted)
        peer = peer_id_from_pubkey(bytes(seed(50)))
        assert scorer.allow_publish(peer, ["t"]) and scorer.allow_gossip(peer, ["t", "u"])
        assert not scorer.allow_publish(peer, []) and not scorer.is_graylisted(peer, ["t"])
        _compat_gossipsub.open_score_gates(ps.router)
        assert scorer.allow_publish is gate
    strict = GossipSub(protocols=[PROTOCOL_ID_V11], degree=3, degree_low=2, degree_high=4,
                       score_params=ScoreParams(publish_threshold=0.0))
    _compat_gossipsub.open_score_gates(strict)  # type: ignore[arg-type]
    assert not _compat.is_ours(strict.scorer.allow_publish)  # type: ignore[union-attr]


async def test_queue_drained_wakes_on_the_pop_that_goes_below_the_mark() -> None:
    """Publish backpressure waits on this instead of polling the queues every 2 ms."""
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.rpc_queue import RpcQueue

    from node.p2p import _compat

    _compat.install()
    q, other = RpcQueue(), RpcQueue()
    for _ in range(3):
        q.push(rpc_pb2.RPC())
    with _compat.queue_drained([q, other], 2) as drained:
        await q.pop()  # 2 left: not below the mark yet
        assert not drained.is_set()
        await q.pop()
        assert drained.is_set()
    with _compat.queue_drained([q], 1) as never:
        pass  # left without a pop: the waiter goes with the block
    assert not never.is_set()
    assert not q.__dict__.get("_bidmesh_drain_waiters")
    assert not other.__dict__.get("_bidmesh_drain_waiters")
