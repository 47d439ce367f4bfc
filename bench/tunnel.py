"""Tunnels of bandwidth leases on loopback, side by side in one run:

  (a) raw py-libp2p stream, one way: the provider process writes frames to the member
      (node.p2p's write_frame/read_frame, 64 KiB frames, as the tunnel's DATA frames;
      the member hashes what arrives, as it does in (b));
  (b) bulk download through a tunnel: destination --TCP--> provider --libp2p--> member;
  (c) direct TCP from the destination to the member.

    .venv/bin/python bench/tunnel.py [--quick] [--mb N]

Every role is its own process, as in reality: the destination (a plain TCP server),
the provider (TunnelService on a libp2p host) and the member (this process). The
provider handles each byte once (one socket read, one frame write), like the raw
sender, so `tunnel_vs_raw_ratio` targets >= 0.8. Also: `connect_p50_ms` (a new tunnel
over the existing connection, target <= 5), `rate_error_pct` (achieved vs max rate of
a limited lease over a few seconds after its initial burst, target <= 5),
`rss_mb_100_tunnels` (provider RSS with 100 tunnels open, target < 200), and
`output_exact` (every tunnelled byte checked against what the destination sent).
Last line: JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

NET = "bench"
RAW_PROTO = "/bidmesh-bench/tunnel-raw/1"
BLOCK = hashlib.sha256(b"bench-tunnel").digest() * (1 << 15)  # 1 MiB pattern
LIMITED_BPS = 16_000_000  # the limited lease: 2 MB/s, well below what the CPU can move
_N = struct.Struct(">Q")


def ident(name: str) -> Any:
    from node.keys import Identity

    return Identity.from_seed(hashlib.sha256(b"bench-tunnel:" + name.encode()).digest())


def lease_id(name: str) -> bytes:
    return hashlib.sha256(b"bench-tunnel-lease:" + name.encode()).digest()


def expected_digest(n: int) -> bytes:
    h = hashlib.sha256()
    full, rest = divmod(n, len(BLOCK))
    for _ in range(full):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.digest()


# ------------------------------------------------------------------ destination


def dest_main() -> None:
    """A TCP server: read 8 bytes N, send N bytes of the pattern, close after the
    client's EOF. Prints its port."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=512)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)

    def send(conn: socket.socket) -> None:
        head = b""
        while len(head) < 8:
            chunk = conn.recv(8 - len(head))
            if not chunk:
                return
            head += chunk
        (n,) = _N.unpack(head)
        view = memoryview(BLOCK)
        while n > 0:
            k = min(n, len(BLOCK))
            conn.sendall(view[:k])
            n -= k
        conn.recv(1)  # the client's EOF (or a stray byte): then close

    def serve(conn: socket.socket) -> None:
        try:
            send(conn)
        except OSError:
            pass  # the client went away (the rate test stops reading and resets)
        finally:
            conn.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# ------------------------------------------------------------------ provider


def provider_main() -> None:
    from node.auction import Lease
    from node.dataplane.service import wall_clock_ms
    from node.dataplane.tunnel import TunnelConfig, TunnelService
    from node.p2p import open_host, set_stream_handler, write_frame

    prov, member = ident("provider"), ident("member")
    now = wall_clock_ms()

    def lease(name: str, max_rate: int | None) -> Lease:
        return Lease(id=lease_id(name), request=bytes(32), bid=bytes(32), provider=prov.public,
                     recipient=member.public, service="bandwidth", chain=(),
                     start_ms=now - 60_000, end_ms=now + 3_600_000, max_rate_bps=max_rate,
                     min_rate_bps=None, price=1, currency="EUR", devices=(), phones=(),
                     users=(), max_devices=None, group_members=(), payers=(), sponsorships=())

    leases = {lid.id: lid for lid in (lease("free", None), lease("limited", LIMITED_BPS))}
    cfg = TunnelConfig(allow=("127.0.0.1/32",), max_tunnels_per_member=128,
                       max_tunnels_per_lease=128, max_streams_per_peer=256)

    async def raw(stream: Any) -> None:
        from node.p2p import read_frame

        (n,) = _N.unpack(await read_frame(stream, 8, 30))
        view = memoryview(BLOCK)
        piece = 65502  # a tunnel DATA frame's payload
        sent = 0
        while sent < n:
            k = min(piece, n - sent)
            off = sent % len(BLOCK)
            k = min(k, len(BLOCK) - off)
            await write_frame(stream, view[off:off + k], 30, b"\x00")
            sent += k
        await stream.close()

    async def main() -> None:
        async with open_host(prov.seed) as host:
            svc = TunnelService(host, NET, leases.get, lambda body: None, wall_clock_ms, cfg)
            set_stream_handler(host, RAW_PROTO, raw)
            print(json.dumps({"addr": host.addrs[0], "peer": str(host.peer_id),
                              "pid": os.getpid()}), flush=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(svc.run)
                # Until the parent closes our stdin.
                await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
                nursery.cancel_scope.cancel()

    trio.run(main)


# ------------------------------------------------------------------ member (this process)


def _child(role: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    p = subprocess.Popen([sys.executable, __file__, "--role", role], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, cwd=ROOT)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise SystemExit(f"the {role} process did not start")
    return p, json.loads(line)


async def raw_mb_s(host: Any, peer: Any, n: int) -> tuple[float, bool]:
    """(MB/s, output exact): hashed as it arrives, like the tunnel's output."""
    from node.p2p import read_frame, write_frame

    s = await host.new_stream(peer, RAW_PROTO)
    t0 = time.perf_counter()
    await write_frame(s, _N.pack(n), 30)
    h = hashlib.sha256()
    got = 0
    while got < n:
        frame = await read_frame(s, 1 << 20, 30)
        h.update(memoryview(frame)[1:])
        got += len(frame) - 1
    secs = time.perf_counter() - t0
    await s.close()
    return n / secs / 1e6, h.digest() == expected_digest(n)


async def tunnel_mb_s(host: Any, peer: Any, lid: bytes, port: int, n: int,
                      ) -> tuple[float, bool]:
    from node.dataplane.tunnel_client import open_tunnel

    t = await open_tunnel(host, peer, lid, "127.0.0.1", port, network=NET)
    t0 = time.perf_counter()
    await t.send_all(_N.pack(n))
    await t.send_eof()
    h = hashlib.sha256()
    got = 0
    while (view := await t.receive_view()) is not None:
        h.update(view)
        got += len(view)
    secs = time.perf_counter() - t0
    await t.aclose()
    return got / secs / 1e6, got == n and h.digest() == expected_digest(n)


async def tcp_mb_s(port: int, n: int) -> float:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    t0 = time.perf_counter()
    await s.send_all(_N.pack(n))
    await s.send_eof()
    got = 0
    while data := await s.receive_some(1 << 18):
        got += len(data)
    secs = time.perf_counter() - t0
    await s.aclose()
    return got / secs / 1e6


async def connect_ms(host: Any, peer: Any, port: int, count: int) -> list[float]:
    from node.dataplane.tunnel_client import open_tunnel

    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        t = await open_tunnel(host, peer, lease_id("free"), "127.0.0.1", port, network=NET)
        out.append((time.perf_counter() - t0) * 1000)
        await t.send_all(_N.pack(0))
        await t.send_eof()
        while await t.receive_view() is not None:
            pass
        await t.aclose()
    return out


async def rate_error(host: Any, peer: Any, port: int, seconds: float) -> float:
    """Download through the limited lease; measure after the initial burst."""
    from node.dataplane.tunnel_client import open_tunnel

    t = await open_tunnel(host, peer, lease_id("limited"), "127.0.0.1", port, network=NET)
    await t.send_all(_N.pack(1 << 40))
    got, t0, counting = 0, time.perf_counter(), False
    start = 0.0
    while True:
        view = await t.receive_view()
        assert view is not None
        now = time.perf_counter()
        if not counting and now - t0 >= 1.0:  # the 250 ms burst is spent by then
            counting, start, got = True, now, 0
            continue
        got += len(view)
        if counting and now - start >= seconds:
            break
    achieved = got / (time.perf_counter() - start)
    await t.aclose()
    want = LIMITED_BPS / 8
    return abs(achieved - want) / want * 100


async def rss_with_tunnels(host: Any, peer: Any, port: int, pid: int, count: int,
                           ) -> tuple[float, int]:
    import psutil

    from node.dataplane.tunnel_client import open_tunnel

    held = []
    try:
        for _ in range(count):
            t = await open_tunnel(host, peer, lease_id("free"), "127.0.0.1", port, network=NET)
            await t.send_all(_N.pack(1 << 16))  # 64 KiB waiting in each
            held.append(t)
        await trio.sleep(0.5)
        rss = psutil.Process(pid).memory_info().rss / 2**20
    finally:
        for t in held:
            await t.aclose()
    return rss, len(held)


async def member_main(args: argparse.Namespace, prov: dict[str, Any], dest_port: int,
                      ) -> dict[str, Any]:
    from node.p2p import open_host, parse_peer_id

    n = args.mb << 20
    async with open_host(ident("member").seed) as host:
        peer = parse_peer_id(prov["peer"])
        await host.connect(prov["addr"])
        await raw_mb_s(host, peer, 8 << 20)  # warm-up: windows open, code paths hot
        await tunnel_mb_s(host, peer, lease_id("free"), dest_port, 8 << 20)
        raws, tuns, tcps, exact = [], [], [], True
        for _ in range(args.rounds):  # interleaved: load from elsewhere hits all three
            mb, ok = await raw_mb_s(host, peer, n)
            raws.append(mb)
            exact = exact and ok
            mb, ok = await tunnel_mb_s(host, peer, lease_id("free"), dest_port, n)
            tuns.append(mb)
            exact = exact and ok
            tcps.append(await tcp_mb_s(dest_port, n))
        conn = await connect_ms(host, peer, dest_port, 20 if args.quick else 100)
        err = await rate_error(host, peer, dest_port, 2.0 if args.quick else 5.0)
        rss, held = await rss_with_tunnels(host, peer, dest_port, prov["pid"], 100)
    raw, tun, tcp = max(raws), max(tuns), max(tcps)
    tunnels = 2 + args.rounds + len(conn) + 1 + held
    return {"raw_mb_s": round(raw, 1), "tunnel_mb_s": round(tun, 1),
            "tunnel_vs_raw_ratio": round(tun / raw, 3), "tcp_mb_s": round(tcp, 1),
            "tunnel_vs_tcp_ratio": round(tun / tcp, 4),
            "connect_p50_ms": round(statistics.median(conn), 2),
            "connect_p99_ms": round(sorted(conn)[int(0.99 * (len(conn) - 1))], 2),
            "rate_error_pct": round(err, 2), "limited_rate_bps": LIMITED_BPS, "tunnels": tunnels,
            "rss_mb_100_tunnels": round(rss, 1), "output_exact": exact,
            "mb_per_transfer": args.mb, "rounds": args.rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller volumes (< 60 s)")
    ap.add_argument("--mb", type=int, help="MiB per transfer (default 256, quick 48)")
    ap.add_argument("--rounds", type=int, help="rounds of (a), (b), (c); best of (default 3)")
    ap.add_argument("--role", choices=["dest", "provider"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "dest":
        dest_main()
        return 0
    if args.role == "provider":
        import logging

        logging.disable(logging.CRITICAL)
        provider_main()
        return 0
    args.mb = args.mb or (48 if args.quick else 256)
    args.rounds = args.rounds or (2 if args.quick else 3)
    import logging

    logging.disable(logging.CRITICAL)
    dest, d = _child("dest")
    prov_p, prov = _child("provider")
    try:
        out = trio.run(member_main, args, prov, int(d["port"]))
    finally:
        for p in (prov_p, dest):
            assert p.stdin is not None
            p.stdin.close()
            p.terminate()
            p.wait(10)
    print(f"(a) raw libp2p stream, one way : {out['raw_mb_s']:7.1f} MB/s")
    print(f"(b) through a tunnel           : {out['tunnel_mb_s']:7.1f} MB/s "
          f"(ratio {out['tunnel_vs_raw_ratio']}, output exact: {out['output_exact']})")
    print(f"(c) direct TCP                 : {out['tcp_mb_s']:7.1f} MB/s")
    print(f"new tunnel over a connection   : p50 {out['connect_p50_ms']} ms, "
          f"p99 {out['connect_p99_ms']} ms")
    print(f"limited lease (16 Mbit/s)      : {out['rate_error_pct']} % off the max rate")
    print(f"provider RSS, 100 tunnels open : {out['rss_mb_100_tunnels']} MB")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
