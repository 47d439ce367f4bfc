"""Tunnels through bandwidth leases on real libp2p hosts and real loopback TCP servers:
bytes both ways with half-close, refusals with the right reason, the shared rate, the
lease's end, usage, and the attacks a stranger can try on the protocol."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import pytest
import trio
from libp2p.abc import INetStream

from node.auction import make_delegation
from node.dataplane.tunnel import TunnelConfig
from node.dataplane.tunnel_client import (
    Tunnel,
    TunnelFailed,
    TunnelRefused,
    TunnelUnauthorized,
    open_tunnel,
)
from node.dataplane.tunnel_wire import DATA, TunnelReply, tunnel_protocol
from node.errors import BidmeshError, PeerError
from node.events import Usage
from node.p2p import (
    FRAME_HEADER,
    P2PHost,
    default_limits,
    read_frame,
    set_stream_handler,
    write_frame,
)
from tests.tunnel_helpers import (
    LOCAL,
    M2,
    NET,
    D,
    M,
    X,
    blob,
    echo_then_send,
    make_lease,
    member,
    provider,
    send_forever,
    tcp_server,
)


async def _open(host: P2PHost, prov_host: P2PHost, lease_id: bytes, dest: str, port: int,
                delegation: bytes | None = None) -> Tunnel:
    with trio.fail_after(20):
        return await open_tunnel(host, prov_host.peer_id, lease_id, dest, port, network=NET,
                                 delegation=delegation)


async def test_bytes_both_ways_byte_exact_with_half_close() -> None:
    lease = make_lease()
    up, down = blob(3 << 20, 1), blob(5 << 20, 2)
    seen: list[bytes] = []

    async def dest(s: trio.SocketStream) -> None:
        seen.append(await echo_then_send(s, down))

    async with provider([lease]) as prov, tcp_server(dest) as port, member(M, prov) as host:
        with trio.fail_after(60):
            t = await open_tunnel(host, prov.host.peer_id, lease.id, "127.0.0.1", port,
                                  network=NET)
            assert t.reply.addr == "127.0.0.1" and t.reply.end_ms == lease.end_ms
            got = bytearray()

            async def send() -> None:
                for i in range(0, len(up), 100_000):  # odd sizes: frames are cut anyway
                    await t.send_all(up[i : i + 100_000])
                await t.send_eof()  # the server answers only after our half-close

            async with trio.open_nursery() as n:
                n.start_soon(send)
                while data := await t.receive_some():
                    got += data
            await t.aclose()
        assert seen == [hashlib.sha256(up).digest()]
        assert bytes(got) == hashlib.sha256(up).digest() + down
        assert t.end is not None and t.end.ok
        assert (t.end.bytes_up, t.end.bytes_down) == (len(up), 32 + len(down))
        st = prov.svc.stats()
        assert st["counters"]["tunnels_ok"] == 1 and st["open_tunnels"] == 0
        use = st["leases"][lease.id.hex()]["members"][M.public.hex()]
        assert (use["bytes_in"], use["bytes_out"]) == (len(up), 32 + len(down))


async def test_delegated_device_and_max_devices() -> None:
    lease = make_lease(max_devices=1, users=())
    token = make_delegation(M, lease.id, D.public, "tablet")

    async def dest(s: trio.SocketStream) -> None:
        await echo_then_send(s, b"hello")

    async with provider([lease]) as prov, tcp_server(dest) as port:
        async with member(D, prov) as host:
            t = await _open(host, prov.host, lease.id, "127.0.0.1", port, delegation=token)
            await t.send_eof()
            assert (await t.receive_some())[32:] == b"hello"
            await t.aclose()
        async with member(X, prov) as host:  # a second delegated device: over max_devices
            other = make_delegation(M, lease.id, X.public, "phone")
            with pytest.raises(TunnelUnauthorized) as e:
                await _open(host, prov.host, lease.id, "127.0.0.1", port, delegation=other)
            assert e.value.reason == "not_member"


async def test_refusals_have_the_right_reason() -> None:
    now_lease = make_lease()
    past = make_lease("past", start_ms=1000, end_ms=2000)
    zstd = make_lease("zstd", service="zstd", chain=("zstd",))

    async def dest(s: trio.SocketStream) -> None:
        await s.aclose()

    async with tcp_server(dest) as port:
        async with provider([now_lease, past, zstd]) as prov:
            async with member(X, prov) as host:
                with pytest.raises(TunnelUnauthorized) as e:
                    await _open(host, prov.host, now_lease.id, "127.0.0.1", port)
                assert e.value.reason == "not_member"
            async with member(M, prov) as host:
                for lid, reason in ((past.id, "outside_window"), (zstd.id, "wrong_service"),
                                    (bytes(32), "no_lease")):
                    with pytest.raises(TunnelUnauthorized) as e:
                        await _open(host, prov.host, lid, "127.0.0.1", port)
                    assert e.value.reason == reason
                # Allowed is 127.0.0.1 only: other loopback, private, link-local and
                # multicast addresses are refused.
                for dst in ("127.0.0.2", "10.1.2.3", "192.168.1.1", "169.254.1.1", "::1",
                            "224.0.0.1", "::ffff:127.0.0.2"):
                    with pytest.raises(TunnelRefused) as e:
                        await _open(host, prov.host, now_lease.id, dst, port)
                    assert e.value.reason == "private_destination", dst
                with pytest.raises(TunnelRefused) as e:  # the default deny list: SMTP
                    await _open(host, prov.host, now_lease.id, "1.2.3.4", 25)
                assert e.value.reason == "egress_denied"
                with pytest.raises(TunnelRefused) as e:
                    await _open(host, prov.host, now_lease.id, "127.0.0.1", 1)
                assert e.value.reason == "connection_refused"
            counters = prov.svc.stats()["counters"]
            assert counters["refused:not_member"] == 1
            assert counters["refused:private_destination"] == 7
        async with provider([now_lease], TunnelConfig()) as prov, member(M, prov) as host:
            for dst in ("127.0.0.1", "localhost"):  # the default policy: no loopback,
                with pytest.raises(TunnelRefused) as e:  # checked after resolution
                    await _open(host, prov.host, now_lease.id, dst, port)
                assert e.value.reason == "private_destination"
        async with provider([now_lease], TunnelConfig(egress=False)) as prov, \
                member(M, prov) as host:
            with pytest.raises(TunnelRefused) as e:
                await _open(host, prov.host, now_lease.id, "127.0.0.1", port)
            assert e.value.reason == "egress_disabled"


async def test_too_many_tunnels_and_a_flood_cost_nothing_lasting() -> None:
    lease = make_lease()
    cfg = TunnelConfig(allow=("127.0.0.1/32",), max_tunnels_per_member=2,
                       max_tunnels_per_lease=3)
    release = trio.Event()

    async def dest(s: trio.SocketStream) -> None:
        await release.wait()
        await s.aclose()

    async with provider([lease], cfg) as prov, tcp_server(dest) as port:
        async with member(M, prov) as h1, member(M2, prov) as h2:
            held = [await _open(h1, prov.host, lease.id, "127.0.0.1", port) for _ in range(2)]
            with pytest.raises(TunnelRefused) as e:
                await _open(h1, prov.host, lease.id, "127.0.0.1", port)
            assert e.value.reason == "too_many_tunnels"
            held.append(await _open(h2, prov.host, lease.id, "127.0.0.1", port))
            refused = 0
            for _ in range(20):  # a flood beyond the lease's cap: refused, counted
                try:
                    held.append(await _open(h2, prov.host, lease.id, "127.0.0.1", port))
                except TunnelRefused as err:
                    assert err.reason == "too_many_tunnels"
                    refused += 1
            assert refused == 20
            assert prov.svc.stats()["open_tunnels"] == 3
            release.set()
            for t in held:
                with trio.fail_after(10):
                    assert await t.receive_some() == b""
                    await t.aclose()
            with trio.fail_after(10):
                while prov.svc.stats()["open_tunnels"]:
                    await trio.sleep(0.01)
            # Slots come back: a new tunnel opens.
            t = await _open(h1, prov.host, lease.id, "127.0.0.1", port)
            await t.aclose()
        assert prov.svc.stats()["counters"]["refused:too_many_tunnels"] == 21


async def test_malformed_oversized_and_slow_opening_frames() -> None:
    lease = make_lease()
    cfg = TunnelConfig(allow=("127.0.0.1/32",), open_timeout_s=0.5)
    async with provider([lease], cfg) as prov, member(M, prov) as host:
        proto = tunnel_protocol(NET)

        async def reply_to(first: bytes | None) -> TunnelReply:
            s = await host.new_stream(prov.host.peer_id, proto)
            if first is not None:
                await s.write(first)
            with trio.fail_after(10):
                r = TunnelReply.decode(await read_frame(s, 4096, 10))
            await s.close()
            return r

        r = await reply_to(FRAME_HEADER.pack(1 << 30))  # announces 1 GiB
        assert (r.ok, r.reason) == (False, "oversized")
        r = await reply_to(FRAME_HEADER.pack(3) + b"\xc1\xc1\xc1")  # not msgpack
        assert (r.ok, r.reason) == (False, "malformed")
        r = await reply_to(FRAME_HEADER.pack(1) + b"\x80")  # an empty map: no version
        assert (r.ok, r.reason) == (False, "bad_version")
        r = await reply_to(None)  # says nothing: cut off after open_timeout_s
        assert (r.ok, r.reason) == (False, "timeout")
        counters = prov.svc.stats()["counters"]
        assert counters["refused:oversized"] == 1 and counters["refused:timeout"] == 1
        assert prov.svc.stats()["opening"] == 0


async def test_bad_frames_after_opening_end_the_tunnel_only() -> None:
    lease = make_lease()
    async with provider([lease]) as prov, member(M, prov) as host:
        async def dest(s: trio.SocketStream) -> None:
            await s.receive_some(10)

        async with tcp_server(dest) as port:
            t = await _open(host, prov.host, lease.id, "127.0.0.1", port)
            await write_frame(t._stream, b"\x07junk")
            with trio.fail_after(10), pytest.raises(TunnelFailed) as e:
                while await t.receive_some():
                    pass
            assert e.value.reason == "bad_frame"
            await t.aclose()
            t = await _open(host, prov.host, lease.id, "127.0.0.1", port)  # still serving
            await t.aclose()


async def test_rebinding_names_are_checked_after_resolution_once() -> None:
    lease = make_lease()
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        calls.append(host)
        # A rebinding name: a private address first, the allowed one second, and
        # something else again should we ever ask twice.
        return ["10.9.9.9", "127.0.0.1"] if len(calls) == 1 else ["192.168.7.7"]

    async def dest(s: trio.SocketStream) -> None:
        await echo_then_send(s, b"ok")

    async with provider([lease], LOCAL, resolve) as prov, tcp_server(dest) as port, \
            member(M, prov) as host:
        t = await _open(host, prov.host, lease.id, "rebind.example", port)
        assert t.reply.addr == "127.0.0.1"
        await t.send_eof()
        assert (await t.receive_some())[32:] == b"ok"
        await t.aclose()
        assert calls == ["rebind.example"]  # resolved once; dialled the checked address
        with pytest.raises(TunnelRefused) as e:  # second answer: only private addresses
            await _open(host, prov.host, lease.id, "rebind.example", port)
        assert e.value.reason == "private_destination"


async def test_two_members_share_the_max_rate_fairly() -> None:
    """Lease max 4 Mbit/s (500 kB/s). Member M with one tunnel and M2 with three download
    at once; over a 3 s window together they stay within ±10 % of the rate and each gets
    half ±10 %. (Issue: 10 s; shorter here to keep the suite fast.)"""
    rate_bytes = 500_000
    lease = make_lease(max_rate_bps=rate_bytes * 8)

    async def dest(s: trio.SocketStream) -> None:
        await send_forever(s, bytes(60_000))

    got = {"M": 0, "M2": 0}
    counting = [False]
    async with provider([lease]) as prov, tcp_server(dest) as port, \
            member(M, prov) as h1, member(M2, prov) as h2:

        async def pull(host: P2PHost, who: str) -> None:
            t = await _open(host, prov.host, lease.id, "127.0.0.1", port)
            try:
                while data := await t.receive_view():
                    if counting[0]:
                        got[who] += len(data)
            finally:
                await t.aclose()

        async with trio.open_nursery() as n:
            n.start_soon(pull, h1, "M")
            for _ in range(3):
                n.start_soon(pull, h2, "M2")
            await trio.sleep(1.0)  # warm-up: the initial burst is spent
            counting[0] = True
            t0 = trio.current_time()
            await trio.sleep(3.0)
            counting[0] = False
            took = trio.current_time() - t0
            n.cancel_scope.cancel()
        total = got["M"] + got["M2"]
        # Never above the max (+10 %: the bucket's depth may refill while the readers
        # are descheduled); below it only when 2 loaded cores cannot keep up, which a
        # test cannot rule out: bench/tunnel.py measures rate_error_pct. The split is
        # what the shared bucket decides whatever the CPU: half each.
        assert total / took <= 1.1 * rate_bytes, (total / took, got)
        assert total / took >= 0.5 * rate_bytes, (total / took, got)
        assert 0.4 <= got["M"] / total <= 0.6, got
        assert prov.svc.stats()["leases"][lease.id.hex()]["rate_limited"] > 0


async def test_lease_end_cuts_tunnels_and_publishes_usage() -> None:
    from node.dataplane.service import wall_clock_ms

    lease = make_lease(end_ms=wall_clock_ms() + 1500, max_rate_bps=800_000)

    async def dest(s: trio.SocketStream) -> None:
        await send_forever(s, bytes(10_000))

    async with provider([lease]) as prov, tcp_server(dest) as port, member(M, prov) as host:
        t = await _open(host, prov.host, lease.id, "127.0.0.1", port)
        got = 0
        with trio.fail_after(10), pytest.raises(TunnelFailed) as e:
            while data := await t.receive_view():
                got += len(data)
        assert e.value.reason == "lease_ended"
        assert wall_clock_ms() - lease.end_ms < 1000  # cut at the end, not a poll later
        await t.aclose()
        with trio.fail_after(10):
            while not prov.published:
                await trio.sleep(0.02)
        (usage,) = prov.published
        assert isinstance(usage, Usage) and usage.lease == lease.id
        (m,) = usage.members
        assert m.member == M.public and m.bytes_in == 0
        # Exact: the frame in flight when the cut came is billed too (it went out whole;
        # the cancellation surfaced after it: CI once saw 4,096 bytes unbilled).
        assert got == m.bytes_out, (got, m.bytes_out)
        assert 500 <= m.active_ms <= 3000 and usage.rate_limited > 0
        with pytest.raises(TunnelUnauthorized) as e2:
            await _open(host, prov.host, lease.id, "127.0.0.1", port)
        assert e2.value.reason == "outside_window"


async def test_upload_cut_at_lease_end_is_billed_exactly() -> None:
    """The destination reads slowly, so the provider is part-way through a socket write
    when the lease ends: bytes_in is exactly what reached the destination."""
    from node.dataplane.service import wall_clock_ms

    lease = make_lease(end_ms=wall_clock_ms() + 1500)
    cut = trio.Event()
    received = [0]
    done = trio.Event()

    async def dest(s: trio.SocketStream) -> None:
        try:
            while data := await s.receive_some(1000 if not cut.is_set() else 1 << 16):
                received[0] += len(data)
                if not cut.is_set():
                    await trio.sleep(0.005)
        except trio.BrokenResourceError:
            pass
        done.set()
        await s.aclose()

    async with provider([lease]) as prov, tcp_server(dest) as port, member(M, prov) as host:
        t = await _open(host, prov.host, lease.id, "127.0.0.1", port)
        chunk = bytes(65_000)

        async def upload() -> None:
            with contextlib.suppress(TunnelFailed, trio.ClosedResourceError):
                while True:
                    await t.send_all(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            with trio.fail_after(10), pytest.raises(TunnelFailed) as e:
                while await t.receive_view() is not None:
                    pass
            assert e.value.reason == "lease_ended"
            nursery.cancel_scope.cancel()
        cut.set()
        await t.aclose()
        with trio.fail_after(20):
            await done.wait()
            while not prov.published:
                await trio.sleep(0.02)
        (usage,) = prov.published
        (m,) = usage.members
        assert received[0] > 0 and m.bytes_in == received[0], (m.bytes_in, received[0])


async def test_provider_gone_mid_download_fails_at_once() -> None:
    lease = make_lease()

    async def dest(s: trio.SocketStream) -> None:
        await send_forever(s, bytes(60_000))

    async with provider([lease]) as prov, tcp_server(dest) as port, member(M, prov) as host:
        t = await _open(host, prov.host, lease.id, "127.0.0.1", port)
        assert await t.receive_view()
        # The provider's side of the connection goes away (the process-level test
        # kills a provider daemon): the member hears of it at once.
        await prov.host.disconnect(host.peer_id)
        with trio.fail_after(5), pytest.raises(TunnelFailed) as e:
            while await t.receive_view():
                pass
        assert e.value.reason == "broken"
        await t.aclose()
        # The connection is gone; the provider cleaned up its side.
        with trio.fail_after(10):
            while prov.svc.stats()["open_tunnels"]:
                await trio.sleep(0.02)


async def test_tunnels_have_their_own_stream_limits_and_no_idle_expiry() -> None:
    """The host's generic stream caps (8 per peer per protocol) and idle expiry (no
    inbound frame for stream_idle_s) would cut a member's downloads: tunnels are
    bounded by the tunnel caps instead."""
    lease = make_lease()
    release = trio.Event()
    payload = blob(200_000, 7)

    async def dest(s: trio.SocketStream) -> None:
        await release.wait()
        await s.send_all(payload)
        await s.aclose()

    limits = default_limits(64)
    limits = dataclasses.replace(limits, stream_idle_s=1.0)
    idle_proto = "/tuntest/idle-probe/1"
    async with provider([lease], limits=limits) as prov, tcp_server(dest) as port, \
            member(M, prov) as host:
        async def hold(stream: INetStream) -> None:
            await read_frame(stream, 16, 60)

        set_stream_handler(prov.host, idle_proto, hold)
        assert limits.streams_per_peer_protocol < 12
        tunnels = [await _open(host, prov.host, lease.id, "127.0.0.1", port)
                   for _ in range(12)]
        # A silent stream of another protocol opened after the tunnels is reset as idle:
        # the janitor has run past the tunnels' idle time too.
        probe = await host.new_stream(prov.host.peer_id, idle_proto)
        with trio.fail_after(30), pytest.raises(BidmeshError):
            await read_frame(probe, 16, 60)
        release.set()
        for t in tunnels:
            got = bytearray()
            with trio.fail_after(30):
                while data := await t.receive_some():
                    got += data
            assert bytes(got) == payload
            await t.aclose()
        assert prov.host.resources.status()["protocol_limits"][tunnel_protocol(NET)] == {
            "per_peer": 64, "total": 512}


def test_reply_with_a_wrong_version_is_refused() -> None:
    with pytest.raises(PeerError):
        TunnelReply.decode(b"\x81\xa1v\x02")
    assert DATA == b"\x00"
