"""`bidmesh client ...`: the light client's command line (tables, progress bar, --json).

The logic lives in node/client.py; this module only parses, prints and maps errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from .auction import Lease
from .auction.views import rep_label
from .client import AuctionInfo, LightClient, now_ms
from .client_resolve import resolve
from .errors import UsageError
from .events import Event, event_to_json
from .reputation import Score


async def _id(c: LightClient, text: str, what: str) -> bytes:
    """A typed id: full hex, or a unique prefix (as the tables print them)."""
    return await resolve(c, text, what)


async def _keys(c: LightClient, texts: list[str]) -> list[bytes]:
    return [await resolve(c, t, "key") for t in texts]


def run_command(name: str, args: argparse.Namespace, out: Any) -> int:
    """Run `bidmesh client NAME` (parsed by node/cli.py's `register_client`)."""
    fn = COMMANDS.get(name)
    if fn is None:
        raise UsageError(f"unknown client command {name!r}")
    return _runner(fn)(args, out)


def _runner(fn: Callable[..., Any]) -> Callable[[argparse.Namespace, Any], int]:
    def run(args: argparse.Namespace, out: Any) -> int:
        async def main() -> int:
            async with LightClient.open(args.dir, args.node, network=args.network,
                                        timeout=args.timeout) as c:
                if c.state.unconfirmed:  # what an earlier command could not confirm
                    await c.flush()
                status: int = await fn(c, args, out)
                if c.state.unconfirmed and fn is not _cmd_whoami:
                    sys.stderr.write(f"warning: {len(c.state.unconfirmed)} of our records "
                                     f"not yet held by {c.quorum} of our nodes; kept and "
                                     "resent by the next command (see `client whoami`)\n")
                for d in c.disagreements:
                    sys.stderr.write(f"warning: nodes disagree on {d.query}: "
                                     + ", ".join(f"{k} lacks {len(v)}" for k, v in
                                                 d.missing.items()) + "\n")
                for f in c.faults:
                    sys.stderr.write(f"warning: node {f.node}: {f.reason}: {f.detail}\n")
                return status
        return trio.run(main)
    return run


def _short(b: bytes | None) -> str:
    return b.hex()[:16] if b else "-"


def _fmt_rep(s: Score) -> str:
    stars = f", {s.mean_stars:.1f}★" if s.mean_stars is not None else ""
    counts = f", {s.satisfied} satisfied / {s.unsatisfied} not{stars}" if s.ratings else ""
    return rep_label(s) + counts


def _event_out(out: Any, ev: Event, extra: dict[str, Any] | None = None) -> None:
    data = {**event_to_json(ev), **(extra or {})}
    out.emit(data, f"{ev.kind} {ev.id.hex()} (seq {ev.seq})")


async def _cmd_request(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    ev = await c.request(
        a.service, duration_ms=a.duration, reserve=a.reserve, currency=a.currency,
        close_in_ms=a.close_in, start_ms=a.start, chain=a.chain, max_rate_bps=a.max_rate,
        min_rate_bps=a.min_rate, devices=await _keys(c, a.device),
        phones=a.phone, users=a.user, max_devices=a.max_devices, rule=a.rule,
        sealed=a.sealed, reveal_window_ms=a.reveal_window, group=a.group, note=a.note)
    _event_out(out, ev)
    return 0


BID_COLUMNS = [("id", "BID"), ("provider", "PROVIDER"), ("price", "PRICE"),
               ("status", "STATUS"), ("score", "REPUTATION"), ("ratings", "SATISFIED"),
               ("winner", "WIN")]


def _bid_rows(info: AuctionInfo) -> list[dict[str, Any]]:
    return [{"id": _short(b.id), "provider": _short(b.provider), "price": b.price,
             "status": b.status + (f" ({b.reason})" if b.reason and b.status != "valid" else ""),
             "score": rep_label(b.reputation),
             "ratings": f"{b.reputation.satisfied} ok / {b.reputation.unsatisfied} not",
             "winner": "*" if b.winner else ""}
            for b in sorted(info.bids, key=lambda b: (b.price is None, b.price or 0, b.ts_ms))]


def _auction_header(info: AuctionInfo) -> str:
    r = info.auction.request
    left = (r.reveal_ms - now_ms()) / 1000
    when = f"closes in {left:.0f}s" if left > 0 else "bids final"
    return (f"auction {info.auction.id.hex()[:16]}  {r.service}  {r.rule}"
            f"{' sealed' if r.sealed else ''}  reserve {r.reserve} {r.currency}  "
            f"{info.status}, {when}, {len(info.bids)} bid(s)\n"
            f"recipient {info.auction.recipient.hex()[:16]} paid record at the start: "
            f"{info.recipient_record.label()}")


async def _cmd_bids(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    from .output import table

    rid = await _id(c, a.request, "request")
    if not a.watch:
        info = await c.auction(rid)
        if out.json_mode:
            out.json(info.to_json())
        else:
            out.say(_auction_header(info))
            out.rows(_bid_rows(info), BID_COLUMNS, empty="(no bids yet)")
        return 0
    tty = sys.stdout.isatty() and not out.json_mode
    async for info in c.watch_bids(rid, interval=a.interval):
        if out.json_mode:
            sys.stdout.write(json.dumps(info.to_json()) + "\n")
        else:
            text = _auction_header(info) + "\n" + (
                table(_bid_rows(info), BID_COLUMNS) if info.bids else "(no bids yet)")
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "\n") + text + "\n")
        sys.stdout.flush()
    return 0


async def _cmd_award(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    ev, body = await c.award(await _id(c, a.request, "request"))
    data = {**event_to_json(ev), "lease": ev.id.hex() if body.winner else None}
    out.emit(data, f"award {ev.id.hex()}: winner {_short(body.winner)} at {body.price}"
             + (f"; lease id {ev.id.hex()}" if body.winner else " (no deal)"))
    return 0


async def _cmd_pay(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    ev = await c.pay(await _id(c, a.lease, "lease"), a.amount, a.method, a.reference,
                     await _keys(c, a.on_behalf))
    _event_out(out, ev)
    return 0


async def _cmd_pledge(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    ev = await c.pledge(await _id(c, a.request, "request"), willing=not a.unwilling,
                        amount=a.amount, sponsor=await _keys(c, a.sponsor))
    _event_out(out, ev)
    return 0


async def _cmd_rate(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    ev = await c.rate(await _id(c, a.lease, "lease"), satisfied=a.satisfied, score=a.score,
                      text=a.text)
    _event_out(out, ev)
    return 0


async def _cmd_leases(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    infos, bad = await c.lease_report()
    if out.json_mode:
        out.json([i.to_json() for i in infos]
                 + [{**u.to_json(), "verified": False} for u in bad])
        return 0
    rows = [{"id": _short(i.lease.id), "role": i.role, "service": i.lease.service,
             "provider": _short(i.lease.provider), "price": i.lease.price, "paid": i.paid,
             "window": f"{(i.lease.end_ms - i.lease.start_ms) // 1000}s",
             "active": i.lease.active(now_ms()), "ratings": len(i.data["ratings"])}
            for i in infos]
    out.rows(rows, [("id", "LEASE"), ("role", "ROLE"), ("service", "SERVICE"),
                    ("provider", "PROVIDER"), ("price", "PRICE"), ("paid", "PAID"),
                    ("window", "WINDOW"), ("active", "ACTIVE"), ("ratings", "RATINGS")],
             empty="(no leases)" if not bad else "(no verified leases)")
    if bad:
        out.say("\nawards that do not verify here (not counted as leases):")
        out.rows([{"award": _short(u.award), "request": _short(u.request),
                   "reason": u.reason, "detail": u.detail} for u in bad],
                 [("award", "AWARD"), ("request", "REQUEST"), ("reason", "REASON"),
                  ("detail", "DETAIL")])
    return 0


async def _cmd_reputation(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    key = await _id(c, a.key, "key") if a.key else c.key
    info = await c.reputation(key)
    out.emit(info.to_json(), f"{key.hex()}\n  as provider:  {_fmt_rep(info.provider)}\n"
             f"  as recipient: {_fmt_rep(info.recipient)}")
    return 0


async def _cmd_whoami(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    h = await c.sync_head()
    from .p2p import peer_id_from_pubkey

    pending = c.pending()
    held = await c.holders([e.id for e in pending]) if pending else {}
    data = {"public_key": c.key.hex(), "peer_id": str(peer_id_from_pubkey(c.key)),
            "network": c.network, "head": {"seq": h.seq, "id": h.id.hex() if h.id else None,
                                           "ts_ms": h.ts_ms},
            "quorum": c.quorum,
            "unconfirmed": [{"id": e.id.hex(), "seq": e.seq, "kind": e.kind,
                             "held_by": sorted(held.get(e.id, ()))} for e in pending]}
    text = (f"public key  {data['public_key']}\npeer id     {data['peer_id']}\n"
            f"network     {c.network}\nhead        seq {h.seq} {_short(h.id)}\n")
    if pending:
        text += (f"unconfirmed {len(pending)} record(s) not yet held by {c.quorum} of "
                 f"{len(c.nodes)} nodes (resent by every command):\n")
        text += "\n".join(f"  seq {e.seq} {e.kind} {_short(e.id)} held by "
                          f"{len(held.get(e.id, ()))}" for e in pending)
    else:
        text += "unconfirmed none"
    out.emit(data, text)
    return 0


class Progress:
    """A one-line progress bar on stderr: bytes, rate, and the lease's limits."""

    def __init__(self, lease: Lease, enabled: bool, total: int | None) -> None:
        self.lease, self.enabled, self.total = lease, enabled, total
        self.sent = 0
        self.received = 0
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, sent: int = 0, received: int = 0, final: bool = False) -> None:
        self.sent += sent
        self.received += received
        t = time.monotonic()
        if not self.enabled or (not final and t - self._last < 0.2):
            return
        self._last = t
        rate = self.sent * 8 / max(t - self.t0, 1e-6)
        lim = self.lease
        limits = (f"max {_bps(lim.max_rate_bps)}" if lim.max_rate_bps else "no max") + (
            f", min {_bps(lim.min_rate_bps)}" if lim.min_rate_bps else "")
        left = max(0, (lim.end_ms - now_ms()) // 1000)
        bar = ""
        if self.total:
            frac = min(1.0, self.sent / self.total)
            n = int(frac * 20)
            bar = "[" + "#" * n + "." * (20 - n) + f"] {frac * 100:3.0f}% "
        sys.stderr.write(f"\r{bar}sent {_size(self.sent)} recv {_size(self.received)} "
                         f"at {_bps(int(rate))} ({limits}; lease ends in {left}s)\x1b[K")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _bps(v: int | None) -> str:
    if not v:
        return "-"
    for unit, f in (("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if v >= f:
            return f"{v / f:.1f} {unit}"
    return f"{v} b/s"


def _size(n: int) -> str:
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} B"


async def _cmd_stream(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    import struct

    from .dataplane.client import split_results

    lease_id = await _id(c, a.lease, "lease")
    _, lease = await c.lease(lease_id)
    if a.packet < 1 or a.packet > 1 << 20:
        raise UsageError("--packet must be 1..1048576 bytes")
    inp = sys.stdin.buffer if a.infile == "-" else open(a.infile, "rb")  # noqa: SIM115
    total = None if a.infile == "-" else os.path.getsize(a.infile)
    show = a.progress == "yes" or (a.progress == "auto" and sys.stderr.isatty())
    prog = Progress(lease, show, total)
    dst = sys.stdout.buffer if a.outfile == "-" else open(a.outfile, "wb")  # noqa: SIM115
    head = struct.Struct(">IB")

    async def source() -> AsyncIterator[bytes]:
        while True:
            chunk = await trio.to_thread.run_sync(inp.read, a.packet)
            if not chunk:
                return
            prog.update(sent=len(chunk))
            yield head.pack(len(chunk), 0) + chunk

    async def sink(frame: bytes) -> None:
        for _, result in split_results(frame):
            dst.write(result)
            prog.update(received=len(result))

    try:
        res = await c.stream(lease_id, source(), sink=sink)
    finally:
        prog.update(final=True)
        if inp is not sys.stdin.buffer:
            inp.close()
        dst.flush()
        if dst is not sys.stdout.buffer:
            dst.close()
    t = res.trailer
    summary = {"lease": lease_id.hex(), "segments": t.segments, "packets": t.packets,
               "bytes_in": t.bytes_in, "bytes_out": t.bytes_out,
               "subcontracted": t.subcontracted, "seconds": round(time.monotonic() - prog.t0, 3)}
    if out.json_mode:
        sys.stderr.write(json.dumps(summary) + "\n")
    elif show:
        sys.stderr.write(f"done: {t.segments} segments, {_size(t.bytes_in)} in, "
                         f"{_size(t.bytes_out)} out\n")
    return 0


COMMANDS: dict[str, Callable[..., Any]] = {
    "request": _cmd_request, "bids": _cmd_bids, "award": _cmd_award, "pay": _cmd_pay,
    "pledge": _cmd_pledge, "stream": _cmd_stream, "rate": _cmd_rate, "leases": _cmd_leases,
    "reputation": _cmd_reputation, "whoami": _cmd_whoami,
}
