"""The provider side: ingest streams under a lease, process their segments (here or
subcontracted), stream results back in order, enforce and meter the lease, and serve
other providers' process requests. `DataplaneService` is what a node daemon plugs in.
Its limits are `config.DataplaneConfig`; one member stream's pipeline and the lease's
shared state are in `streams.py`.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

import trio

from ..auction import Lease, Market
from ..budget import KeyedBuckets
from ..errors import (
    BidmeshError,
    InvalidMessage,
    PeerError,
    ProcessingError,
    Reason,
    Refusal,
    RemoteError,
    StreamClosed,
    Unauthorized,
    UsageError,
)
from ..events import Body, MemberUsage, Usage
from ..keys import Identity
from ..p2p import (
    P2PHost,
    Stream,
    StreamTimeout,
    read_frame,
    remote_peer_id,
    remote_pubkey,
    set_stream_handler,
    write_frame,
)
from ..processors import ProcessContext
from ..processors.pool import WorkerPool
from ..segments import Step, plan
from .authority import check_process, check_stream_chains, volume_limit
from .budget import ByteBudget, read_exactly, read_frame_length
from .clock import wall_clock_ms
from .config import SHOWN_LIMITS, DataplaneConfig
from .dispatch import Contracts, Dispatcher
from .egress import EgressPolicy
from .streams import Ingest, LeaseState, error_reason
from .wire import (
    SESSION_ERROR_ID,
    TRAILER_SEQ,
    U64,
    ProcessRequest,
    StreamHeader,
    Trailer,
    encode_outputs,
    encode_session_error,
    lease_key,
    process_protocol,
    session_protocol,
    session_response_parts,
    stream_protocol,
)

__all__ = ["DataplaneConfig", "DataplaneService", "wall_clock_ms"]

log = logging.getLogger(__name__)
_MAX_USAGE_MEMBERS = 256  # Usage.members holds at most 256 entries
_OK = 0  # node.p2p's request wire: 0x00 | payload, or 0x01 | u8 n | reason | message


def _error_answer(reason: str, message: str) -> bytes:
    code = reason.encode("ascii", "replace")[:255]
    return bytes([1, len(code)]) + code + message.encode("utf-8", "replace")[:1024]


class DataplaneService:
    """The provider's dataplane: ingest protocol, process protocol, lease enforcement.

    Dependencies are plain values and callables so the daemon can wire them:

    * `lease_lookup(lease_id) -> Lease | None` (e.g. `market.leases.get`);
    * `market() -> Market`: offers for choosing contractors (`rank_offers`) and for
      deciding which providers may send us process requests;
    * `publish(body)`: sign and store one of our events (Usage, Subcontract);
    * `clock() -> ms`: wall clock for lease windows (tests pass a fake one).
    """

    def __init__(
        self,
        host: P2PHost,
        identity: Identity,
        network: str,
        lease_lookup: Callable[[bytes], Lease | None],
        market: Callable[[], Market],
        pool: WorkerPool,
        publish: Callable[[Body], None],
        clock: Callable[[], int] = wall_clock_ms,
        config: DataplaneConfig | None = None,
    ) -> None:
        if identity.public != host.pubkey:
            raise UsageError("the dataplane identity must be the host's key")
        self.host, self.identity, self.network = host, identity, network
        self.lease_lookup, self.market, self.publish, self.clock = (
            lease_lookup, market, publish, clock)
        self.pool = pool
        self.config = cfg = config or DataplaneConfig()
        offered = set(pool.processors) if cfg.services is None else set(cfg.services)
        self.local: frozenset[str] = frozenset(offered & set(pool.processors))
        self.counters: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=100_000)
        # Per requesting key, least recently served first; bounded (served_max, ttl).
        self.served: OrderedDict[bytes, Counter[str]] = OrderedDict()
        self._served_at: dict[bytes, float] = {}
        self.budget = ByteBudget(cfg.process_peer_bytes, cfg.process_total_bytes)
        self._peer_sessions: Counter[bytes] = Counter()
        self._singles = 0  # /process/1 requests being served
        self.dispatcher = Dispatcher(
            host, network, pool, self.local, market, clock,
            local_attempts=cfg.local_attempts, max_attempts=cfg.max_attempts,
            remote_in_flight=cfg.remote_in_flight, timeout_s=cfg.subcontract_timeout_s,
            connect_timeout_s=cfg.connect_timeout_s, max_result=cfg.max_result,
            bad_for_s=cfg.bad_for_s, counters=self.counters, session_idle_s=cfg.session_idle_s,
            unrated=cfg.contractor_unrated, min_score_ppm=cfg.contractor_min_score_ppm,
            addr_policy=EgressPolicy(allow=cfg.contractor_addrs_allow,
                                     deny=cfg.contractor_addrs_deny))
        self._leases: dict[bytes, LeaseState] = {}
        self._volume: dict[bytes, int] = {}  # lease -> bytes of process requests served
        self._rates = dict(cfg.process_rates)
        self._rate_buckets: dict[int, KeyedBuckets] = {}  # rate -> per-requester buckets
        self._streams = 0
        self._sessions = 0
        self._max_request = cfg.max_segment_bytes * 2 + cfg.max_header
        # Session requests being processed, over all sessions (/1 has its own limit).
        self._process_slots = trio.Semaphore(cfg.process_max_concurrent)
        self._installed = False

    # ------------------------------------------------------------------ lifecycle

    def install(self) -> None:
        """Register both protocol handlers on the host (idempotent; `run` calls it)."""
        if self._installed:
            return
        self._installed = True
        set_stream_handler(self.host, stream_protocol(self.network), self._on_stream)
        cfg = self.config
        set_stream_handler(self.host, process_protocol(self.network), self._on_single)
        if cfg.process_sessions:
            set_stream_handler(self.host, session_protocol(self.network), self._on_session)

    async def run(self) -> None:
        """Serve until cancelled; closes leases whose window has ended (Usage events).
        Our process sessions to contractors run in here."""
        self.install()
        async with trio.open_nursery() as nursery:
            self.dispatcher.nursery = nursery
            try:
                while True:
                    await trio.sleep(self.config.lease_check_s)
                    now = self.clock()
                    for lid, st in list(self._leases.items()):
                        if not st.closed and st.lease.end_ms <= now:
                            await self.close_lease(lid)
                    self._prune_volume(now)
                    self._prune_served()
            finally:
                self.dispatcher.nursery = None

    async def close_lease(self, lease_id: bytes) -> Usage | None:
        """Stop the lease's streams, publish its `Usage` summary and return it.

        None if we never served the lease or already closed it."""
        st = self._leases.get(lease_id)
        if st is None or st.closed:
            await trio.lowlevel.checkpoint()
            return None
        st.closed = True
        for ing in list(st.streams):
            ing.fail(Refusal(Reason.LEASE_ENDED, f"lease {lease_id.hex()[:12]} has ended"))
        with trio.move_on_after(self.config.close_grace_s):
            await st.idle.wait()
        members = sorted(st.members.items(), key=lambda kv: (-kv[1].bytes_in, kv[0]))
        body = Usage(
            lease=lease_id,
            members=tuple(MemberUsage(member=k, bytes_in=m.bytes_in, bytes_out=m.bytes_out,
                                      segments=m.segments, active_ms=m.active_ms)
                          for k, m in sorted(members[:_MAX_USAGE_MEMBERS])),
            shortfall_ms=st.shortfall_ms, rate_limited=st.rate_limited,
            subcontracts=st.subcontracts)
        self._publish(body)
        self.counters["usage_published"] += 1
        return body

    def _publish(self, body: Body) -> None:
        try:
            self.publish(body)
        except BidmeshError as e:
            self.counters[f"publish_failed:{body.KIND}"] += 1
            log.warning("could not publish %s event: %s", body.KIND, e)

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else 0.0

        return {
            "counters": dict(self.counters),
            "active_streams": self._streams,
            "process_sessions": {"serving": self._sessions,
                                 "open_to_contractors": self.dispatcher.open_sessions},
            "process_memory": self.budget.stats(),
            "limits": {k: getattr(self.config, k) for k in SHOWN_LIMITS},
            "leases": {lid.hex(): {
                "streams": len(st.streams), "closed": st.closed,
                "rate_limited": st.rate_limited, "shortfall_ms": st.shortfall_ms,
                "shortfalls": [(s.start_ms, s.end_ms, s.bytes, s.expected)
                               for s in st.shortfalls],
                "subcontracts": st.subcontracts,
                "members": {k.hex(): vars(m).copy() for k, m in st.members.items()},
            } for lid, st in self._leases.items()},
            "served": {k.hex(): dict(c) for k, c in self.served.items()},
            "segment_latency_ms": {"p50": pct(0.5), "p99": pct(0.99),
                                   "mean": round(statistics.fmean(lat), 3) if lat else 0.0,
                                   "count": len(lat)},
        }

    # ------------------------------------------------------------------ ingest

    async def _refuse(self, stream: Stream, reason: str, message: str) -> None:
        self.counters[f"refused:{reason}"] += 1
        log.info("refusing a dataplane stream (%s): %s", reason, message)
        try:
            await write_frame(stream, U64.pack(TRAILER_SEQ) + Trailer(False, reason, message)
                              .encode(), min(5.0, self.config.write_timeout_s))
        except BidmeshError as e:
            log.debug("could not tell the peer why (%s)", e)

    def _admit(self, peer: bytes, header: StreamHeader) -> tuple[LeaseState, list[list[Step]]]:
        cfg = self.config
        lease = self.lease_lookup(header.lease)
        if lease is None:
            raise Unauthorized(f"no lease {header.lease.hex()[:12]} is known here", Reason.NO_LEASE)
        if lease.provider != self.host.pubkey:
            raise Unauthorized(f"lease {lease.id.hex()[:12]} is not ours", Reason.NOT_OUR_LEASE)
        now = self.clock()
        if not lease.active(now):
            raise Unauthorized(f"lease {lease.id.hex()[:12]} is active in "
                               f"[{lease.start_ms}, {lease.end_ms}), not at {now}",
                               Reason.OUTSIDE_WINDOW)
        st = self._leases.get(lease.id)
        if st is None:
            st = self._leases[lease.id] = LeaseState(lease, cfg.burst_ms)
        if st.closed:
            raise Unauthorized(f"lease {lease.id.hex()[:12]} was closed", Reason.LEASE_CLOSED)
        try:
            st.admission.admit(peer, now, header.delegation)
        except Unauthorized as e:
            reason = e.reason if e.reason != Reason.UNAUTHORIZED else Reason.NOT_MEMBER
            raise Unauthorized(str(e), reason) from None
        check_stream_chains(lease, header.chains, self.pool.processors)
        if self._streams >= cfg.max_streams or len(st.streams) >= cfg.max_streams_per_lease:
            raise PeerError("too many streams open; retry later", Reason.BUSY)
        lim = header.limits
        if not (lim.max_packets <= cfg.max_segment_packets
                and lim.max_bytes <= cfg.max_segment_bytes
                and (lim.max_age_ms is None or lim.max_age_ms >= cfg.min_segment_age_ms)):
            raise InvalidMessage(
                f"segment limits must be within max_packets <= {cfg.max_segment_packets}, "
                f"max_bytes <= {cfg.max_segment_bytes}, max_age_ms >= {cfg.min_segment_age_ms}",
                Reason.BAD_LIMITS)
        if header.options.get("max_packet", 0) > cfg.max_packet:
            raise InvalidMessage(f"max_packet above this provider's {cfg.max_packet}",
                                 Reason.BAD_LIMITS)
        plans = []
        for chain in header.chains:
            steps = plan(chain, self.local)
            for s in steps:
                if not s.local and not self.dispatcher.candidates(s.services):
                    raise PeerError(f"nobody offers {'→'.join(s.services)} (not here, no "
                                    "provider in the ledger)", Reason.UNKNOWN_SERVICE)
            plans.append(steps)
        return st, plans

    async def _on_stream(self, stream: Stream) -> None:
        peer = remote_pubkey(stream)
        cfg = self.config
        try:
            raw = await read_frame(stream, cfg.max_header, cfg.header_timeout_s)
            header = StreamHeader.decode(raw, cfg.max_header, cfg.max_chains, cfg.max_chain_len)
            if "max_packet" not in header.options and header.protocol == "lp":
                header = StreamHeader(header.lease, header.stream_id, header.protocol,
                                      {"max_packet": cfg.max_packet}, header.chains,
                                      header.limits, header.delegation)
            st, plans = self._admit(peer, header)
            key = lease_key(self.identity, peer, st.lease.id, peer, self.host.pubkey)
        except (PeerError, StreamTimeout, StreamClosed) as e:
            await self._refuse(stream, error_reason(e), str(e))
            return
        except RemoteError:
            self.counters["refused:reset"] += 1
            return
        ing = Ingest(self, stream, header, st, peer, key, plans)
        st.open_stream(ing, cfg.rate_window_ms)
        self._streams += 1
        self.counters["streams_opened"] += 1
        t0 = trio.current_time()
        try:
            trailer = await ing.run()
        finally:
            self._streams -= 1
            st.member(peer).active_ms += int((trio.current_time() - t0) * 1000)
            self._record_contracts(st, ing.contracts)
            st.close_stream(ing)
        if trailer.ok:
            self.counters["streams_ok"] += 1
        else:
            self.counters[f"streams_failed:{trailer.reason}"] += 1
            log.info("dataplane stream failed (%s): %s", trailer.reason, trailer.error)
            if isinstance(ing.error, RemoteError):
                return  # the member reset the stream: nobody to tell
        try:
            await write_frame(stream, U64.pack(TRAILER_SEQ) + trailer.encode(),
                              cfg.write_timeout_s)
        except BidmeshError as e:
            log.info("could not send the trailer: %s", e)

    def _record_contracts(self, st: LeaseState, contracts: Contracts) -> None:
        for body in contracts.bodies(st.lease.id):
            self._publish(body)
            st.subcontracts += 1
            self.counters["subcontracts_published"] += 1

    # ------------------------------------------------------------------ process

    def _knows(self, peer: bytes) -> bool:
        return peer in self.config.allow or peer in self.market().offers

    def _served(self, peer: bytes) -> Counter[str]:
        """The requester's stats entry, made the most recently used; the least recently
        used beyond `served_max` are dropped (a stranger per key must not grow it)."""
        c = self.served.get(peer)
        if c is None:
            c = self.served[peer] = Counter()
            while len(self.served) > self.config.served_max:
                old, _ = self.served.popitem(last=False)
                self._served_at.pop(old, None)
                self.counters["served_pruned"] += 1
        else:
            self.served.move_to_end(peer)
        self._served_at[peer] = trio.current_time()
        return c

    def _prune_served(self) -> None:
        cutoff = trio.current_time() - self.config.served_ttl_s
        while self.served:
            oldest = next(iter(self.served))
            if self._served_at.get(oldest, -math.inf) > cutoff:
                break
            del self.served[oldest]
            self._served_at.pop(oldest, None)
            self.counters["served_pruned"] += 1

    async def _on_single(self, stream: Stream) -> None:
        """`/process/1`: one request per stream, on node.p2p's request wire (response
        `0x00 | outputs` or `0x01 | u8 n | reason | message`), like `serve_requests`
        plus the byte budget: waiting for it between the request's length and its
        body, so a peer's requests in flight never hold more than its share."""
        peer_id = remote_peer_id(stream)
        ticket = self.host.resources.try_start_request(peer_id, process_protocol(self.network))
        if ticket is None:
            self.host.guard.fault(peer_id, "limit_requests_per_peer")
            await write_frame(stream, _error_answer(Reason.BUSY, "too many requests in flight "
                                                    "from you"), 5.0)
            return
        try:
            if self._singles >= self.config.process_max_concurrent:
                self.counters["process_refused:busy"] += 1
                await write_frame(stream, _error_answer(Reason.BUSY, "too many requests in "
                                                        "flight"), 5.0)
                return
            self._singles += 1
            try:
                await self._serve_single(stream, remote_pubkey(stream))
            finally:
                self._singles -= 1
            self.host.resources.touch(peer_id)
        finally:
            self.host.resources.end_request(ticket)

    async def _serve_single(self, stream: Stream, peer: bytes) -> None:
        cfg = self.config
        deadline = trio.current_time() + cfg.process_timeout_s
        charged = 0
        try:
            try:
                with trio.fail_at(deadline):
                    try:
                        length = await read_frame_length(stream, self._max_request, math.inf)
                        await self.budget.acquire(peer, length)
                        charged = length
                        payload = await read_exactly(stream, length, math.inf)
                        outputs = await self._process(peer, payload)
                        del payload
                        out = sum(map(len, outputs))
                        self.budget.charge(peer, out)
                        charged += out
                        response = encode_outputs(outputs, bytes([_OK]))
                    except PeerError as e:
                        if e.reason == Reason.TRUNCATED:
                            raise  # the request never arrived whole: nobody to answer
                        if e.reason == Reason.OVERSIZED:
                            self.counters["process_refused:oversized"] += 1
                        response = _error_answer(e.reason, str(e))
            except trio.TooSlowError:
                self.counters["process_refused:timeout"] += 1
                response = _error_answer(Reason.TIMEOUT, f"not served within "
                                         f"{cfg.process_timeout_s} s")
                deadline = trio.current_time() + 5.0
            await write_frame(stream, response, max(0.0, deadline - trio.current_time()))
        finally:
            if charged:
                self.budget.release(peer, charged)

    def _authorize(self, peer: bytes, req: ProcessRequest) -> None:
        """The request's lease must allow it (authority.check_process) and have volume
        left; Unauthorized with the reason otherwise. Charges the volume."""
        cfg = self.config
        lease = self.lease_lookup(req.lease)
        check_process(lease, req.lease, peer, req.services, req.step, self.clock(),
                      cfg.process_grace_ms, self.pool.processors)
        assert lease is not None
        limit = volume_limit(lease, cfg.volume_factor, cfg.volume_floor, cfg.process_grace_ms)
        used = self._volume.get(lease.id, 0) + len(req.data)
        if limit is not None and used > limit:
            raise Unauthorized(f"lease {lease.id.hex()[:12]} has used its volume here "
                               f"({limit} bytes of process requests)", Reason.OVER_VOLUME)
        if limit is None:
            self._charge_rate(peer, req)
        self._volume[lease.id] = used

    def _charge_rate(self, peer: bytes, req: ProcessRequest) -> None:
        """The per-requester cap of leases without a max rate (`process_rates`). A
        request larger than the burst passes when the bucket is full and leaves it in
        debt, so a requester's average stays at the rate whatever its segment size."""
        if not self._rates:
            return
        top = max(self._rates.values())
        rate = min(self._rates.get(s, top) for s in req.services)
        kb = self._rate_buckets.get(rate)
        if kb is None:
            burst = max(1.0, rate * self.config.process_rate_burst_s)
            kb = self._rate_buckets[rate] = KeyedBuckets(rate, burst,
                                                         max(64, self.config.served_max))
        b = kb.bucket(peer, self.clock() / 1000)
        n = len(req.data)
        if b.tokens < min(n, b.burst):
            raise Unauthorized(f"process requests from you under leases without a max rate "
                               f"are capped at {rate} bytes/s here (our offer's capacity); "
                               "retry later", Reason.OVER_RATE)
        b.tokens -= n

    def _prune_volume(self, now: int) -> None:
        grace = self.config.process_grace_ms
        for lid in list(self._volume):
            lease = self.lease_lookup(lid)
            if lease is None or lease.end_ms + grace <= now:
                del self._volume[lid]

    async def _process(self, peer: bytes, payload: bytes, offset: int = 0) -> list[bytes]:
        """Serve one process request (at `payload[offset:]`): every output of its step.
        PeerError (with a reason, counted) when it is refused or fails."""
        if not self._knows(peer):
            self.counters["process_refused:unknown_provider"] += 1
            raise Unauthorized("process requests are served to providers with an offer in "
                               "the ledger (or on the allow list) only", Reason.UNKNOWN_PROVIDER)
        try:
            req = ProcessRequest.decode(payload, offset)
        except InvalidMessage:
            self.counters["process_refused:bad_request"] += 1
            raise
        missing = [s for s in req.services if s not in self.local]
        if missing:
            self.counters["process_refused:unknown_service"] += 1
            raise PeerError(f"this provider does not offer {missing}", Reason.UNKNOWN_SERVICE)
        try:
            self._authorize(peer, req)
        except Unauthorized as e:
            self.counters[f"process_refused:{e.reason}"] += 1
            raise
        served = self._served(peer)
        ctx = ProcessContext(req.lease, req.stream_id, req.seq, req.key, self.config.params,
                             req.step)
        try:
            if len(req.services) == 1:
                outputs = [await self.dispatcher.run_local(req.services, req.data, ctx)]
            else:  # every intermediate output, so the requester can verify each service
                outputs, data = [], req.data
                for i, name in enumerate(req.services):
                    data = await self.dispatcher.run_local((name,), data,
                                                           ctx.at_step(req.step + i))
                    outputs.append(data)
        except ProcessingError as e:
            served["failed"] += 1
            raise PeerError(str(e), Reason.PROCESSING_FAILED) from None
        served["segments"] += 1
        served["bytes_in"] += len(req.data)
        served["bytes_out"] += sum(map(len, outputs))
        self.counters["process_served"] += 1
        return outputs

    # ------------------------------------------------------------------ process sessions

    async def _refuse_session(self, stream: Stream, reason: str, message: str) -> None:
        self.counters[f"process_refused:{reason}"] += 1
        try:
            await write_frame(stream, encode_session_error(SESSION_ERROR_ID, reason, message),
                              min(5.0, self.config.write_timeout_s))
        except BidmeshError as e:
            log.debug("could not tell the peer why (%s)", e)

    async def _on_session(self, stream: Stream) -> None:
        """A process session (docs/dataplane.md §9): request frames `u64 id | request`,
        answered by id as they complete, at most `process_session_concurrency` at once
        (beyond that we stop reading, and yamux flow control holds the requester)."""
        peer = remote_pubkey(stream)
        cfg = self.config
        if not self._knows(peer):
            await self._refuse_session(stream, Reason.UNKNOWN_PROVIDER, "process sessions are "
                                       "served to providers with an offer in the ledger (or "
                                       "on the allow list) only")
            return
        if self._sessions >= cfg.process_max_sessions:
            await self._refuse_session(stream, Reason.BUSY, "too many process sessions open")
            return
        if self._peer_sessions[peer] >= cfg.process_sessions_per_peer:
            await self._refuse_session(stream, Reason.BUSY, "you hold "
                                       f"{cfg.process_sessions_per_peer} process sessions "
                                       "already; pipeline requests on one")
            return
        self._sessions += 1
        self._peer_sessions[peer] += 1
        self.counters["process_sessions"] += 1
        slots = trio.Semaphore(cfg.process_session_concurrency)
        write_lock = trio.Lock()
        errors: list[BidmeshError] = []
        try:
            async with trio.open_nursery() as nursery:

                def failed(e: BidmeshError) -> None:
                    errors.append(e)
                    nursery.cancel_scope.cancel()

                while True:
                    await slots.acquire()
                    try:
                        length = await read_frame_length(stream, self._max_request + 8,
                                                         cfg.process_idle_s)
                    except StreamTimeout:
                        self.counters["process_sessions_idle"] += 1
                        break  # answer what is in flight, then close
                    except StreamClosed:
                        break  # the requester closed the session
                    except InvalidMessage as e:
                        self.counters[f"process_refused:{e.reason}"] += 1
                        failed(e)
                        break
                    except BidmeshError as e:
                        failed(e)
                        break
                    if length < 8:
                        self.counters["process_refused:bad_request"] += 1
                        failed(InvalidMessage("process-session request shorter than its id",
                                              Reason.BAD_REQUEST))
                        break
                    # Waiting here stops reading: yamux flow control then holds the
                    # requester, whichever of its sessions it uses.
                    await self.budget.acquire(peer, length)
                    try:
                        frame = await read_exactly(stream, length, cfg.process_timeout_s)
                    except BaseException as e:
                        self.budget.release(peer, length)
                        if not isinstance(e, BidmeshError):
                            raise
                        failed(e)
                        break
                    nursery.start_soon(self._session_request, stream, write_lock, slots, peer,
                                       frame, failed)
        finally:
            self._sessions -= 1
            self._peer_sessions[peer] -= 1
            if self._peer_sessions[peer] <= 0:
                del self._peer_sessions[peer]
        if errors:
            raise errors[0]  # the stream handler resets the stream

    async def _session_request(self, stream: Stream, write_lock: trio.Lock,
                               slots: trio.Semaphore, peer: bytes, frame: bytes,
                               failed: Callable[[BidmeshError], None]) -> None:
        """Process one session request and write its answer. The frame's bytes were
        charged to the budget by the reader: they are released once it is processed,
        and the outputs are charged until written."""
        cfg = self.config
        (rid,) = U64.unpack_from(frame)
        data = b""
        out = 0
        try:
            try:
                with trio.fail_after(cfg.process_timeout_s):
                    async with self._process_slots:
                        outputs = await self._process(peer, frame, 8)
                        out = sum(map(len, outputs))
                        self.budget.charge(peer, out)
                        head, data = session_response_parts(rid, outputs)
            except PeerError as e:
                log.info("process request from %s refused (%s): %s", peer.hex()[:12],
                         e.reason, e)
                head = encode_session_error(rid, e.reason, str(e))
            except trio.TooSlowError:
                self.counters["process_refused:timeout"] += 1
                head = encode_session_error(rid, Reason.TIMEOUT,
                                            f"not processed within {cfg.process_timeout_s} s")
            finally:
                slots.release()
                self.budget.release(peer, len(frame))
                del frame
            try:
                async with write_lock:
                    await write_frame(stream, data, cfg.write_timeout_s, head)
            except BidmeshError as e:
                failed(e)
        finally:
            if out:
                self.budget.release(peer, out)
