"""Shared builders for the market tests: named identities publishing real signed
events into a real Ledger, then deriving from its canonical order."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from node.auction import Market, derive
from node.events import (
    Award,
    Bid,
    Commit,
    Event,
    Members,
    Payment,
    Pledge,
    Rating,
    Request,
    Reveal,
    commitment_hash,
    considered_digest,
)
from node.keys import Identity
from node.ledger import Ledger

CLOSE = 100
START = 200
DURATION = 100


def ident(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"test-key:" + name.encode()).digest())


def key(name: str) -> bytes:
    return ident(name).public


def request(**kw: Any) -> Request:
    d: dict[str, Any] = dict(
        service="bandwidth", chain=(), start_ms=START, duration_ms=DURATION,
        max_rate_bps=10_000_000, min_rate_bps=None, members=Members(), reserve=1000,
        currency="EUR", close_ms=CLOSE, reveal_ms=CLOSE, rule="lowest", sealed=False,
        group=False,
    )
    d.update(kw)
    if d["sealed"] and "reveal_ms" not in kw:
        d["reveal_ms"] = d["close_ms"] + 50
    return Request(**d)


def award(request_id: bytes, winner: bytes | None, price: int,
          considered: list[bytes] | None = None, *, listed: bool = True) -> Award:
    ids = considered or []
    return Award(request=request_id, winner=winner, price=price,
                 considered=tuple(ids) if listed else (),
                 considered_digest=considered_digest(ids), considered_count=len(ids))


def rating(lease: bytes, subject: str | bytes, role: str, satisfied: bool = True,
           score: int = 5) -> Rating:
    s = key(subject) if isinstance(subject, str) else subject
    return Rating(lease=lease, subject=s, role=role, satisfied=satisfied, score=score)


def payment(lease: bytes, amount: int, on_behalf: tuple[bytes, ...] = (),
            currency: str = "EUR") -> Payment:
    return Payment(lease=lease, amount=amount, currency=currency, method="card",
                   reference="ch_1", on_behalf=on_behalf)


class World:
    """A ledger plus named actors; `pub` signs and stores, `market` derives."""

    def __init__(self, path: Path, file: str = "ledger.db") -> None:
        self.ledger = Ledger(path / file, network="test")
        self.events: list[Event] = []

    def pub(self, who: str, body: Any, ts: int) -> Event:
        ev = self.ledger.publish(ident(who), body, ts)
        assert ev.ts_ms == ts, "tests publish each author's events in time order"
        self.events.append(ev)
        return ev

    def market(self) -> Market:
        return derive(self.ledger.iter_canonical())

    # convenience builders ------------------------------------------------

    def bid(self, who: str, req: Event, price: int, ts: int) -> Event:
        return self.pub(who, Bid(request=req.id, price=price), ts)

    def commit(self, who: str, req: Event, price: int, ts: int) -> tuple[Event, bytes]:
        nonce = os.urandom(16)
        c = self.pub(who, Commit(request=req.id,
                                 commitment=commitment_hash(req.id, price, nonce)), ts)
        return c, nonce

    def reveal(self, who: str, commit: Event, price: int, nonce: bytes, ts: int) -> Event:
        return self.pub(who, Reveal(commit=commit.id, price=price, nonce=nonce), ts)

    def pledge(self, who: str, req: Event, willing: bool, amount: int = 0,
               sponsor: tuple[str, ...] = (), ts: int = 50) -> Event:
        return self.pub(who, Pledge(request=req.id, willing=willing, amount=amount,
                                    sponsor=tuple(key(s) for s in sponsor)), ts)


def reasons(m: Market, ev: Event) -> list[str]:
    return [i.reason for i in m.ignored if i.event_id == ev.id]
