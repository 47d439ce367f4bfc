"""The round's summary tables."""

from __future__ import annotations

from typing import Any

from ..auction import Market
from ..auction.views import record_text, rep_label, rep_text
from ..client import now_ms
from ..output import Output
from .net import (
    Devnet,
    _table,
)


def auction_row(market: Market, net: Devnet, rid: bytes) -> dict[str, Any]:
    a = market.auctions[rid]
    out = a.outcome
    return {
        "id": rid.hex()[:12], "service": a.request.service, "rule": a.request.rule,
        "sealed": a.request.sealed, "group": a.request.group, "status": a.status(now_ms()),
        "bids": [{"provider": net.name_of(b.provider), "price": b.price, "status": b.status,
                  "reputation": rep_label(market.reputation.score(
                      b.provider, "provider", a.request.close_ms))}
                 for b in a.bids.values()],
        "winner": net.name_of(a.bids[out.winner].provider) if out and out.winner else None,
        "price": out.price if out else None,
    }


def _rep(row: dict[str, Any]) -> str:
    return rep_text(int(row["score_ppm"]), int(row["ratings"]))


def print_summary(summary: dict[str, Any], out: Output) -> None:
    if out.json_mode:
        out.json(summary)
        return
    print("\n== auctions ==")
    rows = []
    for a in summary["auctions"]:
        bids = "; ".join(f"{b['provider']} {b['price']}: {b['reputation']}"
                         for b in a["bids"])
        kind = "sealed " if a["sealed"] else ("group " if a["group"] else "")
        rows.append([a["id"], a["service"], kind + a["rule"], a["winner"] or "-",
                     a["price"] if a["price"] is not None else "-", bids])
    _table(out, ["auction", "service", "rule", "winner", "price", "bids (reputation at close)"],
              rows)
    lease = summary["lease"]
    print(f"\n== alice's shared lease {lease['id'][:12]} from {lease['provider']} "
          f"(price {lease['price']}, max {lease['max_rate_bps']} bit/s, "
          f"min {lease['min_rate_bps']} bit/s) ==")
    _table(out, ["member", "bytes in", "bytes out", "segments"],
              [[u["member"], u["bytes_in"], u["bytes_out"], u["segments"]]
               for u in lease["usage"]])
    counts: dict[str, int] = {}
    for sc in lease["subcontracts"]:
        k = f"{sc['contractor']} ({'+'.join(sc['services'])})"
        counts[k] = counts.get(k, 0) + 1
    subs = ", ".join(f"{k} x{v}" for k, v in counts.items())
    print(f"subcontracted: {subs}; time below min rate: {lease['shortfall_ms']} ms; "
          f"rate-limit waits: {lease['rate_limited']}")
    tun = summary.get("tunnel")
    if tun:
        use = tun.get("usage", {})
        print(f"\n== dave's bandwidth lease {tun['lease'][:12]} from {tun['provider']} "
              f"(max {tun['max_rate_bps']} bit/s) ==\nphone fetched {tun['bytes']} bytes "
              f"through the tunnel in {tun['seconds']} s, byte-exact; usage: "
              f"{use.get('bytes_out')} bytes down, {use.get('bytes_in')} up, "
              f"{use.get('active_ms')} ms active")
    print("\n== provider reputation, before → after ==")
    before = {r["who"]: r for r in summary["reputation_before"]}
    _table(out, ["provider", "before", "after", "ratings", "satisfied", "unsatisfied"],
              [[r["who"], _rep(before[r["who"]]), _rep(r), r["ratings"], r["satisfied"],
                r["unsatisfied"]] for r in summary["reputation_after"]])
    print("\n== recipient reputation (rated by providers: did they pay?) ==")
    _table(out, ["recipient", "score", "ratings", "satisfied"],
              [[r["who"], _rep(r), r["ratings"], r["satisfied"]]
               for r in summary["recipients"]])
    pol = summary.get("recipient_policy")
    if pol:
        print(f"\n== provider policy on {pol['recipient']}, who did not pay (paid record "
              f"{record_text(pol['record'])}) ==")
        _table(out, ["provider", "policy", "list price", "bid", "why"],
               [[r["provider"], ", ".join(f"{k} {v}" for k, v in r["policy"].items()) or "-",
                 r["list_price"], "skipped" if r["bid"] is None else r["bid"],
                 r["detail"] or "-"] for r in pol["providers"]])
    print("\n== state digests ==")
    _table(out, ["node", "digest"], [[k, v] for k, v in summary["digests"].items()])
