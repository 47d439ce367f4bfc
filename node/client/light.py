"""`LightClient`: the recipient's views (auctions, bids, leases, reputation: folded
locally from verified events), its own chain (publish, confirm by quorum, resend), the
recipient's actions, and the dataplane and tunnels through a lease."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from .. import query
from ..agent import build_award
from ..auction import Lease, Market
from ..auction.views import lease_json
from ..errors import (
    InvalidEvent,
    OperationError,
    PeerError,
    Reason,
    RemoteError,
    UntrustedAnswer,
    UsageError,
)
from ..events import (
    Award,
    Body,
    Event,
    Members,
    Payment,
    Pledge,
    Rating,
    Request,
    decode_wire,
    sign_event,
)
from .results import (
    AuctionInfo,
    BidInfo,
    ChainHead,
    LeaseInfo,
    ReputationInfo,
    Unverified,
    _bid_infos,
    _unverified,
    lease_chain,
    now_ms,
)
from .transport import QueryClient, _Node
from .verify import _check_events, fold

if TYPE_CHECKING:  # libp2p costs ~1 s to import: loaded when a client actually connects
    from .. import p2p
    from ..dataplane.tunnel_client import Tunnel

log = logging.getLogger("bidmesh.client")

MAX_CONTEXT_AUCTIONS = 256  # auction bundles fetched per level to verify awards
_Results = list[tuple[str, "query.SubmitResult"]]  # (node, its answer) per submitted record


class LightClient(QueryClient):
    """A recipient's client. Create with `LightClient.open(...)` (an async context)."""

    # -------------------------------------------------------------- derived views

    def _fold(self, events: Iterable[Event]) -> Market:
        market, forks = fold(events)
        for f in forks:
            if f not in self.forks:
                self.forks.append(f)
        return market

    async def auction(self, request_id: bytes) -> AuctionInfo:
        """The auction re-derived from verified events, bids with reputation."""
        evs = await self.auction_events(request_id)
        return await self._auction_info(request_id, evs)

    async def _auction_info(self, request_id: bytes, evs: list[Event],
                            rep: list[Event] | None = None) -> AuctionInfo:
        if not any(e.id == request_id for e in evs):
            raise UsageError(f"no node knows a request {request_id.hex()}")
        if rep is None:
            # Bidders' records (best value, the table) and the recipient's (its
            # payment record beside the request).
            keys = {e.author for e in evs if e.kind in ("bid", "commit", "request")}
            rep = await self.reputation_events(keys) if keys else []
        market = self._fold([*evs, *rep])
        a = market.auctions.get(request_id)
        if a is None:
            reason = next((i.reason for i in market.ignored if i.event_id == request_id), "?")
            raise UsageError(f"request {request_id.hex()[:16]} does not open an auction "
                             f"({reason})")
        return AuctionInfo(market, a, tuple(_bid_infos(market, a)), a.status(now_ms()))

    async def bids(self, request_id: bytes) -> list[BidInfo]:
        """Bids of an auction: price, provider, status, reputation score and counts."""
        return list((await self.auction(request_id)).bids)

    async def watch_bids(self, request_id: bytes, *, interval: float = 1.0,
                         until_ms: int | None = None) -> AsyncIterator[AuctionInfo]:
        """Yield the auction now and again whenever its bids change. Ends once the
        auction has an outcome, or `until_ms` (default: the bid deadline plus 2
        intervals) has passed. Each poll fetches only what arrived since the last."""
        events: dict[bytes, Event] = {}
        cursors: dict[str, int] = {}
        rep: dict[bytes, Event] = {}
        have_rep: set[bytes] = set()
        last: tuple[Any, ...] | None = None
        check = self._auction_check(request_id)
        while True:
            async def fetch(n: _Node) -> list[Event]:
                evs, cur = await self._pages(
                    n, lambda p: query.AuctionBundle(request_id, p), cursors.get(n.addr, 0))
                cursors[n.addr] = cur
                check(n.addr, [*events.values(), *evs])
                return evs

            answers = await self._each(fetch)
            for _, evs in answers:
                for ev in evs:
                    events.setdefault(ev.id, ev)
            self._check_own(events.values())
            bidders = {e.author for e in events.values()
                       if e.kind in ("bid", "commit", "request")}
            if bidders - have_rep:
                for ev in await self.reputation_events(bidders - have_rep):
                    rep[ev.id] = ev
                have_rep |= bidders
            if request_id in events:
                info = await self._auction_info(request_id, list(events.values()),
                                                list(rep.values()))
                sig = (info.status, tuple((b.id, b.status, b.price) for b in info.bids))
                if sig != last:
                    last = sig
                    yield info
                deadline = until_ms if until_ms is not None else (
                    info.auction.deadline_ms + int(2000 * interval))
                if info.auction.outcome is not None or now_ms() > deadline:
                    return
            elif until_ms is not None and now_ms() > until_ms:
                raise UsageError(f"no node knows a request {request_id.hex()}")
            await trio.sleep(interval)

    async def with_award_context(self, events: list[Event], depth: int = 2) -> list[Event]:
        """`events` plus what verifying their awards needs: each award's auction bundle,
        and for `best_value` auctions the bidders' reputation bundles as of the close
        (whose own best-value awards need the same again: `depth` levels, bounded)."""
        have = {e.id: e for e in events}
        auctions_done: set[bytes] = set()
        rep_done: set[bytes] = set()
        for _ in range(depth):
            need = sorted({e.body.request for e in have.values() if isinstance(e.body, Award)}
                          - auctions_done)[:MAX_CONTEXT_AUCTIONS]
            if not need:
                break
            for rid in need:
                if not any(e.kind == "request" and e.id == rid for e in have.values()):
                    have.update((e.id, e) for e in await self.auction_events(rid))
                auctions_done.add(rid)
            bidders: set[bytes] = set()
            for rid in need:
                req = have.get(rid)
                if req is not None and isinstance(req.body, Request) \
                        and req.body.rule == "best_value":
                    bidders |= {e.author for e in have.values()
                                if e.kind in ("bid", "commit") and e.ref == rid}
            if bidders - rep_done:
                have.update((e.id, e) for e in await self.reputation_events(bidders - rep_done))
                rep_done |= bidders
        return list(have.values())

    async def leases(self) -> list[LeaseInfo]:
        """Leases we are a party to (recipient, provider, member device, group member)."""
        return (await self.lease_report())[0]

    async def lease_report(self) -> tuple[list[LeaseInfo], list[Unverified]]:
        """Our leases, and the awards of ours that do not verify even with everything
        fetched that verifying them needs, each with the reason (never dropped
        silently)."""
        own = await self.lease_events()  # the bundles of leases the nodes say are ours
        market = self._fold(await self.with_award_context(own))
        out = []
        for lease in market.leases.values():
            role = ("recipient" if lease.recipient == self.key else
                    "provider" if lease.provider == self.key else
                    "member" if self.key in lease.keys else None)
            if role is not None:
                out.append(LeaseInfo(lease, market.paid.get(lease.id, 0), role,
                                     lease_json(market, lease)))
        bad = [_unverified(market, e) for e in own if isinstance(e.body, Award)
               and e.body.winner is not None and e.id not in market.leases]
        return out, [b for b in bad if b is not None]

    async def lease(self, lease_id: bytes) -> tuple[Market, Lease]:
        events = await self.lease_events()
        if not any(e.id == lease_id and e.kind == "award" for e in events):
            events += await self.get_events([lease_id])
        events = await self.with_award_context(events)
        market = self._fold(events)
        lease = market.leases.get(lease_id)
        if lease is None:
            award = next((e for e in events if e.id == lease_id), None)
            why = _unverified(market, award) if award is not None else None
            raise UsageError(f"no lease {lease_id.hex()[:16]} of ours is known to the nodes"
                             + (f": its award does not verify ({why.reason})" if why else
                                " (is the award accepted? see `bidmesh client leases`)"))
        return market, lease

    async def reputation(self, key: bytes, as_of_ms: int | None = None) -> ReputationInfo:
        """A key's reputation in both roles, re-derived from its rating bundle."""
        # The rated deals' awards verify only with their bidders' reputations (best
        # value), so fetch those too: a rating on a lease that does not verify counts
        # for nothing, which showed a recipient at 50 % with 0 ratings.
        market = self._fold(await self.with_award_context(await self.reputation_events([key])))
        t = now_ms() if as_of_ms is None else as_of_ms
        return ReputationInfo(key, t, market.reputation.score(key, "provider", t),
                              market.reputation.score(key, "recipient", t))

    # -------------------------------------------------------------- own chain

    async def sync_head(self) -> ChainHead:
        """Move our head forward to the highest chain of ours a node can prove.

        Each node's claim about our head is only a claim: nodes are tried from the
        highest claim down, and a node that cannot prove its claim with a chain of our
        own signed events linking to our head is faulted and outvoted by the next. A
        lying node never blocks us; at worst we keep the head we have."""
        async def heads(n: _Node) -> query.HeadInfo:
            resp = await self._call(n, query.GetHeads((self.key,)))
            if not isinstance(resp, query.Heads) or len(resp.heads) != 1 \
                    or resp.heads[0].author != self.key:
                raise UntrustedAnswer(f"node {n.addr} answered HEADS wrongly", Reason.WRONG_ANSWER)
            return resp.heads[0]

        answers = await self._each(heads)
        for n, claim in sorted(answers, key=lambda a: -a[1].seq):
            if claim.seq <= self.state.head.seq:
                break
            try:
                await self._adopt_chain(n, claim.seq)
                break
            except UntrustedAnswer as e:
                self._fault(n.addr, e.reason, str(e))
            except (PeerError, OperationError) as e:
                self._fault(n.addr, getattr(e, "reason", type(e).__name__), str(e))
        self._head_checked = True
        return self.state.head

    async def _adopt_chain(self, n: _Node, claimed: int) -> None:
        """Fetch our events after our head from `n`; adopt them if they link and reach
        the seq it claimed (UntrustedAnswer otherwise, leaving our head as it was)."""
        h = self.state.head
        evs, _ = await self._pages(n, lambda p: query.FindEvents(None, self.key, None, p))
        chain = sorted((e for e in evs if e.author == self.key and e.seq > h.seq),
                       key=lambda e: e.seq)
        prev, seq, ts = h.id, h.seq, h.ts_ms
        for ev in chain:
            if ev.seq != seq + 1 or ev.prev != prev:
                raise UntrustedAnswer(f"node {n.addr} returned our events with a broken "
                                      f"chain at seq {ev.seq}", Reason.BAD_CHAIN)
            prev, seq, ts = ev.id, ev.seq, ev.ts_ms
        if seq < claimed:
            raise UntrustedAnswer(f"node {n.addr} claims our head is seq {claimed} "
                                  f"but proves only {seq}", Reason.BAD_CHAIN)
        self.state.head = ChainHead(seq, prev, ts)
        self.state.save()

    @property
    def quorum(self) -> int:
        """How many of our nodes must hand a record back before we drop our copy."""
        return self.confirm_quorum or len(self.nodes) // 2 + 1

    def pending(self) -> list[Event]:
        """Our signed records no quorum of our nodes has yet proven to hold, oldest
        first: kept in the state file and re-submitted by every command."""
        return [decode_wire(w, self.network, verify=False) for w in self.state.unconfirmed]

    async def _submit(self, wires: Sequence[bytes]) -> dict[bytes, _Results]:
        """Submit to every node; per wire, each answering node's result."""
        async def send(n: _Node) -> list[query.SubmitResult]:
            resp = await self._call(n, query.Submit(tuple(wires)))
            if not isinstance(resp, query.Submitted) or len(resp.results) != len(wires):
                raise UntrustedAnswer(f"node {n.addr} answered SUBMIT wrongly", Reason.WRONG_ANSWER)
            return list(resp.results)

        out: dict[bytes, list[tuple[str, query.SubmitResult]]] = {w: [] for w in wires}
        for n, results in await self._each(send):
            for w, r in zip(wires, results, strict=True):
                out[w].append((n.addr, r))
        return out

    async def holders(self, ids: Sequence[bytes]) -> dict[bytes, set[str]]:
        """Which of our nodes hand back each event by id (verified, byte-identical to
        what was asked for): the proof that a node holds it, unlike its word."""
        want = set(ids)
        out: dict[bytes, set[str]] = {i: set() for i in want}

        async def fetch(n: _Node) -> None:
            resp = await self._call(n, query.GetEvents(tuple(sorted(want))[:query.MAX_IDS]))
            if not isinstance(resp, query.EventsPage):
                raise UntrustedAnswer(f"node {n.addr} answered GET with "
                                      f"{type(resp).__name__}", Reason.WRONG_ANSWER)
            for ev in _check_events(n.addr, resp.records, self.network):
                if ev.id in want:
                    out[ev.id].add(n.addr)

        with contextlib.suppress(PeerError, OperationError):  # faults are recorded
            await self._each(fetch)
        return out

    async def _flush_unconfirmed(self) -> dict[bytes, _Results]:
        """Re-submit every unconfirmed record (in chain order), then drop those a
        quorum of our nodes hands back. A node saying "accepted" proves nothing."""
        if not self.state.unconfirmed:
            return {}
        wires = list(self.state.unconfirmed)[:query.MAX_IDS]
        try:
            results = await self._submit(wires)
        except (PeerError, OperationError) as e:
            log.warning("no node took our unconfirmed records", extra={"error": str(e)})
            return {}
        ids = [decode_wire(w, self.network, verify=False).id for w in wires]
        held = await self.holders(ids)
        done = {w for w, i in zip(wires, ids, strict=True) if len(held[i]) >= self.quorum}
        if done:
            self.state.unconfirmed = [w for w in self.state.unconfirmed if w not in done]
            self.state.save()
        return results

    async def flush(self) -> list[Event]:
        """Re-submit our unconfirmed records; return those still unconfirmed."""
        async with self._lock:
            await self._flush_unconfirmed()
        return self.pending()

    async def publish(self, body: Body | Callable[[int], Body]) -> Event:
        """Sign `body` as our next event, submit it to every node, and keep it in our
        state file until a quorum of our nodes hands it back (`pending()`). A callable
        is given the event's timestamp and returns the body (times relative to it)."""
        async with self._lock:
            await self._flush_unconfirmed()
            await self.sync_head()
            h = self.state.head
            ts = max(now_ms(), h.ts_ms)
            if not isinstance(body, Body):
                body = body(ts)
            ev = sign_event(self.identity.seed, h.seq + 1, h.id, ts, body, self.network)
            before = ChainHead(h.seq, h.id, h.ts_ms)
            # Write ahead: once signed and sent, this is our event at this seq forever.
            self.state.head = ChainHead(ev.seq, ev.id, ev.ts_ms)
            self.state.unconfirmed = [*self.state.unconfirmed, ev.wire]
            self.state.save()
            mine = (await self._flush_unconfirmed()).get(ev.wire, [])
            if not mine and ev.wire in self.state.unconfirmed:
                raise OperationError("no node took the event; it is kept and resent by the "
                                     "next command (see `bidmesh client whoami`)")
            for node, r in mine:
                if not r.ok:
                    self._fault(node, r.reason or r.status, f"refused our event: {r.detail}")
            # Forget the event only when every one of our nodes answered and each
            # rejected it as invalid: then no node holds it and the seq is free again.
            # Anything less (one node unreachable, one "accepted") keeps it, since
            # re-signing that seq could fork our own chain.
            answered = {node for node, _ in mine}
            if all(r.status == "rejected" for _, r in mine) \
                    and answered >= {n.addr for n in self.nodes}:
                self.state.head = before
                self.state.unconfirmed = [w for w in self.state.unconfirmed if w != ev.wire]
                self.state.save()
                node, r = mine[0]
                raise RemoteError(f"node {node} rejected the {body.KIND} ({r.reason}): "
                                  f"{r.detail}")
            return ev

    # -------------------------------------------------------------- recipient actions

    async def request(
        self, service: str, *, duration_ms: int, reserve: int, currency: str = "EUR",
        close_ms: int | None = None, close_in_ms: int = 60_000, start_ms: int | None = None,
        chain: Sequence[str] = (), max_rate_bps: int | None = None,
        min_rate_bps: int | None = None, devices: Sequence[bytes] = (),
        phones: Sequence[str] = (), users: Sequence[str] = (), max_devices: int | None = None,
        rule: str = "lowest", sealed: bool = False, reveal_ms: int | None = None,
        reveal_window_ms: int = 30_000, group: bool = False, note: str = "",
    ) -> Event:
        """Post a request (an auction). Times are ms since the epoch; by default bids
        close `close_in_ms` after the request's own timestamp, sealed bids are revealed
        within `reveal_window_ms` after that, and the lease starts at the bid deadline."""
        def build(posted_ms: int) -> Request:
            # From the signed timestamp, not from before the round trips publish()
            # makes first: on a slow link or a loaded host those took longer than a
            # short window, and the request closed before it was posted.
            close = close_ms if close_ms is not None else posted_ms + close_in_ms
            reveal = reveal_ms if reveal_ms is not None else (
                close + reveal_window_ms if sealed else close)
            try:
                return Request(
                    service=service, chain=tuple(chain),
                    start_ms=start_ms if start_ms is not None else reveal,
                    duration_ms=duration_ms, max_rate_bps=max_rate_bps,
                    min_rate_bps=min_rate_bps,
                    members=Members(devices=tuple(devices), phones=tuple(phones),
                                    users=tuple(users), max_devices=max_devices),
                    reserve=reserve, currency=currency, close_ms=close, reveal_ms=reveal,
                    rule=rule, sealed=sealed, group=group, note=note)
            except InvalidEvent as e:
                raise UsageError(f"invalid request: {e}") from e

        build(now_ms())  # a bad request is refused before any network traffic
        return await self.publish(build)

    async def award(self, request_id: bytes) -> tuple[Event, Award]:
        """Award our auction to the winner the rule gives over every valid bid (as
        re-derived here), naming every bid considered."""
        info = await self.auction(request_id)
        a = info.auction
        if a.recipient != self.key:
            raise UsageError("only the recipient who posted the request can award it")
        if a.outcome is not None:
            raise UsageError(f"auction already decided ({a.status(now_ms())})")
        if now_ms() <= a.deadline_ms:
            raise UsageError(f"bids are final only after {a.deadline_ms} "
                             f"(in {(a.deadline_ms - now_ms()) / 1000:.1f} s); award then")
        body = build_award(info.market, a)
        return await self.publish(body), body

    async def pledge(self, request_id: bytes, *, willing: bool = True, amount: int = 0,
                     sponsor: Sequence[bytes] = ()) -> Event:
        """Join a group request: whether we pay, at most how much, and whom we sponsor."""
        info = await self.auction(request_id)
        if not info.auction.request.group:
            raise UsageError("that request is not a group request")
        try:
            body = Pledge(request=request_id, willing=willing, amount=amount,
                          sponsor=tuple(sponsor))
        except InvalidEvent as e:
            raise UsageError(f"invalid pledge: {e}") from e
        return await self.publish(body)

    async def pay(self, lease_id: bytes, amount: int | None = None, method: str = "ledger",
                  reference: str = "", on_behalf: Sequence[bytes] = ()) -> Event:
        """Pay for a lease. Default amount: our share (group) or what is still owed."""
        market, lease = await self.lease(lease_id)
        if self.key != lease.recipient and self.key not in lease.group_members:
            raise UsageError("only the recipient or a group member pays for a lease")
        if amount is None:
            share = lease.shares().get(self.key) if lease.group_members else None
            mine = sum(p.amount for p in market.payments.get(lease.id, ())
                       if p.payer == self.key)
            owed = lease.price - market.paid.get(lease.id, 0)
            amount = max(0, (share - mine) if share is not None else owed)
            if amount == 0:
                raise UsageError(f"nothing is owed on lease {lease.id.hex()[:16]} by us; "
                                 "pass --amount to pay more anyway")
        try:
            body = Payment(lease=lease.id, amount=amount, currency=lease.currency,
                           method=method, reference=reference, on_behalf=tuple(on_behalf))
        except InvalidEvent as e:
            raise UsageError(f"invalid payment: {e}") from e
        return await self.publish(body)

    async def rate(self, lease_id: bytes, *, satisfied: bool, score: int,
                   text: str = "") -> Event:
        """Rate the other party of a lease (a member device rates the provider)."""
        market, lease = await self.lease(lease_id)
        if any(r.rater == self.key for r in market.ratings.get(lease.id, ())):
            raise UsageError(f"we already rated lease {lease.id.hex()[:16]}; a lease is rated "
                             "once per side")
        if self.key == lease.provider:
            subject, role = lease.recipient, "recipient"
        elif self.key in lease.keys:
            subject, role = lease.provider, "provider"
        else:
            raise UsageError("only the parties of a lease can rate it")
        try:
            body = Rating(lease=lease.id, subject=subject, role=role, satisfied=satisfied,
                          score=score, text=text)
        except InvalidEvent as e:
            raise UsageError(f"invalid rating: {e}") from e
        return await self.publish(body)

    # -------------------------------------------------------------- dataplane

    async def provider_addrs(self, provider: bytes) -> list[str]:
        """Dataplane multiaddrs from the provider's latest offer (verified)."""
        offers = await self.find_events(kind="offer", author=provider)
        if not offers:
            return []
        latest = max(offers, key=lambda e: e.seq)
        return list(getattr(latest.body, "addrs", ()))

    async def stream(self, lease_id: bytes, source: Any, *,
                     sink: Callable[[bytes], Any] | None = None,
                     chains: Sequence[Sequence[str]] | None = None, protocol: str = "lp",
                     delegation: bytes | None = None, timeout: float = 60.0) -> Any:
        """Send `source` (bytes chunks of `protocol` packets) through the provider of
        our lease and receive the processed stream (see node/dataplane/client.py).
        A member device streams with its own key. Returns the dataplane's result."""
        from ..dataplane.client import stream_through_lease

        _, lease = await self.lease(lease_id)
        from ..p2p import peer_id_from_pubkey

        peer = peer_id_from_pubkey(lease.provider)
        if not self.host.is_connected(peer):
            addrs = await self.provider_addrs(lease.provider)
            for a in [*addrs, *(n.addr for n in self.nodes)]:
                if a.endswith(str(peer)):
                    with contextlib.suppress(OperationError):
                        await self.host.connect(a, timeout=self.timeout)
                        break
            else:
                if not self.host.is_connected(peer):
                    raise OperationError(f"cannot reach provider {lease.provider.hex()[:16]}: "
                                         "no dialable address in its offer")
        use_chains = chains or [lease_chain(lease)]
        return await stream_through_lease(
            self.host, peer, lease, self.identity, source, protocol, use_chains,
            network=self.network, delegation=delegation, sink=sink, timeout=timeout)


    # -------------------------------------------------------------- tunnels (bandwidth)

    async def reach_provider(self, lease: Lease) -> p2p.PeerId:
        """The lease's provider, connected (dialed through its offer's addresses)."""
        from ..p2p import peer_id_from_pubkey

        peer = peer_id_from_pubkey(lease.provider)
        if self.host.is_connected(peer):
            return peer
        addrs = await self.provider_addrs(lease.provider)
        errors = []
        for a in [*addrs, *(n.addr for n in self.nodes)]:
            if a.endswith(str(peer)):
                try:
                    await self.host.connect(a, timeout=self.timeout)
                    return peer
                except OperationError as e:
                    errors.append(f"{a}: {e}")
        if self.host.is_connected(peer):
            return peer
        raise OperationError(f"cannot reach provider {lease.provider.hex()[:16]}: "
                             + ("; ".join(errors[:3]) if errors else
                                "no dialable address in its offer"))

    async def open_tunnel(self, lease: bytes | Lease, host: str, port: int, *,
                          delegation: bytes | None = None,
                          timeout: float | None = None) -> Tunnel:
        """Open a tunnel to `host:port` through the provider of a bandwidth lease
        (docs/dataplane.md §14): a trio HalfCloseableStream. The provider resolves
        `host`. Raises TunnelUnauthorized / TunnelRefused (`.reason`) when refused,
        OperationError when the provider cannot be reached; reading or writing an open
        tunnel raises TunnelFailed (`lease_ended`, `broken`, ...)."""
        from ..dataplane.tunnel_client import open_tunnel

        if not isinstance(lease, Lease):
            _, lease = await self.lease(lease)
        peer = await self.reach_provider(lease)
        return await open_tunnel(self.host, peer, lease.id, host, port, network=self.network,
                                 delegation=delegation, timeout=timeout or self.timeout)
