"""The provider agent as a daemon service: acts on `agent.provider_actions`.

Every `interval_s` (and at once when new events arrive) it derives the market,
asks the pure agent what to publish, and publishes it with the node key. Actions are
idempotent against the ledger (a bid already stored is not re-sent), so a restart
or a missed tick is harmless.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import trio

from . import addrs
from .agent import (
    ProviderPolicy,
    RatingPass,
    RecipientPolicy,
    offers_from_config,
    provider_plan,
)
from .errors import BidmeshError
from .events import Body, Event, Offer

if TYPE_CHECKING:
    from .context import NodeContext

log = logging.getLogger("bidmesh.provider")


class ProviderService:
    name = "provider"

    def __init__(self, policy: ProviderPolicy, interval_s: float = 0.5) -> None:
        self.policy = policy
        self.interval_s = interval_s
        self.published: Counter[str] = Counter()
        self.errors = 0
        self._wake = trio.Event()
        self._last_offer: Offer | None = None
        self.skipped: Counter[str] = Counter()  # auctions skipped, by reason
        self._skip_logged: set[bytes] = set()
        self._rating_pass = RatingPass()  # the rating pass costs what changed per tick

    def _on_events(self, events: list[Event]) -> None:
        self._wake.set()

    async def run(self, node: NodeContext) -> None:
        node.add_listener(self._on_events)
        while True:
            self.tick(node)
            with trio.move_on_after(self.interval_s):
                await self._wake.wait()
            self._wake = trio.Event()

    def tick(self, node: NodeContext) -> list[Body]:
        """One decision round; returns what was published."""
        now = int(time.time() * 1000)
        addrs = offer_addrs(node)
        if addrs != self.policy.addrs:
            # An interface address came or went (or announce changed): the offer
            # must say where the dataplane is reached, so it is published again.
            if self.policy.addrs:
                log.info("advertised addresses changed; publishing the offer again",
                         extra={"old": list(self.policy.addrs), "new": list(addrs)})
            self.policy = dataclasses.replace(self.policy, addrs=addrs)
        actions, skips = provider_plan(node.market(), node.identity.public,
                                       node.identity.seed, self.policy, now, self._last_offer,
                                       self._rating_pass)
        for sk in skips:  # logged and counted once per auction, not once per tick
            if sk.auction in self._skip_logged:
                continue
            if len(self._skip_logged) > 100_000:
                self._skip_logged.clear()
            self._skip_logged.add(sk.auction)
            self.skipped[sk.reason] += 1
            log.info("provider skipped a request", extra={
                "request": sk.auction.hex()[:16], "recipient": sk.recipient.hex()[:16],
                "reason": sk.reason, "detail": sk.detail})
        done = []
        for body in actions:
            try:
                ev = node.publish(body)
            except BidmeshError as e:
                self.errors += 1
                log.warning("provider action failed", extra={"kind": body.KIND, "error": str(e)})
                continue
            if isinstance(body, Offer):
                self._last_offer = body
            self.published[body.KIND] += 1
            log.info("provider published", extra={"kind": body.KIND, "id": ev.id.hex()[:16],
                                                  "ref": (ev.ref or b"").hex()[:16]})
            done.append(body)
        return done

    def status(self) -> dict[str, Any]:
        return {"published": dict(self.published), "errors": self.errors,
                "skipped": dict(self.skipped),
                "offers": [so.name for so in self.policy.offers],
                "offer_addrs": list(self.policy.addrs)}


def offer_addrs(node: NodeContext) -> tuple[str, ...]:
    """The dataplane addresses an offer carries: the advertised ones every node may
    be told (no loopback unless there is nothing else), at most 8."""
    return tuple(addrs.for_everyone(node.host.addrs)[:8])


def node_service(node: NodeContext) -> ProviderService | None:
    """Factory: a provider agent when `[provider] enabled = true`."""
    cfg = node.config.provider
    if not cfg.enabled:
        return None
    policy = ProviderPolicy(
        offers=offers_from_config(cfg.offers), currency=cfg.currency, addrs=offer_addrs(node),
        bid_services=frozenset(cfg.bid_services), rate_recipients=cfg.rate_recipients,
        note=cfg.note,
        recipients=RecipientPolicy(min_score_ppm=int(cfg.min_recipient_score * 10_000),
                                   new_recipient=cfg.new_recipient,
                                   risk_premium_pct=cfg.risk_premium_pct),
    )
    return ProviderService(policy, cfg.interval_s)
