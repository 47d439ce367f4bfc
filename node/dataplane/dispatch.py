"""Dispersal: run one step of a segment's chain here (WorkerPool) or at another provider
(the process protocol), verify remote results, re-dispatch on failure, and keep the
per-contractor record a `Subcontract` event is made from."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import socket
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

from ..auction import Market, RankedOffer, rank_offers
from ..errors import (
    BidmeshError,
    OperationError,
    PeerError,
    ProcessingError,
    Reason,
)
from ..events import Subcontract
from ..p2p import P2PHost, RequestRefused, peer_id_from_pubkey, request
from ..processors import ProcessContext, Processor, output_bounds, run_chain, verify_result
from ..processors.pool import WorkerPool
from ..segments import Step
from .contractors import choose, dial_target
from .egress import EgressPolicy
from .session import ProcessSession
from .wire import ProcessRequest, decode_outputs, process_protocol, session_protocol

__all__ = ["Contracts", "Dispatcher", "failure_kind"]

log = logging.getLogger(__name__)

_RANK_TTL_S = 1.0
_MAX_SUB_SERVICES = 8  # Subcontract.services holds at most 8 names
_MAX_STEP = 8  # services in one step (a chain holds at most 8)
_LEASE_RETRY_S = 0.25
_MAX_ADDRS = 8  # offer addresses (and resolved IPs) tried per contractor


@dataclass
class _Work:
    services: list[str] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)
    bytes_in: int = 0
    digests: dict[tuple[int, int], bytes] = field(default_factory=dict)


def failure_kind(e: BidmeshError) -> str:
    """How a failed remote attempt is counted: "garbage" when the contractor's answer
    came whole and was wrong (malformed, oversized, not verifying), "failed" when no
    answer came: unreachable, refused, timed out, reset, or cut off inside a frame. A
    contractor whose host goes away mid-answer is cut off or reset depending on which
    reaches us first; it is the same failure either way."""
    if isinstance(e, RequestRefused) or (isinstance(e, PeerError)
                                         and e.reason == Reason.TRUNCATED):
        return "failed"
    return "garbage" if isinstance(e, ProcessingError | PeerError) else "failed"


class Contracts:
    """What each contractor did for one stream (verified results only)."""

    def __init__(self) -> None:
        self.by: dict[bytes, _Work] = {}

    def add(self, contractor: bytes, step: Step, seq: int, data: bytes, result: bytes) -> None:
        w = self.by.setdefault(contractor, _Work())
        for s in step.services:
            if s not in w.services and len(w.services) < _MAX_SUB_SERVICES:
                w.services.append(s)
        w.seqs.add(seq)
        w.bytes_in += len(data)
        w.digests[(seq, step.start)] = hashlib.sha256(result).digest()

    @property
    def segments(self) -> int:
        return sum(len(w.seqs) for w in self.by.values())

    def bodies(self, lease: bytes) -> list[Subcontract]:
        """One `Subcontract` per contractor; result_digest = sha256 over the result
        digests ordered by (seq, chain position)."""
        out = []
        for contractor, w in sorted(self.by.items()):
            digest = hashlib.sha256(b"".join(w.digests[k] for k in sorted(w.digests))).digest()
            out.append(Subcontract(lease=lease, contractor=contractor,
                                   services=tuple(w.services), segments=len(w.seqs),
                                   bytes_in=w.bytes_in, result_digest=digest))
        return out


class Dispatcher:
    """Runs steps; shared by every stream of a DataplaneService."""

    def __init__(
        self,
        host: P2PHost,
        network: str,
        pool: WorkerPool,
        local: frozenset[str],
        market: Callable[[], Market],
        clock: Callable[[], int],
        *,
        local_attempts: int,
        max_attempts: int,
        remote_in_flight: int,
        timeout_s: float,
        connect_timeout_s: float,
        max_result: int,
        bad_for_s: float,
        counters: Counter[str],
        session_idle_s: float = 30.0,
        lease_wait_s: float = 5.0,
        unrated: str = "fallback",
        min_score_ppm: int = 0,
        addr_policy: EgressPolicy | None = None,
    ) -> None:
        self.host = host
        self.protocol = process_protocol(network)
        self.session_protocol = session_protocol(network)
        self.session_idle_s = session_idle_s
        self.lease_wait_s = lease_wait_s
        self.unrated, self.min_score_ppm = unrated, min_score_ppm
        choose([], unrated, min_score_ppm)  # UsageError now for a bad policy
        self.addr_policy = addr_policy or EgressPolicy()  # non-global addresses refused
        self.nursery: trio.Nursery | None = None
        """Where process sessions run; set by `DataplaneService.run`. Without it every
        remote step is one `/process/1` request."""
        self.pool = pool
        self.local = local
        self.processors: Mapping[str, Processor] = pool.processors
        self.market = market
        self.clock = clock
        self.local_attempts = local_attempts
        self.max_attempts = max_attempts
        self.remote_in_flight = remote_in_flight
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_result = max_result
        self.bad_for_s = bad_for_s
        self.counters = counters
        self._bad: dict[bytes, float] = {}  # contractor -> trio time until which we avoid it
        self._limits: dict[bytes, trio.Semaphore] = {}
        self._dialing: dict[bytes, trio.Lock] = {}
        self._ranked: dict[tuple[str, ...], tuple[float, list[RankedOffer]]] = {}
        self._sessions: dict[bytes, ProcessSession] = {}
        self._opening: dict[bytes, trio.Lock] = {}
        self._no_session: dict[bytes, float] = {}  # contractor -> trio time: use /1 until

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------------ choosing

    def candidates(self, services: tuple[str, ...]) -> list[RankedOffer]:
        """Other providers offering every service of the step that our policy lets us
        hire (contractors.choose), best first (cached 1 s)."""
        now = trio.current_time()
        hit = self._ranked.get(services)
        if hit is not None and now - hit[0] < _RANK_TTL_S:
            return hit[1]
        ranked = rank_offers(self.market(), services[0], self.clock(), exclude=self.host.pubkey)
        need = set(services)
        able = [r for r in ranked
                if need <= {s.name for s in self.market().offers[r.provider].offer.services}]
        out = choose(able, self.unrated, self.min_score_ppm)
        if len(out) < len(able):
            self.counters["contractors_passed_over"] += len(able) - len(out)
        self._ranked[services] = (now, out)
        return out

    def is_bad(self, provider: bytes) -> bool:
        until = self._bad.get(provider)
        if until is None:
            return False
        if trio.current_time() >= until:
            del self._bad[provider]
            return False
        return True

    def mark_bad(self, provider: bytes) -> None:
        self._bad[provider] = trio.current_time() + self.bad_for_s

    # ------------------------------------------------------------------ running

    async def run_local(self, services: tuple[str, ...], data: bytes,
                        ctx: ProcessContext) -> bytes:
        """In a worker process, unless every processor says it is `inline` (free)."""
        procs = [self.processors.get(s) for s in services]
        if all(getattr(p, "inline", False) is True for p in procs):
            await trio.lowlevel.checkpoint()
            return run_chain(self.processors, services, data, ctx)
        return await self.pool.run_chain(services, data, ctx)

    async def run_step(self, step: Step, data: bytes, ctx: ProcessContext,
                       contracts: Contracts) -> tuple[bytes, int]:
        """Result of the step and the number of failed attempts before it.

        Local steps try the pool `local_attempts` times, then other providers; remote
        steps go to the best-ranked provider not yet tried (nor recently failed), at
        most `max_attempts` tries in all. ProcessingError when nobody could do it."""
        errors: list[str] = []
        attempts = 0
        if step.local:
            while attempts < min(self.local_attempts, self.max_attempts):
                attempts += 1
                try:
                    return await self.run_local(step.services, data, ctx), attempts - 1
                except ProcessingError as e:
                    self.counters["local_failed"] += 1
                    errors.append(f"here: {e}")
        tried: set[bytes] = set()
        waited = 0.0
        while attempts < self.max_attempts:
            cands = [c for c in self.candidates(step.services) if c.provider not in tried]
            healthy = [c for c in cands if not self.is_bad(c.provider)]
            if not (healthy or cands):
                break
            cand = (healthy or cands)[0]
            tried.add(cand.provider)
            attempts += 1
            try:
                outputs = await self._call(cand, step, data, ctx)
                await self._verify(step, data, outputs, ctx)
            except BidmeshError as e:
                if (isinstance(e, RequestRefused) and e.reason == Reason.NO_LEASE
                        and waited < self.lease_wait_s):
                    # The lease has not reached the contractor yet (the award gossips
                    # while the member already streams): not its fault; ask again soon.
                    self.counters["contractor_no_lease"] += 1
                    tried.discard(cand.provider)
                    attempts -= 1
                    await trio.sleep(_LEASE_RETRY_S)
                    waited += _LEASE_RETRY_S
                    continue
                self.counters[f"contractor_{failure_kind(e)}"] += 1
                if isinstance(e, PeerError) and e.reason in (Reason.OVERSIZED,
                                                             Reason.OVERSIZED_RESPONSE):
                    self.counters["contractor_oversized"] += 1  # refused unread
                if not (isinstance(e, RequestRefused) and e.reason == Reason.BUSY):
                    self.mark_bad(cand.provider)
                errors.append(f"{cand.provider.hex()[:12]}: {e}")
                log.info("segment %d step %s at %s failed: %s", ctx.seq, step.services,
                         cand.provider.hex()[:12], e)
                continue
            contracts.add(cand.provider, step, ctx.seq, data, outputs[-1])
            self.counters["subcontracted_steps"] += 1
            return outputs[-1], attempts - 1
        detail = "; ".join(errors[-3:]) or "no provider offers it"
        raise ProcessingError(
            f"nobody could process {'→'.join(step.services)} for segment {ctx.seq} "
            f"after {attempts} attempt(s): {detail}"
        )

    async def _connect(self, cand: RankedOffer) -> None:
        peer = peer_id_from_pubkey(cand.provider)
        if self.host.is_connected(peer):
            return
        lock = self._dialing.setdefault(cand.provider, trio.Lock())
        async with lock:
            if self.host.is_connected(peer):
                return
            if self.is_bad(cand.provider):
                # Segments queued behind a dial that just failed must not each redial
                # the same dead peer (a window of them would stall the stream).
                raise OperationError(f"provider {peer} failed recently; not redialling")
            last: BidmeshError | None = None
            refused = 0
            for addr in cand.addrs[:_MAX_ADDRS]:
                checked = await self._dialable(addr)
                refused += not checked
                for full in checked:
                    try:
                        await self.host.connect(f"{full}/p2p/{peer}",
                                                timeout=self.connect_timeout_s)
                        return
                    except BidmeshError as e:
                        last = e
            why = last or (f"none of its {refused} offer address(es) passes our address "
                           "policy" if refused else "no addresses")
            raise OperationError(f"cannot reach provider {peer}: {why}")

    async def _dialable(self, addr: str) -> list[str]:
        """The forms of an offer address we may dial (`/ipN/IP/tcp/PORT`, without
        /p2p/), each IP checked by the address policy; a DNS name is resolved once
        and its checked IPs are what we dial. Refusals are counted."""
        target = dial_target(addr)
        if target is None:
            self.counters["contractor_addr_refused:unsupported"] += 1
            return []
        family, host, port, _ = target  # any /p2p/ part: we dial the candidate's own id
        ips: list[str] = [host]
        if family.startswith("dns"):
            want = {"dns4": socket.AF_INET, "dns6": socket.AF_INET6}.get(family, 0)
            try:
                with trio.fail_after(self.connect_timeout_s):
                    infos = await trio.socket.getaddrinfo(host, port, want,
                                                          socket.SOCK_STREAM)
            except (OSError, trio.TooSlowError):
                self.counters["contractor_addr_refused:resolve_failed"] += 1
                return []
            ips = list(dict.fromkeys(str(info[4][0]) for info in infos))[:_MAX_ADDRS]
        out = []
        for ip in ips:
            reason = self.addr_policy.check(ip, port)
            if reason is not None:
                self.counters[f"contractor_addr_refused:{reason}"] += 1
                continue
            out.append(f"/ip{ipaddress.ip_address(ip).version}/{ip}/tcp/{port}")
        return out

    async def _call(self, cand: RankedOffer, step: Step, data: bytes,
                    ctx: ProcessContext) -> list[bytes]:
        await self._connect(cand)
        limit = self._limits.setdefault(cand.provider, trio.Semaphore(self.remote_in_flight))
        req = ProcessRequest(ctx.lease_id, ctx.stream_id, ctx.seq, ctx.step, step.services,
                             ctx.key, data)
        n = len(step.services)
        # The declared expansion bound of each service: an answer longer than what the
        # request can legitimately produce is refused before it is read (issue 12 item 6).
        most = 1 + sum(4 + b for b in output_bounds(self.processors, step.services,
                                                       len(data), self.max_result))
        async with limit:
            session = await self._session(cand.provider)
            if session is not None:  # no checkpoint before call(): see ProcessSession.call
                return await session.call(req, n, self.timeout_s, most)
            reply = await request(self.host, peer_id_from_pubkey(cand.provider), self.protocol,
                                  req.encode(), max(most, 2048), self.timeout_s)
        return decode_outputs(reply, n)

    async def _session(self, provider: bytes) -> ProcessSession | None:
        """The open process session to `provider`, opening one if needed; None when
        sessions cannot run here (no nursery) or the contractor does not take them (an
        older node: it is asked with `/process/1` requests for `bad_for_s`)."""
        session = self._sessions.get(provider)
        if session is not None and session.usable:
            return session
        nursery = self.nursery
        if nursery is None or self._no_session.get(provider, -math.inf) > trio.current_time():
            return None
        async with self._opening.setdefault(provider, trio.Lock()):
            session = self._sessions.get(provider)
            if session is not None and session.usable:
                return session
            if self._no_session.get(provider, -math.inf) > trio.current_time():
                return None  # it failed while we waited for the lock
            peer = peer_id_from_pubkey(provider)
            try:
                stream = await self.host.new_stream(peer, self.session_protocol,
                                                    timeout=self.connect_timeout_s)
            except BidmeshError as e:
                self.counters["session_unavailable"] += 1
                self._no_session[provider] = trio.current_time() + self.bad_for_s
                log.info("no process session with %s (%s); using single requests", peer, e)
                return None
            session = ProcessSession(stream, str(peer), self.max_result * _MAX_STEP + 1033,
                                     self.session_idle_s)
            self._sessions[provider] = session
            self.counters["sessions_opened"] += 1
            nursery.start_soon(self._run_session, provider, session)
            return session

    async def _run_session(self, provider: bytes, session: ProcessSession) -> None:
        try:
            await session.run()
        finally:
            if self._sessions.get(provider) is session:
                del self._sessions[provider]
            if session.error is not None and not session.closing:
                log.info("process session to %s ended: %s", session.name, session.error)

    async def _verify(self, step: Step, data: bytes, outputs: list[bytes],
                      ctx: ProcessContext) -> None:
        def check() -> int:
            verified, inp = 0, data
            for i, (name, out) in enumerate(zip(step.services, outputs, strict=True)):
                at = ctx.at_step(ctx.step + i)
                verified += verify_result(self.processors, name, inp, out, at)
                inp = out
            return verified

        if all(getattr(self.processors.get(s), "inline", False) is True
               for s in step.services):
            # `inline` processors are free (identity: an equality check), and so is
            # checking them; a thread round trip would cost more.
            await trio.lowlevel.checkpoint()
            verified = check()
        else:
            # Verification is CPU work (decrypt, decompress): keep it off the trio thread.
            verified = await trio.to_thread.run_sync(check)
        if verified < len(step.services):
            self.counters["unverified_steps"] += 1
