"""Scenes of the round: the tunnel through a bandwidth lease, the unpaid recipient
whose record providers' policies skip, and small lookups the round polls."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..agent import HOUR_MS, RecipientPolicy, Verdict, recipient_verdict
from ..auction.lease import Lease
from ..auction.views import rep_label
from ..client import LightClient, now_ms
from ..control import control_call
from ..errors import StepFailed, UsageError
from ..events import Usage
from .net import (
    Devnet,
    ProviderProc,
    ProviderSpec,
    bids_final,
    poll,
    wait_until_ms,
)

TUNNEL_FILE_BYTES = 2 << 20


async def _http_file(body: bytes, stream: trio.SocketStream) -> None:
    """A tiny HTTP/1.0 server: any GET gets `body` (the destination of the tunnel)."""
    head = b""
    with trio.move_on_after(10):
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            head += chunk
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream"
                                  b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await stream.aclose()


async def tunnel_fetch(net: Devnet, dev: LightClient, lease: Lease) -> dict[str, Any]:
    """A member device of a bandwidth lease fetches a file from a local HTTP server
    through the winner's tunnel (the provider connects to the server, not the device);
    checked byte for byte."""
    body = os.urandom(TUNNEL_FILE_BYTES)
    winner = net.name_of(lease.provider)
    net.n.say(f"dave's phone fetches {len(body) >> 20} MiB over HTTP through {winner}'s "
              f"tunnel (lease max {(lease.max_rate_bps or 0) / 1e6:.0f} Mbit/s)")
    await poll("the bandwidth lease to reach the phone's node",
               functools.partial(knows, dev.lease, lease.id), timeout=10)
    await wait_until_ms(lease.start_ms)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            trio.serve_tcp, functools.partial(_http_file, body), 0, host=net.tunnel_host))
        port = int(listeners[0].socket.getsockname()[1])
        t0 = time.monotonic()
        tunnel = await dev.open_tunnel(lease, net.tunnel_host, port, timeout=15)
        await tunnel.send_all(b"GET /file HTTP/1.0\r\nHost: %s\r\n\r\n"
                              % net.tunnel_host.encode())
        await tunnel.send_eof()
        got = bytearray()
        with trio.fail_after(60):
            while (view := await tunnel.receive_view()) is not None:
                got += view
            await tunnel.aclose()
        took = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    head, _, data = bytes(got).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") or data != body:
        raise StepFailed(f"the file fetched through the tunnel differs ({len(data)} of "
                         f"{len(body)} bytes; status {head[:40]!r})")
    end = tunnel.end
    net.n.done("tunnel fetch byte-exact", f"{len(body) / 1e6:.1f} MB in {took:.1f} s "
                                          f"({len(got) * 8 / took / 1e6:.1f} Mbit/s) via "
                                          f"{winner}, which connected to {tunnel.reply.addr}")
    return {"lease": lease.id.hex(), "provider": winner, "bytes": len(body), "exact": True,
            "seconds": round(took, 2), "max_rate_bps": lease.max_rate_bps,
            "provider_bytes_down": end.bytes_down if end else None,
            "member": dev.key.hex()}


async def tunnel_usage(net: Devnet, c: LightClient, lease: Lease, info: dict[str, Any]) -> None:
    """The winner's signed usage of the bandwidth lease shows the phone's bytes."""
    async def seen() -> Usage | None:
        got = await c.find_events(kind="usage", ref=lease.id)
        body = got[-1].body if got else None
        return body if isinstance(body, Usage) else None

    usage = await poll("the bandwidth lease's usage summary", seen,
                       timeout=(lease.end_ms - now_ms()) / 1000 + 20)
    m = next((m for m in usage.members if m.member.hex() == info["member"]), None)
    if m is None or m.bytes_out < info["bytes"]:
        raise StepFailed(f"the tunnel's usage does not show the phone's download: {usage}")
    info["usage"] = {"bytes_in": m.bytes_in, "bytes_out": m.bytes_out,
                     "active_ms": m.active_ms, "rate_limited": usage.rate_limited}
    net.n.done("tunnel usage signed", f"{net.name_of(lease.provider)} billed dave's phone "
                                      f"{m.bytes_out} bytes down, {m.bytes_in} up, "
                                      f"{m.active_ms} ms active")


MALLORY_LEASE_MS = 1_000


async def unpaid_warm_up(net: Devnet, mallory: LightClient, request: bytes) -> None:
    """mallory awards her warm-up auction, never pays, and the lease ends: its provider
    rates her unpaid. Waits until every node holds that rating, so each provider
    judges her next request on the same record."""
    await bids_final(net, (await mallory.auction(request)).auction.deadline_ms)
    aw, body = await mallory.award(request)
    if body.winner is None:
        raise StepFailed("mallory's warm-up auction got no bids")
    _, lease = await mallory.lease(aw.id)

    async def rated_unpaid() -> bool | None:
        rs = await mallory.find_events(kind="rating", ref=lease.id)
        return True if any(getattr(r.body, "subject", None) == mallory.key
                           and not getattr(r.body, "satisfied", True) for r in rs) else None

    await poll("the provider's unpaid rating of mallory", rated_unpaid,
               timeout=(lease.end_ms - now_ms()) / 1000 + 15)
    await net.wait_converged()
    rec = (await mallory.reputation(mallory.key)).recipient
    net.n.done("unpaid lease rated", f"{net.name_of(lease.provider)} rated mallory unpaid "
                                     f"after her lease ended; her paid record "
                                     f"{rep_label(rec)}")


async def recipient_policy_shown(net: Devnet, mallory: LightClient,
                                 request: bytes) -> dict[str, Any]:
    """After mallory's auction closed: each provider's bid or skip, why (the same pure
    verdict the provider's agent applies, on her record as of the auction's start), and
    the skip as the provider counted it in its status."""
    info = await mallory.auction(request)
    await wait_until_ms(info.auction.request.close_ms)
    a, rec = info.auction, info.recipient_record
    net.n.say(f"mallory's paid record at her auction's start: {rec.label()}")
    verdicts: dict[bytes, tuple[ProviderProc, int, Verdict]] = {}
    for p in net.providers:
        price = _price(p.spec, a.request.service, a.request.duration_ms)
        if price is not None and price <= a.request.reserve:
            pol = p.spec.policy
            verdicts[p.ident.public] = (p, price, recipient_verdict(rec, RecipientPolicy(
                min_score_ppm=int(pol.get("min_recipient_score", 0) * 10_000),
                new_recipient=pol.get("new_recipient", "bid"),
                risk_premium_pct=pol.get("risk_premium_pct", 0)), price, a.request.reserve))

    def as_expected(bids: dict[bytes, int | None]) -> bool:
        return all(bids.get(k, -1) == (v.price if v.bid else -1)
                   for k, (_, _, v) in verdicts.items())

    async def settled() -> dict[bytes, int | None] | None:
        got = {b.provider: b.price for b in await mallory.bids(request)}
        return got if as_expected(got) else None

    try:
        bids = await poll("the bids the providers' policies call for", settled, timeout=10)
    except StepFailed:
        got = {net.name_of(b.provider): b.price for b in await mallory.bids(request)}
        want = {p.spec.name: v.price if v.bid else f"skip ({v.reason})"
                for p, _, v in verdicts.values()}
        raise StepFailed(f"mallory's auction got bids {got}, the policies say {want}"
                         ) from None
    rows: list[dict[str, Any]] = []
    for key, (p, price, v) in verdicts.items():
        status = await trio.to_thread.run_sync(control_call, p.data_dir, {"op": "status"}, 10)
        skipped = status["services"]["provider"]["skipped"]
        if not v.bid and not skipped.get(v.reason):
            raise StepFailed(f"{p.spec.name} did not count its skip ({v.reason}): {skipped}")
        what = (f"skipped ({v.reason}): {v.detail}" if not v.bid else
                f"bid {v.price} instead of {price} ({v.reason}): {v.detail}" if v.reason
                else f"bid {price}: no policy against her")
        net.n.say(f"   {p.spec.name:9} {what}")
        rows.append({"provider": p.spec.name, "policy": p.spec.policy, "list_price": price,
                     "bid": bids.get(key), "reason": v.reason, "detail": v.detail,
                     "skipped_counted": dict(skipped)})
    if not any(r["bid"] is None for r in rows) or not any(r["reason"] == "premium"
                                                         for r in rows):
        raise StepFailed(f"no provider both skipped and charged mallory more: {rows}")
    net.n.done("provider policy on an unpaid recipient",
               ", ".join(f"{r['provider']} {'skipped' if r['bid'] is None else 'bid'}"
                         + (f" (+{r['policy'].get('risk_premium_pct')}%)"
                            if r["reason"] == "premium" else "") for r in rows))
    return {"recipient": "mallory", "record": rec.to_json(), "providers": rows}


def _price(spec: ProviderSpec, service: str, duration_ms: int) -> int | None:
    offer = spec.offers.get(service)
    return None if offer is None else max(1, -(-offer["price"] * duration_ms // HOUR_MS))


async def knows(lookup: Callable[[bytes], Awaitable[Any]], event_id: bytes) -> bool | None:
    """True once the client's nodes know `event_id` (gossip takes up to a few hundred
    ms to bring another client's fresh event to them), None before."""
    try:
        await lookup(event_id)
    except UsageError:
        return None
    return True


async def bids_in_revealed(c: LightClient, rid: bytes, want: int) -> bool | None:
    bids = await c.bids(rid)
    return True if sum(b.price is not None for b in bids) >= want else None


def net_member(devs: list[LightClient], names: list[str], key: bytes) -> str:
    for c, name in zip(devs, names, strict=True):
        if c.key == key:
            return name
    return key.hex()[:8]
