"""A random but meaningful market history for the incremental-fold tests and bench:
auctions under every rule (open, sealed, group), awards right and wrong, leases,
payments, ratings (so best_value awards depend on other auctions' ratings and rating
weights on other leases' settlements), subcontracts, usage, offers, and junk that
refers to unknown events. Events are generated in canonical order with a running
`Market` deciding what an honest recipient would award."""

from __future__ import annotations

import hashlib
import random
from typing import Any

from node.agent import build_award
from node.auction import Market, views
from node.events import (
    Award,
    Bid,
    Body,
    Commit,
    Event,
    Members,
    Offer,
    Payment,
    Pledge,
    Rating,
    Request,
    Reveal,
    ServiceOffer,
    Subcontract,
    Usage,
    commitment_hash,
    sign_event,
)

NETWORK = "test"
RULES = ("lowest", "vickrey", "best_value", "best_value")


class Actor:
    def __init__(self, name: str) -> None:
        self.seed = hashlib.sha256(b"fold:" + name.encode()).digest()
        self.seq = 0
        self.prev: bytes | None = None
        self.public = b""

    def sign(self, body: Body, ts: int) -> Event:
        self.seq += 1
        ev = sign_event(self.seed, self.seq, self.prev, ts, body, NETWORK)
        self.prev = ev.id
        self.public = ev.author
        return ev


def history(rnd: random.Random, n_auctions: int = 12, n_prov: int = 5, n_rec: int = 4,
            span: int = 40) -> list[Event]:
    """Events in canonical order (strictly increasing ts_ms)."""
    provs = [Actor(f"p{i}") for i in range(n_prov)]
    recs = [Actor(f"r{i}") for i in range(n_rec)]
    for a in provs + recs:  # learn public keys
        a.public = sign_event(a.seed, 1, None, 0, Offer(services=(), currency="EUR", addrs=()),
                              NETWORK).author
    out: list[Event] = []
    m = Market()
    t = [10]

    def emit(actor: Actor, body: Body) -> Event:
        t[0] += rnd.randint(1, 3)
        ev = actor.sign(body, t[0])
        out.append(ev)
        m.apply(ev)
        return ev

    # what is open: request -> (recipient, commits {prov: (commit, price, nonce)})
    open_: list[dict[str, Any]] = []
    leases: list[tuple[Event, Actor]] = []
    made = 0
    while made < n_auctions or open_ or leases:
        now = t[0]
        r = rnd.random()
        if made < n_auctions and r < 0.12:
            rec = rnd.choice(recs)
            sealed, group = rnd.random() < 0.3, rnd.random() < 0.2
            close = now + rnd.randint(10, span)
            req = Request(service="bandwidth", chain=(), start_ms=close + 60,
                          duration_ms=rnd.randint(5, 60), max_rate_bps=None,
                          min_rate_bps=None, reserve=100,
                          members=Members(devices=tuple(r.public for r in recs[:-1])
                                          if group else ()),
                          currency="EUR", close_ms=close,
                          reveal_ms=close + (20 if sealed else 0),
                          rule=rnd.choice(RULES if sealed else RULES[::2]),
                          sealed=sealed, group=group)
            ev = emit(rec, req)
            open_.append({"req": ev, "rec": rec, "commits": {}, "pledged": set()})
            made += 1
        elif open_ and r < 0.55:
            o = rnd.choice(open_)
            req: Request = o["req"].body
            if now <= req.close_ms:
                if req.group and rnd.random() < 0.3:
                    who = rnd.choice(recs)
                    willing = rnd.random() < 0.7
                    emit(who, Pledge(request=o["req"].id, willing=willing,
                                     amount=rnd.randint(0, 80) if willing else 0, sponsor=()))
                    continue
                p = rnd.choice(provs)
                price = rnd.randint(20, 120)
                if req.sealed:
                    nonce = rnd.randbytes(16)
                    c = emit(p, Commit(request=o["req"].id,
                                       commitment=commitment_hash(o["req"].id, price, nonce)))
                    o["commits"][p] = (c, price, nonce)
                else:
                    emit(p, Bid(request=o["req"].id, price=price))
            elif req.sealed and now <= req.reveal_ms and o["commits"]:
                p = rnd.choice(list(o["commits"]))
                c, price, nonce = o["commits"].pop(p)
                if rnd.random() < 0.1:
                    price += 1  # a mismatching reveal
                emit(p, Reveal(commit=c.id, price=price, nonce=nonce))
            elif now > req.reveal_ms:
                open_.remove(o)
                a = m.auctions.get(o["req"].id)
                if a is None or rnd.random() < 0.1:
                    continue  # never awarded
                aw = build_award(m, a)
                if rnd.random() < 0.15 and a.valid_bids():
                    aw = Award(request=aw.request, winner=a.valid_bids()[-1].id,
                               price=aw.price + 1, considered=aw.considered,
                               considered_digest=aw.considered_digest,
                               considered_count=aw.considered_count)
                ev = emit(o["rec"], aw)
                if ev.id in m.leases:
                    leases.append((ev, o["rec"]))
        elif leases and r < 0.85:
            ev, rec = rnd.choice(leases)
            lease = m.leases[ev.id]
            prov = next(p for p in provs if p.public == lease.provider)
            x = rnd.random()
            if x < 0.35:
                emit(rec, Payment(lease=ev.id, amount=lease.price, currency="EUR",
                                  method="card", reference="x", on_behalf=()))
            elif x < 0.55:
                emit(rec, Rating(lease=ev.id, subject=lease.provider, role="provider",
                                 satisfied=rnd.random() < 0.8, score=rnd.randint(1, 5)))
            elif x < 0.7:
                emit(prov, Rating(lease=ev.id, subject=lease.recipient, role="recipient",
                                  satisfied=True, score=rnd.randint(3, 5)))
            elif x < 0.8:
                other = rnd.choice([p for p in provs if p is not prov])
                sc = emit(prov, Subcontract(lease=ev.id, contractor=other.public,
                                            services=("zstd",), segments=1, bytes_in=1,
                                            result_digest=bytes(32)))
                emit(prov, Rating(lease=sc.id, subject=other.public, role="provider",
                                  satisfied=rnd.random() < 0.5, score=rnd.randint(1, 5)))
            elif x < 0.9:
                emit(prov, Usage(lease=ev.id, members=(), shortfall_ms=0, rate_limited=0,
                                 subcontracts=0))
            else:
                leases.remove((ev, rec))
        elif r < 0.9:
            p = rnd.choice(provs)
            emit(p, Offer(services=(ServiceOffer(name="zstd", price=rnd.randint(1, 9),
                                                 capacity=100),), currency="EUR", addrs=()))
        elif r < 0.95:
            junk = rnd.randbytes(32)  # refers to nothing (or to something never seen)
            who = rnd.choice(provs + recs)
            emit(who, rnd.choice([Bid(request=junk, price=5),
                                  Reveal(commit=junk, price=5, nonce=b"n" * 16),
                                  Rating(lease=junk, subject=provs[0].public,
                                         role="provider", satisfied=True, score=3),
                                  Payment(lease=junk, amount=1, currency="EUR",
                                          method="card", reference="", on_behalf=())]))
        else:
            t[0] += rnd.randint(0, 5)
    return out


def snapshot(m: Market) -> dict[str, Any]:
    """Everything a Market exposes, orders included."""
    keys = sorted({*m.reputation.keys(), *(o for o in m.offers)})
    times = sorted({0, m.now_ms, *(a.request.close_ms for a in m.auctions.values())})
    return {
        "json": views.market_json(m),
        "auctions": list(m.auctions.items()),
        "awards": list(m.awards.items()),
        "leases": list(m.leases.items()),
        "paid": list(m.paid.items()),
        "payments": list(m.payments.items()),
        "ratings": list(m.ratings.items()),
        "subcontracts": list(m.subcontracts.items()),
        "usage": list(m.usage.items()),
        "offers": list(m.offers.items()),
        "ignored": list(m.ignored),
        "evidence": list(m.evidence),
        "count": m.reputation.count,
        "now_ms": m.now_ms,
        # the readers' indexes (times ascending, then once more from the start)
        "open": [(t, [a.id for a in m.open_auctions(t)]) for t in [*times, *times]],
        "leases_of": [(k, [x.id for x in m.leases_of(k)]) for k in sorted(
            {p for x in m.leases.values() for p in (x.provider, *x.keys)})],
        "scores": [(m.reputation.score(k, role, at), m.settled(k, at))
                   for k in keys for role in ("provider", "recipient") for at in times],
    }
