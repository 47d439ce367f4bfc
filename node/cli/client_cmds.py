"""`bidmesh client ...`: the light client's command line (tables, progress bar, --json).

The logic lives in node/client/; this module only parses, prints and maps errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import trio

from ..auction import Lease
from ..auction.views import rep_label
from ..client import AuctionInfo, LightClient, now_ms
from ..client.resolve import resolve
from ..errors import PeerError, UsageError
from ..events import Event, event_to_json
from ..reputation import Score

if TYPE_CHECKING:  # imports libp2p (~1 s): loaded by the stream command only
    from ..dataplane.client import InputAcks


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
    from ..output import table

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
        # One list; `verified` tells leases (the award re-derived here) from awards of
        # ours that do not verify (award, request, reason, detail instead of a lease).
        out.json([{**i.to_json(), "verified": True} for i in infos]
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
    from ..p2p import peer_id_from_pubkey

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
    """A one-line progress bar on stderr: input bytes the provider acknowledged (returned
    processed), their rate against the lease's limits, output bytes, the time left."""

    WINDOW_S = 3.0  # the rate shown is over the last few seconds, not since the start

    def __init__(self, lease: Lease, enabled: bool, total: int | None) -> None:
        self.lease, self.enabled, self.total = lease, enabled, total
        self.acked = 0
        self.received = 0
        self.t0 = time.monotonic()
        self._last = 0.0
        self._samples: deque[tuple[float, int]] = deque([(self.t0, 0)])

    def rate_bps(self, now: float, overall: bool = False) -> int:
        """Acknowledged input in bits/s: over the last WINDOW_S, or since the start."""
        while not overall and len(self._samples) > 1 and \
                now - self._samples[1][0] >= self.WINDOW_S:
            self._samples.popleft()
        t, n = (self.t0, 0) if overall else self._samples[0]
        return int((self.acked - n) * 8 / max(now - t, 1e-3))

    def update(self, acked: int | None = None, received: int = 0,
               final: bool = False) -> None:
        t = time.monotonic()
        if acked is not None and acked != self.acked:
            self.acked = acked
            self._samples.append((t, acked))
        self.received += received
        if not self.enabled or (not final and t - self._last < 0.2):
            return
        self._last = t
        lim = self.lease
        limits = (f"lease max {_bps(lim.max_rate_bps)}" if lim.max_rate_bps else
                  "no max rate") + (f", min {_bps(lim.min_rate_bps)}" if lim.min_rate_bps
                                    else "")
        left = max(0, (lim.end_ms - now_ms()) // 1000)
        bar = ""
        if self.total:
            frac = min(1.0, self.acked / self.total)
            n = int(frac * 20)
            bar = "[" + "#" * n + "." * (20 - n) + f"] {frac * 100:3.0f}% "
        sys.stderr.write(f"\r{bar}acked {_size(self.acked)} at "
                         f"{_bps(self.rate_bps(t, overall=final))} ({limits}; lease ends in "
                         f"{left}s), out {_size(self.received)}\x1b[K")
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


TS_READ = 188 * 348  # ~64 KiB of MPEG-TS per read; the provider's parser re-syncs anyway


async def _cmd_stream(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    """Stream a file through a lease. Output framing (docs/client.md): `results` (each
    segment's result, in order), `frames` (`u32 len, u64 seq, result` as received) or
    `packets` (each result read as `u32 len, payload` packets, payloads written)."""
    import struct

    from ..dataplane.client import InputAcks, split_results
    from ..segments import decode_packets

    lease_id = await _id(c, a.lease, "lease")
    _, lease = await c.lease(lease_id)
    if a.packet < 1 or a.packet > 1 << 20:
        raise UsageError("--packet must be 1..1048576 bytes")
    chains = [list(a.chain)] if a.chain else None
    inp = sys.stdin.buffer if a.infile == "-" else open(a.infile, "rb")  # noqa: SIM115
    total = None if a.infile == "-" else os.path.getsize(a.infile)
    show = a.progress == "yes" or (a.progress == "auto" and sys.stderr.isatty())
    prog = Progress(lease, show, total)
    acks = InputAcks(a.format)
    # A file is written as OUT.partial and renamed to OUT only when the provider's
    # trailer says the stream completed: an OUT that exists is always a whole output.
    partial = None if a.outfile == "-" else a.outfile + ".partial"
    dst = sys.stdout.buffer if partial is None else open(partial, "wb")  # noqa: SIM115
    head = struct.Struct(">IB")
    written = 0

    size = a.packet if a.format == "lp" else TS_READ
    if inp is sys.stdin.buffer:
        # A pipe can keep us waiting: its read is abandoned when the stream ends first
        # (the provider ended it, Ctrl-C). os.read takes no lock, unlike the buffered
        # reader, which an abandoned thread would hold into interpreter shutdown (a
        # fatal error there). A pipe's reads may be short: packets of at most --packet.
        fd = inp.fileno()

        def read() -> bytes:
            return os.read(fd, size)
    else:
        def read() -> bytes:
            return inp.read(size)

    async def source() -> AsyncIterator[bytes]:
        while True:
            # (trio_typing's stubs predate the `abandon_on_cancel` name of trio >= 0.23)
            chunk: bytes = await trio.to_thread.run_sync(
                read, abandon_on_cancel=True)  # type: ignore[call-arg]
            if not chunk:
                acks.end()
                return
            item = head.pack(len(chunk), 0) + chunk if a.format == "lp" else chunk
            acks.feed(item)
            yield item

    async def sink(frame: bytes) -> None:
        nonlocal written
        for seq, result in split_results(frame):
            data = frame if a.out_format == "frames" else result
            if a.out_format == "packets":
                try:
                    data = b"".join(decode_packets(result))
                except PeerError as e:
                    raise UsageError(
                        f"--out-format packets: the result of segment {seq} is not packets "
                        f"(u32 length, payload): the chain transforms them ({e}); use "
                        "--out-format results or frames") from None
            dst.write(data)
            written += len(data)
            prog.update(acked=acks.ack(seq), received=len(data))

    try:
        res = await c.stream(lease_id, source(), sink=sink, chains=chains, protocol=a.format)
    except BaseException as e:  # Ctrl-C included: say what happened to the output
        prog.update(final=True)
        _close_stream_files(inp, dst)
        _interrupted(e, acks, partial, written)
        raise
    t = res.trailer
    prog.update(acked=t.bytes_in, final=True)
    _close_stream_files(inp, dst)
    if partial is not None:
        os.replace(partial, a.outfile)
    summary = {"lease": lease_id.hex(), "format": a.format, "chain": chains[0] if chains
               else None, "segments": t.segments, "packets": t.packets,
               "bytes_in": t.bytes_in, "bytes_out": t.bytes_out, "written": written,
               "garbage_bytes": t.garbage_bytes, "subcontracted": t.subcontracted,
               "seconds": round(time.monotonic() - prog.t0, 3)}
    if a.format == "ts" and t.garbage_bytes:
        sys.stderr.write(f"warning: {t.garbage_bytes} input bytes were not MPEG-TS packets "
                         "and were skipped\n")
    if out.json_mode:
        sys.stderr.write(json.dumps(summary) + "\n")
    elif show:
        sys.stderr.write(f"done: {t.segments} segments, {t.packets} packets, "
                         f"{_size(t.bytes_in)} in, {_size(written)} written\n")
    if a.format == "ts" and t.bytes_in and not t.packets:
        raise UsageError("the input holds no MPEG-TS packets (188 bytes from sync byte "
                         "0x47); for other data use --format lp")
    return 0


def _close_stream_files(inp: Any, dst: Any) -> None:
    if inp is not sys.stdin.buffer:
        inp.close()
    with contextlib.suppress(OSError):
        dst.flush()
    if dst is not sys.stdout.buffer:
        dst.close()


def _interrupted(e: BaseException, acks: InputAcks, partial: str | None, written: int) -> None:
    """Tell the user the stream did not complete and where its partial output is."""
    while isinstance(e, BaseExceptionGroup):  # trio nurseries wrap what happened
        ctrl_c = e.subgroup(KeyboardInterrupt)
        e = (ctrl_c or e).exceptions[0]
    why = "interrupted" if isinstance(e, KeyboardInterrupt) else (
        f"failed ({getattr(e, 'reason', None) or type(e).__name__})")
    done = f"{_size(acks.acked)} of {_size(acks.fed)} sent were acknowledged by the provider"
    if partial is None:
        where = f"{_size(written)} of partial output already went to stdout"
    elif written:
        where = f"the partial output ({_size(written)}) is in {partial}"
    else:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        where = "no output was written"
    sys.stderr.write(f"stream {why}: {done}; {where}\n")


COMMANDS: dict[str, Callable[..., Any]] = {
    "request": _cmd_request, "bids": _cmd_bids, "award": _cmd_award, "pay": _cmd_pay,
    "pledge": _cmd_pledge, "stream": _cmd_stream, "rate": _cmd_rate, "leases": _cmd_leases,
    "reputation": _cmd_reputation, "whoami": _cmd_whoami,
}


async def _cmd_tunnel(c: LightClient, a: argparse.Namespace, out: Any) -> int:
    from .tunnel_cmds import run_tunnel  # a local SOCKS5 proxy through a bandwidth lease

    return await run_tunnel(c, a, out)


COMMANDS["tunnel"] = _cmd_tunnel
