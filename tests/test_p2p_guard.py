"""node/p2p/guard.py on real py-libp2p hosts over loopback: the host boundary.

No handler (ours or py-libp2p's) ends the host, the peerstore keeps our own
entry, and the resource manager's limits hold on real connections and streams.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import multiaddr
import pytest
import trio
from conftest import wait_until
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore

from node.errors import InvalidMessage, OperationError, RemoteError
from node.p2p import (
    P2PHost,
    make_pubsub,
    open_host,
    read_frame,
    request,
    serve_requests,
    set_stream_handler,
)
from node.resources import Limits

ECHO = "/bidmesh-test/echo/1"


async def echo(pubkey: bytes, payload: bytes) -> bytes:
    return payload




def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return bytes(out + bytes([low]))
        out.append(low | 0x80)


# Malformed inputs for any protocol: varint-framed junk (protobuf decode errors in
# identify/push and meshsub), a truncated frame, a huge varint, raw junk.
JUNK = [
    varint(10) + b"\xff" * 10,
    varint(4) + b"\x22\x02\x0a\xff",
    varint(2) + b"\x1a\x01",
    b"\x80" * 10 + b"\x01",
    b"\xff\xff\xff\xff" + b"x" * 8,
    b"\x00\x00\x00\x05ab",
]


@asynccontextmanager
async def many(n: int, **kwargs: object) -> AsyncIterator[list[P2PHost]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_host(os.urandom(32), **kwargs))  # type: ignore[arg-type]
               for _ in range(n)]


async def poke(attacker: P2PHost, victim: P2PHost, protocol: str, junk: bytes) -> None:
    """Open `protocol`, send junk, read until the victim ends the stream (bounded)."""
    try:
        # A handler that fails at once resets the stream before the opener has
        # read the negotiation's answer: then opening it fails.
        stream = await attacker.new_stream(victim.peer_id, protocol, timeout=5)
    except OperationError:
        return
    try:
        await stream.write(junk)
        with trio.move_on_after(0.5):
            while await stream.read(65536):
                pass
    except Exception:
        pass
    finally:
        await stream.reset()


async def test_malformed_input_on_every_registered_protocol_leaves_the_host_serving() -> None:
    async with many(3) as (victim, attacker, honest), make_pubsub(victim):
        serve_requests(victim, ECHO, echo, max_request=1024)

        async def raises_bug(stream: object) -> None:
            raise RuntimeError("a handler bug")

        async def raises_peer_error(stream: object) -> None:
            raise InvalidMessage("bad", "bad_thing")

        # Raw upstream-style handlers (not wrapped by set_stream_handler): what
        # py-libp2p's own protocols look like to the host.
        victim.libp2p.set_stream_handler(TProtocol("/t/bug/1"), raises_bug)  # type: ignore[arg-type]
        victim.libp2p.set_stream_handler(TProtocol("/t/peer/1"), raises_peer_error)  # type: ignore[arg-type]
        await attacker.connect(victim.addrs[0])
        protocols = [str(p) for p in victim.libp2p.get_mux().handlers if p]
        # Upstream's own protocols are among those enumerated at run time.
        assert {"/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0",
                "/meshsub/1.1.0"} <= set(protocols)
        for protocol in protocols:
            for junk in JUNK:
                await poke(attacker, victim, protocol, junk)
        # Malformed multistream-select negotiation on raw yamux streams.
        conn = attacker._swarm.connections[victim.peer_id][0]
        for junk in [b"\xff" * 20, varint(5) + b"/x\n\n\n", varint(1 << 20) + b"a"]:
            raw = await conn.muxed_conn.open_stream()
            await raw.write(junk)
            with trio.move_on_after(0.5):
                with suppress(Exception):
                    await raw.read(1024)
            await raw.reset()
        faults = victim.guard.faults
        assert faults["malformed"] >= 1  # e.g. protobuf DecodeError out of meshsub
        assert faults["handler_error"] >= len(JUNK)  # RuntimeError: logged, counted
        assert faults["bad_thing"] >= len(JUNK)
        # The victim lives and serves: the attacker and an honest newcomer alike.
        await honest.connect(victim.addrs[0])
        with trio.fail_after(10):
            assert await request(honest, victim.peer_id, ECHO, b"hi", 64, 5) == b"hi"
            assert await request(attacker, victim.peer_id, ECHO, b"hi", 64, 5) == b"hi"
        assert victim.resources.status()["streams"] <= 2  # every lease released


def test_upstream_peerstore_evicts_its_own_key_first() -> None:
    """The upstream behaviour worked around (peer/peerstore.py:201); if this starts
    failing, upstream fixed it and docs/libp2p-notes.md should say so."""
    store = PeerStore()
    own = create_new_key_pair()
    own_id = ID.from_pubkey(own.public_key)
    store.add_key_pair(own_id, own)
    addr = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1")
    for _ in range(store.max_peers):
        store.add_addrs(ID.from_pubkey(create_new_key_pair().public_key), [addr], 3600)
    assert own_id not in store.peer_data_map


async def fill_peerstore(host: P2PHost, n: int) -> None:
    addr = multiaddr.Multiaddr("/ip4/192.0.2.1/tcp/4001")
    store = host.libp2p.get_peerstore()
    for _ in range(n):
        store.add_addrs(ID.from_pubkey(create_new_key_pair().public_key), [addr], 3600)
        await trio.lowlevel.checkpoint()


async def test_peerstore_past_upstream_cap_keeps_our_entry_and_identify() -> None:
    async with many(2, peerstore_max=64) as (victim, honest):
        await fill_peerstore(victim, 1500)  # upstream would have evicted us at 1,001
        store = victim.libp2p.get_peerstore()
        assert victim.peer_id in store.peer_data_map
        victim.libp2p.get_private_key()  # what identify signs with
        await honest.connect(victim.addrs[0])
        # Identify from the honest side works (it learns the victim's protocols)
        # and our pruning brought the store back under its bound.
        hstore = honest.libp2p.get_peerstore()
        await wait_until(lambda: "/ipfs/ping/1.0.0" in _protocols(hstore, victim.peer_id))
        await wait_until(lambda: len(store.peer_data_map) <= 64)
        assert victim.peer_id in store.peer_data_map
        assert honest.peer_id in store.peer_data_map  # connected peers are kept


def _protocols(store: PeerStore, peer: ID) -> list[str]:
    try:
        return store.get_protocols(peer)
    except KeyError:
        return []


@pytest.mark.slow
@pytest.mark.xdist_group("procs")
async def test_many_identities_in_sequence_leave_the_peerstore_bounded() -> None:
    """Identities connecting one after another (the cap made small to keep it fast)."""
    async with open_host(os.urandom(32), peerstore_max=16) as victim:
        store = victim.libp2p.get_peerstore()
        for _ in range(40):
            async with open_host(os.urandom(32)) as visitor:
                await visitor.connect(victim.addrs[0])
                # The victim's identify of the visitor is what adds its entry.
                await wait_until(lambda: visitor.peer_id in store.peer_data_map)
                with trio.fail_after(10):
                    await visitor.disconnect(victim.peer_id)
        await wait_until(lambda: len(store.peer_data_map) <= 16)
        assert victim.guard.peerstore_pruned >= 24
        async with open_host(os.urandom(32)) as honest:
            await honest.connect(victim.addrs[0])
            hstore = honest.libp2p.get_peerstore()
            await wait_until(lambda: "/ipfs/id/1.0.0" in _protocols(hstore, victim.peer_id))
        assert victim.peer_id in store.peer_data_map


# --------------------------------------------------------------------------- limits


async def connect_maybe(dialer: P2PHost, target: P2PHost) -> None:
    """Dial; a refused connection is closed by the target right after it registers
    (the dial may or may not notice before returning)."""
    with suppress(OperationError):
        await dialer.connect(target.addrs[0])


async def test_inbound_flood_leaves_room_for_bootstrap_and_our_dials() -> None:
    async with many(2) as (boot, outside):
        limits = Limits(max_connections=8, outbound_reserved=2, trusted_reserved=2,
                        conns_per_ip=3, ip_exempt=())
        async with open_host(os.urandom(32), limits=limits,
                             bootstrap=[boot.addrs[0]]) as victim, many(6) as strangers:
            for s in strangers:
                await connect_maybe(s, victim)
            # All from 127.0.0.1: the per-IP limit holds first (3).
            await wait_until(lambda: victim.resources.refused["conns_per_ip"] == 3)
            await wait_until(lambda: len(victim.connected_peers()) == 3)
            # The bootstrap peer still gets in (reserved, not counted per IP) ...
            await boot.connect(victim.addrs[0])
            await wait_until(lambda: boot.peer_id in victim.connected_peers())
            # ... and our own dials are never starved by inbound ones.
            await victim.connect(outside.addrs[0])
            assert victim.is_connected(outside.peer_id)
            st = victim.guard.status()
            assert st["connections"]["outbound"] == 1


async def test_stranger_slots_cap_inbound_even_across_addresses() -> None:
    limits = Limits(max_connections=6, outbound_reserved=2, trusted_reserved=2)
    async with open_host(os.urandom(32), limits=limits) as victim, many(4) as peers:
        for p in peers:
            await connect_maybe(p, victim)
        await wait_until(lambda: victim.resources.refused["conns_inbound_strangers"] == 2)
        await wait_until(lambda: set(victim.connected_peers()) == {peers[0].peer_id,
                                                                   peers[1].peer_id})


async def test_one_peers_idle_streams_do_not_starve_another() -> None:
    limits = Limits(streams_per_protocol=12, streams_per_peer_protocol=3,
                    trusted_reserved_streams=2)
    release = trio.Event()

    async def slow(pubkey: bytes, payload: bytes) -> bytes:
        await release.wait()
        return payload

    async with open_host(os.urandom(32), limits=limits) as victim, many(2) as (hog, other):
        serve_requests(victim, ECHO, slow, max_request=1024, timeout=30)
        await hog.connect(victim.addrs[0])
        await other.connect(victim.addrs[0])
        outcomes: list[str] = []

        async def hog_request() -> None:
            try:
                await request(hog, victim.peer_id, ECHO, b"x", 64, 20)
                outcomes.append("ok")
            except (RemoteError, OperationError):
                # Reset after negotiation (RemoteError) or, on a loaded machine, while
                # the stream is still negotiating (OperationError from new_stream).
                outcomes.append("reset")

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(hog_request)
            await wait_until(lambda: outcomes.count("reset") == 7)
            assert victim.resources.status()["streams_per_protocol"][ECHO] == 3
            # The other peer is served while the hog holds its share.
            async with trio.open_nursery() as inner:
                inner.start_soon(request, other, victim.peer_id, ECHO, b"y", 64, 20)
                await wait_until(
                    lambda: victim.resources.status()["streams_per_protocol"][ECHO] == 4)
                release.set()
        assert outcomes.count("ok") == 3
        assert victim.guard.faults["limit_streams_per_peer_protocol"] == 7


async def test_idle_holders_are_closed() -> None:
    limits = Limits(conn_idle_s=1.5, stream_idle_s=1.0, idle_pressure=0.0)
    got: list[bytes] = []

    async def hold(stream: object) -> None:
        got.append(await read_frame(stream, 1024, 60))  # type: ignore[arg-type]

    async with open_host(os.urandom(32), limits=limits) as victim, many(1) as (holder,):
        set_stream_handler(victim, "/t/hold/1", hold)
        await holder.connect(victim.addrs[0])
        stream = await holder.new_stream(victim.peer_id, "/t/hold/1")
        await wait_until(lambda: victim.resources.status()["streams"] == 1)
        # No complete frame: the stream is reset, then the silent connection closed.
        await wait_until(lambda: victim.resources.status()["streams"] == 0, 5)
        await wait_until(lambda: not victim.connected_peers(), 5)
        assert victim.resources.status()["closed_idle"] >= 2
        assert not got
        await stream.reset()


async def test_junk_below_the_streams_leaves_the_host_serving() -> None:
    """Raw TCP junk before and inside the noise handshake, and malformed yamux frames
    inside a real noise session (py-libp2p handles these itself: pinned here)."""
    async with many(1) as (victim,):
        serve_requests(victim, ECHO, echo, max_request=1024)
        port = int(victim.addrs[0].split("/tcp/")[1].split("/")[0])
        noise = b"\x13/multistream/1.0.0\n\x07/noise\n"
        for junk in [b"\xff" * 100, noise[:20] + b"\xff" * 50,
                     noise + b"\xff\xff" + b"a" * 70000, noise + b"\x00\x20" + os.urandom(32)]:
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.move_on_after(1), suppress(trio.BrokenResourceError):
                await sock.send_all(junk)
                while await sock.receive_some(65536):
                    pass
            await sock.aclose()
        for frame in [b"\x00" * 12, b"\x05\x09\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff",
                      b"\x00\x00\x00\x02\x00\x00\x00\x03\x7f\xff\xff\xff" + b"x" * 100,
                      b"\x00\x01\x00\x01\x00\x00\x00\x09\xff\xff\xff\xff",
                      b"\x00\x03\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff"]:
            async with many(1) as (attacker,):
                await attacker.connect(victim.addrs[0])
                conn = attacker._swarm.connections[victim.peer_id][0]
                with suppress(Exception):  # the victim may already have closed it
                    await conn.muxed_conn.secured_conn.write(frame)
                # Give the victim a bounded chance to react (most frames close the
                # connection); the assertion is below.
                with trio.move_on_after(1):
                    await wait_until(lambda: not victim.connected_peers())
        async with many(1) as (honest,):
            await honest.connect(victim.addrs[0])
            with trio.fail_after(10):
                assert await request(honest, victim.peer_id, ECHO, b"hi", 64, 5) == b"hi"


async def test_a_missed_disconnect_notification_does_not_leak_a_slot() -> None:
    async with many(2) as (victim, peer):
        await peer.connect(victim.addrs[0])
        await wait_until(lambda: victim.resources.status()["connections"]["inbound"] == 1)
        # As if upstream never called `disconnected` for this connection.
        victim.guard.on_disconnected = lambda conn: None  # type: ignore[method-assign]
        await peer.disconnect(victim.peer_id)
        await wait_until(lambda: not victim._swarm.connections.get(peer.peer_id))
        await wait_until(lambda: victim.resources.status()["connections"]["inbound"] == 0, 5)
        assert victim.guard.status()["leases_reconciled"] == 1


async def test_inbound_handshakes_run_a_few_at_a_time(autojump_clock: trio.abc.Clock) -> None:
    from node.p2p._compat import limit_inbound_handshakes

    class Swarm:  # the one method limit_inbound_handshakes wraps
        running = peak = 0

        async def upgrade_inbound_raw_conn(self, raw_conn: object, maddr: object) -> object:
            Swarm.running += 1
            Swarm.peak = max(Swarm.peak, Swarm.running)
            await trio.sleep(0.05)
            Swarm.running -= 1
            return raw_conn

    swarm = Swarm()
    limit_inbound_handshakes(swarm, limit=3, queue_s=0.12, settle_s=0)
    done: list[object] = []
    refused: list[str] = []

    async def one(i: int) -> None:
        try:
            done.append(await swarm.upgrade_inbound_raw_conn(i, None))
        except OperationError as e:
            refused.append(str(e))

    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(one, i)
    # At most 3 at once; those that waited past the queue bound are refused.
    assert Swarm.peak == 3 and len(done) == 9 and len(refused) == 3


class _TimedSwarm:
    """The one method limit_inbound_handshakes wraps; records when each upgrade starts."""

    def __init__(self, durations: dict[int, float] | None = None) -> None:
        self.started: dict[int, float] = {}
        self.durations = durations or {}

    async def upgrade_inbound_raw_conn(self, raw_conn: int, maddr: object) -> int:
        self.started[raw_conn] = trio.current_time()
        await trio.sleep(self.durations.get(raw_conn, 0.0))
        return raw_conn


async def test_a_slot_is_held_while_the_new_connection_settles(
        autojump_clock: trio.abc.Clock) -> None:
    """An upgrade's slot stays taken `settle_s` after it (the connection's set-up), so
    instant upgrades start `settle_s` apart: a crowd is admitted at a bounded rate."""
    from node.p2p._compat import limit_inbound_handshakes

    swarm = _TimedSwarm()
    limit_inbound_handshakes(swarm, limit=1, queue_s=10, settle_s=0.1)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(swarm.upgrade_inbound_raw_conn, i, None)
    starts = sorted(t - t0 for t in swarm.started.values())
    assert len(starts) == 5
    assert all(b - a >= 0.1 - 1e-9 for a, b in itertools.pairwise(starts))


async def test_a_stalled_handshake_gives_up_its_slot(autojump_clock: trio.abc.Clock) -> None:
    """A handshake that stalls holds its slot `hold_s` at most: the next one does not
    wait for it (upstream's own upgrade timeout still bounds the stalled one)."""
    from node.p2p._compat import limit_inbound_handshakes

    swarm = _TimedSwarm({0: 8.0})
    limit_inbound_handshakes(swarm, limit=1, queue_s=10, settle_s=0, hold_s=0.5)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(swarm.upgrade_inbound_raw_conn, 0, None)
        await trio.sleep(0.01)
        nursery.start_soon(swarm.upgrade_inbound_raw_conn, 1, None)
    assert swarm.started[1] - t0 < 1.0


async def test_address_limits_refuse_before_the_handshake() -> None:
    """The guard's address limits are asked before any handshake work, counting
    the handshakes from the same IP and subnet under way; a refused connection never
    reaches the upgrade, an admitted one releases its count when the upgrade ends."""
    from node.errors import LimitExceeded
    from node.p2p._compat import limit_inbound_handshakes

    limits = Limits(max_connections=64, outbound_reserved=8, trusted_reserved=8,
                    conns_per_ip=2, conns_per_subnet=3)
    async with open_host(os.urandom(32), limits=limits) as victim:
        guard = victim.guard
        ends = [guard.admit_handshake("10.1.2.3"), guard.admit_handshake("10.1.2.3")]
        with pytest.raises(LimitExceeded) as why:
            guard.admit_handshake("10.1.2.3")
        assert why.value.scope == "conns_per_ip"
        ends.append(guard.admit_handshake("10.1.2.4"))  # the subnet's third
        with pytest.raises(LimitExceeded) as why:
            guard.admit_handshake("10.1.2.5")
        assert why.value.scope == "conns_per_subnet"
        for _ in range(20):  # loopback is exempt from address limits
            guard.admit_handshake("127.0.0.1")
        ends.pop(0)()
        guard.admit_handshake("10.1.2.6")  # a slot of the subnet is free again
        assert guard.status()["handshakes_refused"] == 2
        assert victim.resources.status()["refused"]["conns_per_ip"] == 1

    class Conn:
        def __init__(self, ip: str) -> None:
            self.ip = ip

        def get_remote_address(self) -> tuple[str, int]:
            return (self.ip, 4001)

    calls: list[str] = []
    released: list[str] = []

    def admit(ip: str | None) -> Callable[[], None]:
        if ip == "10.9.9.9":
            raise LimitExceeded("conns_per_ip", "full")
        calls.append(str(ip))
        return lambda: released.append(str(ip))

    swarm = _TimedSwarm()
    limit_inbound_handshakes(swarm, admit=admit, settle_s=0)
    with pytest.raises(LimitExceeded):
        await swarm.upgrade_inbound_raw_conn(Conn("10.9.9.9"), None)  # type: ignore[arg-type]
    assert swarm.started == {}
    await swarm.upgrade_inbound_raw_conn(Conn("10.0.0.1"), None)  # type: ignore[arg-type]
    assert calls == released == ["10.0.0.1"]


async def test_a_crowd_connecting_at_once_is_queued_and_admitted() -> None:
    async with open_host(os.urandom(32)) as victim, many(10) as crowd:
        async with trio.open_nursery() as nursery:
            for p in crowd:
                nursery.start_soon(p.connect, victim.addrs[0])
        await wait_until(lambda: len(victim.connected_peers()) == 10)


async def test_timed_requests_record_what_they_waited_for() -> None:
    """With a LoopSteps on the guard (`[node] loop_stats`), every inbound stream of a
    timed protocol records one wait; other protocols record none."""
    from node.loopstats import LoopSteps

    steps = LoopSteps()
    trio.lowlevel.add_instrument(steps)
    try:
        async with open_host(os.urandom(32)) as victim, open_host(os.urandom(32)) as peer:
            serve_requests(victim, ECHO, echo, max_request=1024)
            serve_requests(victim, "/bidmesh-test/untimed/1", echo, max_request=1024)
            victim.guard.loop = steps
            victim.guard.timed_protocols = frozenset({ECHO})
            await peer.connect(victim.addrs[0])
            for proto in (ECHO, ECHO, "/bidmesh-test/untimed/1"):
                assert await request(peer, victim.peer_id, proto, b"x", 1024, 10) == b"x"
            await wait_until(lambda: sum(n for _, _, n in steps.waits()) >= 2)
            assert sum(n for _, _, n in steps.waits()) == 2
    finally:
        trio.lowlevel.remove_instrument(steps)


async def test_a_full_address_is_refused_before_the_handshake() -> None:
    """Real hosts, loopback not exempt: once 127.0.0.1 holds `conns_per_ip`, a third
    stranger from it is refused before any noise handshake work."""
    limits = Limits(max_connections=16, outbound_reserved=2, trusted_reserved=2,
                    conns_per_ip=2, ip_exempt=())
    async with open_host(os.urandom(32), limits=limits) as victim, many(3) as strangers:
        for s in strangers[:2]:
            await s.connect(victim.addrs[0])
        await wait_until(lambda: len(victim.connected_peers()) == 2)
        await connect_maybe(strangers[2], victim)
        await wait_until(lambda: victim.guard.status()["handshakes_refused"] >= 1)
        assert strangers[2].peer_id not in victim.connected_peers()
        assert victim.resources.refused["conns_per_ip"] >= 1
