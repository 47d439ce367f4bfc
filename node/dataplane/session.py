"""Process sessions, requester side: pipelined process requests to one contractor over
one kept stream (`/bidmesh/<network>/process/2`, docs/dataplane.md §9).

Why not a stream per request (`/process/1`): every new yamux stream starts with a
256 KiB send window, and py-libp2p 0.8.1 waits for window updates by polling every
10 ms (stream_muxer/yamux/yamux.py:273, `trio.sleep(0.01)`), so a 1 MiB segment sent
on a fresh stream stalls ~4 times each way; a kept stream's window has grown (its
auto-tuning doubles it up to 16 MiB) and several segments are in flight at once.
"""

from __future__ import annotations

import logging
import math

import trio

from ..errors import BidmeshError, InvalidMessage, OperationError, Reason, StreamClosed
from ..p2p import (
    RequestRefused,
    Stream,
    StreamTimeout,
    close_quietly,
    reset_quietly,
    write_frame,
)
from .budget import read_exactly, read_frame_length
from .wire import SESSION_ERROR_ID, U64, ProcessRequest, SessionResponse

__all__ = ["ProcessSession"]

log = logging.getLogger(__name__)
CLOSE_GRACE_S = 5.0
_ERROR_LIMIT = 1 + 1 + 255 + 1024  # an error answer: status, reason, message


class _Slot:
    __slots__ = ("abandoned", "done", "error", "expected", "limit", "response")

    def __init__(self, expected: int, limit: int) -> None:
        self.expected = expected
        self.limit = limit  # most bytes of its outputs (`encode_outputs`) or error body
        self.done = trio.Event()
        self.response: SessionResponse | None = None
        self.error: BidmeshError | None = None
        self.abandoned = False


class ProcessSession:
    """One open session to `name` (a contractor). `call` from any task; `run` (one task,
    e.g. in the dispatcher's nursery) reads the responses, closes the session after
    `idle_s` without requests, and resets the stream when it fails or is cancelled.

    Any session-level failure (the stream breaks, a response times out or is malformed,
    the contractor refuses the session) fails every request in flight with that error
    and makes the session unusable; open a new one.
    """

    def __init__(self, stream: Stream, name: str, max_frame: int, idle_s: float) -> None:
        self.stream = stream
        self.name = name
        self.max_frame = max_frame
        self.idle_s = idle_s
        self.error: BidmeshError | None = None
        self.closing = False
        self.last_used = trio.current_time()
        self._next_id = 0
        self._slots: dict[int, _Slot] = {}
        self._write_lock = trio.Lock()
        self._scope = trio.CancelScope()

    @property
    def usable(self) -> bool:
        return self.error is None and not self.closing

    def fail(self, error: BidmeshError) -> None:
        """Fail the session and every request in flight (idempotent; first error wins)."""
        if self.error is None:
            self.error = error
        for slot in self._slots.values():
            slot.error = self.error
            slot.done.set()
        self._slots.clear()
        self._scope.cancel()

    async def call(self, req: ProcessRequest, expected: int, timeout: float,
                   limit: int | None = None) -> list[bytes]:
        """The outputs of `req` (`expected` of them). RequestRefused when the contractor
        answers an error; the session's error (StreamTimeout after `timeout`,
        RemoteError, InvalidMessage...) when the session fails. `limit`: the most bytes
        its encoded outputs may hold (from the outputs' expansion bound, see `node.processors.
        output_bounds`); a longer answer fails the session unread ("oversized_response")."""
        if not self.usable:
            raise self.error or OperationError(f"the process session to {self.name} is closed")
        # Register before the first checkpoint: the idle reaper only closes a session
        # with no request in flight (but abandoned ones), so a call that got a usable
        # session keeps it.
        rid = self._next_id
        self._next_id += 1
        slot = self._slots[rid] = _Slot(expected, self.max_frame if limit is None else limit)
        self.last_used = trio.current_time()
        deadline = self.last_used + timeout
        head = req.encode_head(rid)
        written = False
        try:
            with trio.fail_at(deadline):
                await self._write_lock.acquire()
            try:
                if self.error is not None:
                    raise self.error
                # Written from here on: write_frame is shielded (it resets the stream,
                # failing the session, at the deadline) and delivers a cancellation that
                # came meanwhile only after the whole frame went out. That request will
                # be answered; without its slot the answer failed the session.
                written = True
                await write_frame(self.stream, req.data, max(0.0, deadline - trio.current_time()),
                                  head)
            except BidmeshError as e:
                self.fail(e)
                raise
            finally:
                self._write_lock.release()
            with trio.move_on_at(deadline):
                await slot.done.wait()
            if not slot.done.is_set():
                self.fail(StreamTimeout(f"no process response from {self.name} within "
                                        f"{timeout} s"))
        except trio.TooSlowError:
            err = StreamTimeout(f"process session to {self.name} busy for {timeout} s")
            self.fail(err)
            raise err from None
        except BaseException:
            if written:
                slot.abandoned = True  # cancelled: its answer is dropped when it comes
            else:
                self._slots.pop(rid, None)
            raise
        if slot.error is not None:
            raise slot.error
        resp = slot.response
        assert resp is not None
        if not resp.ok:
            raise RequestRefused(f"{self.name} refused the process request ({resp.reason}): "
                                 f"{resp.message}", resp.reason)
        return list(resp.outputs)

    async def run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reaper)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        finally:
            if self.error is None and not self.closing:
                self.error = OperationError(f"the process session to {self.name} stopped")
            self.fail(self.error or OperationError("closed"))
            await reset_quietly(self.stream)

    async def _read_response(self) -> tuple[int, bytes]:
        """One response frame as (request id, the rest), checked against the limit of
        the request it answers before its body is read: a contractor answering junk
        costs us at most what the request could legitimately produce."""
        length = await read_frame_length(self.stream, self.max_frame, math.inf)
        if length < 9:
            raise InvalidMessage(f"{self.name} sent a process-session response shorter than "
                                 "its header", Reason.BAD_RESPONSE)
        (rid,) = U64.unpack(await read_exactly(self.stream, 8, math.inf))
        slot = self._slots.get(rid)
        limit = _ERROR_LIMIT if rid == SESSION_ERROR_ID or slot is None else max(
            slot.limit, _ERROR_LIMIT)
        if length - 9 > limit:  # after the id and the status byte
            raise InvalidMessage(f"{self.name} answered {length - 9} bytes to request {rid}, "
                                 f"whose outputs hold at most {limit}", Reason.OVERSIZED_RESPONSE)
        return rid, await read_exactly(self.stream, length - 8, math.inf)

    async def _reader(self) -> None:
        while True:
            try:
                # No timeout here: each call bounds its own wait and fails the session
                # (cancelling this read) when it passes; the reaper ends idle sessions.
                rid, body = await self._read_response()
            except StreamClosed as e:
                if self.closing and self._only_abandoned():
                    return  # we closed an idle session and the contractor closed its side
                self.fail(e)
                return
            except BidmeshError as e:
                self.fail(e)
                return
            try:
                self._deliver(rid, body)
            except BidmeshError as e:
                self.fail(e)
                return

    def _deliver(self, rid: int, body: bytes) -> None:
        if rid == SESSION_ERROR_ID:
            r = SessionResponse.decode_body(rid, body, None)
            raise RequestRefused(f"{self.name} refused the process session ({r.reason}): "
                                 f"{r.message}", r.reason)
        slot = self._slots.pop(rid, None)
        if slot is None:
            raise InvalidMessage(f"{self.name} answered request {rid}, which is not in "
                                 "flight", Reason.BAD_RESPONSE)
        if not slot.abandoned:
            slot.response = SessionResponse.decode_body(rid, body, slot.expected)
            slot.done.set()

    def _only_abandoned(self) -> bool:
        return all(slot.abandoned for slot in self._slots.values())

    async def _reaper(self) -> None:
        while True:
            await trio.sleep_until(self.last_used + self.idle_s)
            # Requests whose callers gave up (cancelled) don't keep a session open.
            if self._only_abandoned() and trio.current_time() >= self.last_used + self.idle_s:
                break
        self.closing = True
        await close_quietly(self.stream)  # our side: the contractor then closes its own
        await trio.sleep(CLOSE_GRACE_S)
        self.fail(OperationError(f"{self.name} did not close the idle process session"))
