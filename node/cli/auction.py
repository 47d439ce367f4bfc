"""`bidmesh ledger auctions | auction ID | leases | reputation [KEY] | ignored`.

Registered into `node.cli` through `ledger_command` (the CLI layer; the pure core
in node/auction/ knows nothing of it); each derives the market from the ledger's
canonical order (a pure fold, no daemon needed) and prints a table, or the
`node.auction.views` dicts with `--json`. Times shown are ledger time: an auction's
status is judged against the newest event in the ledger, never the wall clock.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..auction.market import Market, derive, find_auction
from ..auction.views import (
    auction_json,
    auctions_json,
    ignored_json,
    leases_json,
    record_text,
    rep_json_text,
    reputation_json,
)
from ..ledger import Ledger
from ..output import Output, pairs, table
from .common import EXIT_OK, fmt_time, ledger_command, parse_time_ms, resolve_author, short


def _market(led: Ledger) -> Market:
    return derive(led.iter_canonical())


def _score(rep: dict[str, Any]) -> str:
    return rep_json_text(rep)


@ledger_command("auctions", "every auction: rule, bids, status, winner")
def cmd_auctions(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    m = _market(led)
    data = auctions_json(m)
    rows = [{
        "id": a["id"][:16], "recipient": a["recipient"][:16], "service": a["service"],
        "rule": a["rule"] + (" sealed" if a["sealed"] else "") + (" group" if a["group"] else ""),
        "reserve": a["reserve"], "currency": a["currency"], "close": fmt_time(a["close_ms"]),
        "bids": a["bids"], "valid": a["valid_bids"], "status": a["status"],
        "winner": (a["winner"] or "")[:16] or None, "price": a["price"],
        "payer": record_text(a["recipient_record"]),
    } for a in data]
    out.rows(data if out.json_mode else rows, [
        ("id", "AUCTION"), ("recipient", "RECIPIENT"), ("service", "SERVICE"),
        ("payer", "RECIPIENT PAID (AT START)"),
        ("rule", "RULE"), ("reserve", "RESERVE"), ("currency", "CUR"), ("close", "CLOSES (UTC)"),
        ("bids", "BIDS"), ("valid", "VALID"), ("status", "STATUS"), ("winner", "WINNER"),
        ("price", "PRICE")], empty="(no auctions)")
    return EXIT_OK


@ledger_command("auction", "one auction: bids with reputation, awards, evidence",
                args=lambda p: p.add_argument("id", help="request id (hex or unique prefix)"))
def cmd_auction(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    m = _market(led)
    a = auction_json(m, find_auction(m, args.id))
    if out.json_mode:
        out.json(a)
        return EXIT_OK
    head = pairs([
        ("auction", a["id"]), ("recipient", a["recipient"]),
        ("recipient record", record_text(a["recipient_record"]) + " (as payer, at the start)"),
        ("service", " -> ".join([a["service"], *a["chain"]])),
        ("rule", a["rule"] + (" (sealed)" if a["sealed"] else " (open)")),
        ("group", f"yes, pledged {a['pledged']}" if a["group"] else "no"),
        ("reserve", f"{a['reserve']} {a['currency']}"),
        ("window", f"{fmt_time(a['start_ms'])} + {a['duration_ms']} ms"),
        ("rate", f"min {a['min_rate_bps'] or '-'} / max {a['max_rate_bps'] or '-'} bit/s"),
        ("closes", fmt_time(a["close_ms"])),
        ("reveals by", fmt_time(a["reveal_ms"]) if a["sealed"] else None),
        ("status", a["status"]), ("winner", a["winner"]), ("price", a["price"]),
        ("lease", a["lease"]),
    ])
    bids = [{
        "id": b["id"][:16], "provider": b["provider"][:16], "time": fmt_time(b["ts_ms"]),
        "price": b["price"], "status": b["status"] + (f" ({b['reason']})" if b["reason"]
                                                      and b["reason"] != b["status"] else ""),
        "rep": _score(b["reputation"]),
        "ok": b["reputation"]["satisfied"], "notok": b["reputation"]["unsatisfied"],
        "win": "*" if b["winner"] else "",
    } for b in a["bid_list"]]
    parts = [head, "", "bids (reputation as provider, as of the close):",
             table(bids, [("win", ""), ("id", "BID"), ("provider", "PROVIDER"),
                          ("time", "TIME (UTC)"), ("price", "PRICE"), ("status", "STATUS"),
                          ("rep", "REPUTATION"), ("ok", "SATISFIED"),
                          ("notok", "UNSATISFIED")]) if bids else "(no bids)"]
    if a["pledges"]:
        parts += ["", "pledges:", table(
            [{**p, "member": p["member"][:16], "sponsor": [s[:16] for s in p["sponsor"]]}
             for p in a["pledges"]],
            [("member", "MEMBER"), ("willing", "WILLING"), ("amount", "AMOUNT"),
             ("sponsor", "SPONSORS")])]
    if a["awards"]:
        parts += ["", "awards:", table(
            [{"id": c["id"][:16], "winner": (c["winner"] or "no deal")[:16], "price": c["price"],
              "valid": c["valid"], "problems": c["problems"] or None,
              "omitted": len(c["omitted"])} for c in a["awards"]],
            [("id", "AWARD"), ("winner", "WINNER"), ("price", "PRICE"), ("valid", "VALID"),
             ("problems", "PROBLEMS"), ("omitted", "OMITTED BIDS")])]
    if a["evidence"]:
        parts += ["", "evidence against the recipient:", table(
            [{"award": e["award"][:16], "kind": e["kind"], "bid": (e["bid"] or "")[:16] or None}
             for e in a["evidence"]],
            [("award", "AWARD"), ("kind", "KIND"), ("bid", "BID")])]
    out.say("\n".join(parts))
    return EXIT_OK


@ledger_command("leases", "leases from valid awards: parties, window, price, paid")
def cmd_leases(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    data = leases_json(_market(led))
    rows = [{
        "id": x["id"][:16], "provider": x["provider"][:16], "recipient": x["recipient"][:16],
        "service": x["service"], "start": fmt_time(x["start_ms"]), "end": fmt_time(x["end_ms"]),
        "price": x["price"], "currency": x["currency"], "paid": x["paid"],
        "members": 1 + len(x["devices"]) + len(x["group_members"]) + len(x["phones"])
        + len(x["users"]), "ratings": len(x["ratings"]),
    } for x in data]
    out.rows(data if out.json_mode else rows, [
        ("id", "LEASE"), ("provider", "PROVIDER"), ("recipient", "RECIPIENT"),
        ("service", "SERVICE"), ("start", "START (UTC)"), ("end", "END (UTC)"),
        ("price", "PRICE"), ("currency", "CUR"), ("paid", "PAID"), ("members", "MEMBERS"),
        ("ratings", "RATINGS")], empty="(no leases)")
    return EXIT_OK


def _reputation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", nargs="?", help="only this key (hex or unique prefix of an author)")
    p.add_argument("--as-of", help="reputation as of this ledger time (ms or ISO 8601); "
                                   "default: the newest event")


@ledger_command("reputation", "reputation as provider and as recipient, with counts",
                args=_reputation_args)
def cmd_reputation(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    m = _market(led)
    key = resolve_author(led, args.key) if args.key else None
    as_of = parse_time_ms(args.as_of) if args.as_of else None
    data = reputation_json(m, key, as_of)
    rows = []
    for r in data:
        p, c = r["provider"], r["recipient"]
        rows.append({
            "key": r["key"][:16], "p_score": _score(p), "p_n": p["ratings"],
            "p_ok": p["satisfied"], "p_bad": p["unsatisfied"], "p_stars": p["mean_stars"],
            "r_score": _score(c), "r_n": c["ratings"], "r_ok": c["satisfied"],
            "r_bad": c["unsatisfied"],
        })
    out.rows(data if out.json_mode else rows, [
        ("key", "KEY"), ("p_score", "AS PROVIDER"), ("p_n", "RATINGS"), ("p_ok", "SATISFIED"),
        ("p_bad", "UNSATISFIED"), ("p_stars", "STARS"), ("r_score", "AS RECIPIENT"),
        ("r_n", "RATINGS"), ("r_ok", "PAID OK"), ("r_bad", "NOT OK")],
        empty="(no ratings)")
    return EXIT_OK


@ledger_command("ignored", "events that count for nothing, with the reason",
                args=lambda p: p.add_argument("--kind", help="only this event kind"))
def cmd_ignored(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    data = [i for i in ignored_json(_market(led)) if not args.kind or i["kind"] == args.kind]
    rows = [{"id": short(bytes.fromhex(i["id"])), "kind": i["kind"], "reason": i["reason"]}
            for i in data]
    out.rows(data if out.json_mode else rows,
             [("id", "EVENT"), ("kind", "KIND"), ("reason", "REASON")], empty="(nothing ignored)")
    return EXIT_OK
