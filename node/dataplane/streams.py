"""One member stream under a lease on the provider side: the lease's shared state
(admission, max-rate bucket, min-rate meter, per-member meters) and the ingest
pipeline of one stream (reader → segmenter → dispatcher → reorder → writer).
`DataplaneService` (service.py) admits the stream and runs `Ingest`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..auction import DeviceAdmission, Lease
from ..errors import BidmeshError, PeerError, ProcessingError, Reason, Refusal, StreamClosed
from ..p2p import Stream, StreamTimeout, read_frame, write_frame
from ..processors import ProcessContext
from ..segments import (
    PacketParser,
    RateMeter,
    ReorderBuffer,
    Segment,
    Segmenter,
    Shortfall,
    Step,
    TokenBucket,
    new_parser,
)
from .clock import mono_ms
from .config import DataplaneConfig
from .dispatch import Contracts, Dispatcher
from .wire import U64, StreamHeader, Trailer

__all__ = ["Ingest", "IngestHost", "LeaseState", "MemberMeter", "error_reason"]

log = logging.getLogger(__name__)


class IngestHost(Protocol):
    """What an `Ingest` uses of the service that runs it (`DataplaneService`)."""

    @property
    def config(self) -> DataplaneConfig: ...
    @property
    def counters(self) -> Counter[str]: ...
    @property
    def latencies(self) -> deque[float]: ...
    @property
    def dispatcher(self) -> Dispatcher: ...
    def clock(self) -> int: ...


@dataclass
class MemberMeter:
    bytes_in: int = 0
    bytes_out: int = 0
    segments: int = 0
    active_ms: int = 0


class LeaseState:
    def __init__(self, lease: Lease, burst_ms: int) -> None:
        self.lease = lease
        self.admission = DeviceAdmission(lease)
        self.bucket: TokenBucket | None = None
        if lease.max_rate_bps is not None:
            rate = max(1, lease.max_rate_bps // 8)  # the lease says bits/s, the bucket bytes/s
            # Chunks larger than the burst are taken in burst-sized parts (_throttle).
            self.bucket = TokenBucket(rate, max(rate * burst_ms // 1000, 4096))
        self.members: dict[bytes, MemberMeter] = {}
        self.streams: set[Ingest] = set()
        self.idle = trio.Event()
        self.idle.set()
        self.meter: RateMeter | None = None
        self.shortfall_ms = 0
        self.shortfalls: deque[Shortfall] = deque(maxlen=64)
        self.rate_limited = 0
        self.subcontracts = 0
        self.closed = False

    def member(self, key: bytes) -> MemberMeter:
        return self.members.setdefault(key, MemberMeter())

    def open_stream(self, ing: Ingest, min_window_ms: int) -> None:
        if not self.streams:
            self.idle = trio.Event()
            if self.lease.min_rate_bps:
                self.meter = RateMeter(self.lease.min_rate_bps // 8, min_window_ms, mono_ms())
        self.streams.add(ing)

    def close_stream(self, ing: Ingest) -> None:
        self.streams.discard(ing)
        if not self.streams:
            if self.meter is not None:
                self.shortfalls.extend(self.meter.close(mono_ms()))
                self.shortfall_ms += self.meter.shortfall_ms
                self.meter = None
            self.idle.set()

    def delivered(self, n: int) -> None:
        if self.meter is not None:
            self.shortfalls.extend(self.meter.record(n, mono_ms()))


def error_reason(e: BaseException) -> str:
    if isinstance(e, Refusal | PeerError | StreamClosed):
        return e.reason
    if isinstance(e, StreamTimeout):
        return Reason.TIMEOUT
    if isinstance(e, ProcessingError):
        return Reason.PROCESSING_FAILED
    return Reason.FAILED


class Ingest:
    """One member stream: reader → segmenter → dispatcher → reorder → writer."""

    def __init__(self, svc: IngestHost, stream: Stream, header: StreamHeader,
                 st: LeaseState, member: bytes, key: bytes,
                 plans: list[list[Step]]) -> None:
        self.svc, self.stream, self.header, self.st = svc, stream, header, st
        self.member, self.key, self.plans = member, key, plans
        cfg = svc.config
        self.parser: PacketParser = new_parser(header.protocol, **header.parser_options())
        lim = header.limits
        self.segmenter = Segmenter(lim.max_packets, lim.max_bytes, lim.max_age_ms)
        self.reorder = ReorderBuffer(cfg.window)
        self.window = trio.Semaphore(cfg.window)
        self.seg_send, self.seg_recv = trio.open_memory_channel[Segment](0)
        self.out_send, self.out_recv = trio.open_memory_channel[tuple[int, bytes]](math.inf)
        self.seg_lock = trio.Lock()
        self.input_done = trio.Event()
        self.sizes: dict[int, tuple[int, float]] = {}  # seq -> (input bytes, start time)
        self.contracts = Contracts()
        self.error: BaseException | None = None
        self.scope = trio.CancelScope()
        self.segments = self.bytes_out = self.redispatched = 0

    def fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.scope.cancel()

    async def _guard(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except BidmeshError as e:
            self.fail(e)
        except Exception as e:  # a bug or an unmapped library error: fail the stream clearly
            log.exception("dataplane stream task failed")
            self.fail(Refusal(Reason.INTERNAL, f"provider error: {type(e).__name__}: {e}"))

    async def run(self) -> Trailer:
        with self.scope:
            async with trio.open_nursery() as n:
                n.start_soon(self._guard, self._reader)
                if self.header.limits.max_age_ms is not None:
                    n.start_soon(self._guard, self._ticker)
                n.start_soon(self._guard, self._dispatcher)
                n.start_soon(self._guard, self._writer)
        p = self.parser
        counts: dict[str, Any] = dict(segments=self.segments, packets=p.packets, bytes_in=p.bytes,
                      bytes_out=self.bytes_out, garbage_bytes=p.garbage_bytes,
                      subcontracted=self.contracts.segments, redispatched=self.redispatched)
        if self.error is None and self.scope.cancelled_caught:
            self.error = Refusal(Reason.CANCELLED, "the provider stopped the stream")
        if self.error is not None:
            return Trailer(False, error_reason(self.error), str(self.error), **counts)
        return Trailer(True, **counts)

    async def _reader(self) -> None:
        cfg, st = self.svc.config, self.st
        meter = st.member(self.member)
        while True:
            chunk = await read_frame(self.stream, cfg.max_chunk, cfg.idle_timeout_s)
            if not st.lease.active(self.svc.clock()):
                raise Refusal(Reason.LEASE_ENDED,
                              f"lease {st.lease.id.hex()[:12]} is not active now")
            final = not chunk
            if final:
                packets = self.parser.end()
            else:
                await self._throttle(len(chunk))
                meter.bytes_in += len(chunk)
                packets = self.parser.feed(chunk)
            now = mono_ms()
            async with self.seg_lock:
                segs: list[Segment] = []
                for pkt in packets:
                    segs += self.segmenter.push(pkt, now)
                if final:
                    segs += self.segmenter.flush()
                for s in segs:
                    await self.seg_send.send(s)
                if final:
                    self.input_done.set()
                    await self.seg_send.aclose()
                    return

    async def _ticker(self) -> None:
        age = self.header.limits.max_age_ms
        assert age is not None
        while not self.input_done.is_set():
            due = self.segmenter.deadline_ms
            if due is None:
                await trio.sleep(max(age, 1) / 1000)
                continue
            # +0.5 ms: int(current_time * 1000) must reach `due` when we wake
            await trio.sleep_until((due + 0.5) / 1000)
            async with self.seg_lock:
                if self.input_done.is_set():
                    return
                for s in self.segmenter.tick(mono_ms()):
                    await self.seg_send.send(s)

    async def _throttle(self, n: int) -> None:
        """Shared max rate of the lease: wait for tokens before accepting `n` more bytes."""
        bucket = self.st.bucket
        if bucket is None:
            return
        limited = False
        while n > 0:
            part = min(n, bucket.burst_bytes)
            while (wait := bucket.take(part, mono_ms())) > 0:
                limited = True
                await trio.sleep(wait / 1000)
            n -= part
        if limited:
            self.st.rate_limited += 1
            self.svc.counters["rate_limited"] += 1

    async def _dispatcher(self) -> None:
        async with trio.open_nursery() as n:
            async for seg in self.seg_recv:
                await self.window.acquire()  # bounded in flight == bounded reorder window
                self.sizes[seg.seq] = (len(seg.data), trio.current_time())
                n.start_soon(self._guard, lambda s=seg: self._process(s))
        self.out_send.close()

    async def _process(self, seg: Segment) -> None:
        data = seg.data
        ctx = ProcessContext(self.header.lease, self.header.stream_id, seg.seq, self.key,
                             self.svc.config.params)
        for step in self.plans[seg.chain]:
            data, retries = await self.svc.dispatcher.run_step(
                step, data, ctx.at_step(step.start), self.contracts)
            self.redispatched += retries
        for item in self.reorder.put(seg.seq, data):
            self.out_send.send_nowait(item)

    async def _writer(self) -> None:
        cfg, svc, st = self.svc.config, self.svc, self.st
        meter = st.member(self.member)
        async for seq, result in self.out_recv:
            await write_frame(self.stream, result, cfg.write_timeout_s, U64.pack(seq))
            size, t0 = self.sizes.pop(seq)
            svc.latencies.append((trio.current_time() - t0) * 1000)
            self.segments += 1
            self.bytes_out += 12 + len(result)
            meter.bytes_out += 12 + len(result)
            meter.segments += 1
            st.delivered(size)
            self.window.release()

