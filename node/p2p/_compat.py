"""Every run-time replacement of a py-libp2p 0.8.1 function, in one place.

The installed package is never modified: these rebind names the upstream
modules look up, with a comment naming the upstream behaviour each one works
around (docs/libp2p-notes.md has the measurements).
"""

from __future__ import annotations

import time
import weakref
from typing import Final

from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub import gossipsub as _gossipsub_module
from libp2p.pubsub import pubsub as _pubsub_module
from libp2p.pubsub.pb import rpc_pb2
from libp2p.stream_muxer.yamux.yamux import YamuxStream


async def _window_update_at_half(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """Send a WINDOW_UPDATE only once half the receive window is consumed.

    Upstream's `YamuxStream._auto_tune_and_send_window_update`
    (stream_muxer/yamux/yamux.py:410) sends one after nearly every read that
    returns data (its "partial slack" and release-on-read branches), and
    pubsub reads each RPC in two or three reads: half of all frames on a
    gossip connection were window updates, each encrypted, sent and parsed.
    go-yamux (and the yamux spec) release credit in half-window steps; this
    keeps upstream's window growth and auto-tuning without the per-read
    updates. `open_host` installs it in place of upstream's method.

    Credit is also returned at once while the sender is nearly out of it (under an
    eighth of the window left): upstream's sender gives up a write after 5 s at a
    zero window (`YamuxStream.write`, yamux.py:280, "Timed out waiting for window
    update"), and a reader slower than half a window per 5 s (a provider enforcing a
    lease's max rate below ~200 kbit/s, ~400 kbit/s once auto-tuning doubled the
    window) would otherwise let every write to it fail.
    """
    total = 0
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta > 0 and delta >= self._grow_threshold():
            total = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        elif delta > 0 and self.recv_window < self.target_recv_window // 8:
            total = self._grow_to_delta(buffered)  # a slow reader: no window growth
            self._pending_recv_release = 0
    if total > 0:
        await self.send_window_update(total, skip_lock=True)



_RECORD_TTL_S: Final = 600.0
_RECORD_CACHE_MAX: Final = 4096
_OWN_RECORD_TTL_S: Final = 1.0


def _cache_signed_records() -> None:
    """Handle signed peer records once per peer, not once per pubsub RPC.

    Upstream attaches the sender's signed peer record to every RPC: building
    it (`env_to_send_in_RPC`) re-reads the host's listen addresses from its
    sockets each time, and the receiver checks it (`maybe_consume_signed_record`:
    an Ed25519 verification and a peerstore update), twice for an RPC with
    control parts (pubsub/pubsub.py:565, pubsub/gossipsub.py:932). After the
    transport these are the largest per-message costs. So our own record is
    reused for `_OWN_RECORD_TTL_S`, and a verified (peer, record bytes) pair
    is remembered for `_RECORD_TTL_S` (the same bytes from the same peer check
    the same way; the peerstore keeps records 2 h). We rebind the names the
    pubsub modules look up; the installed package is unchanged. Idempotent.
    """
    upstream_consume = getattr(_pubsub_module, "maybe_consume_signed_record")  # noqa: B009
    if getattr(upstream_consume, "_bidmesh_cached", False):
        return
    upstream_env = getattr(_pubsub_module, "env_to_send_in_RPC")  # noqa: B009
    seen: dict[tuple[bytes, bytes], float] = {}
    own: weakref.WeakKeyDictionary[IHost, tuple[float, tuple[bytes, bool]]] = (
        weakref.WeakKeyDictionary()
    )

    def consume(msg: rpc_pb2.RPC, host: IHost, peer_id: ID) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (peer_id.to_bytes(), msg.senderRecord)
        now = time.monotonic()
        if seen.get(key, 0.0) > now:
            return True
        ok: bool = upstream_consume(msg, host, peer_id)
        if ok:
            if len(seen) >= _RECORD_CACHE_MAX:
                seen.clear()  # a flood of distinct records only costs re-checks
            seen[key] = now + _RECORD_TTL_S
        return ok

    def env_to_send(host: IHost) -> tuple[bytes, bool]:
        now = time.monotonic()
        cached = own.get(host)
        if cached is not None and cached[0] > now:
            return cached[1][0], False
        result: tuple[bytes, bool] = upstream_env(host)
        own[host] = (now + _OWN_RECORD_TTL_S, result)
        return result

    consume._bidmesh_cached = True  # type: ignore[attr-defined]
    for module in (_pubsub_module, _gossipsub_module):
        setattr(module, "maybe_consume_signed_record", consume)  # noqa: B010
        setattr(module, "env_to_send_in_RPC", env_to_send)  # noqa: B010


