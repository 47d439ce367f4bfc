"""The node's side of the control socket: the built-in ops and the server loop.

Ops are `async fn(node, request) -> dict` in `node.control_ops` (the built-ins below:
status, publish, connect, block, unblock, sync); a plugin adds one with
`node.control_ops["name"] = fn`. Wire format and client: node/control.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from . import codec, p2p
from .context import NodeContext
from .control import CONTROL_MAX, LEN
from .errors import BidmeshError, InvalidEvent, InvalidMessage, Reason, UsageError
from .events import KINDS, Body, Event

if TYPE_CHECKING:
    from .discovery import Discovery
    from .gossip import Replicator

log = logging.getLogger("bidmesh.daemon")


class ControlNode(NodeContext, Protocol):
    """What control ops may use: a service's view of the node, plus the replication
    and discovery it steers (connect, block, sync) and batch publishing."""

    @property
    def replicator(self) -> Replicator: ...

    @property
    def discovery(self) -> Discovery: ...

    @property
    def control_ops(self) -> dict[str, ControlOp]: ...

    def publish_many(self, bodies: list[Body]) -> list[Event]: ...


ControlOp = Callable[[ControlNode, dict[str, Any]], Awaitable[dict[str, Any]]]


def _body(kind: Any, body: Any) -> Body:
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidMessage(f"unknown event kind {kind!r}", Reason.UNKNOWN_KIND)
    if not isinstance(body, dict):
        raise InvalidMessage("an event body is a map", Reason.MALFORMED)
    return KINDS[kind].from_map(body)


async def _op_status(node: ControlNode, req: dict[str, Any]) -> dict[str, Any]:
    return node.status()


async def _op_publish(node: ControlNode, req: dict[str, Any]) -> dict[str, Any]:
    """`{"events": [[kind, body], ...]}`: stored (committed) before the answer."""
    items = req.get("events")
    if not isinstance(items, list) or not 0 < len(items) <= 10_000:
        raise InvalidMessage("publish needs events: [[kind, body], ...] (1..10000)",
                             Reason.MALFORMED)
    bodies = []
    for it in items:
        if not isinstance(it, list) or len(it) != 2:
            raise InvalidMessage("each event is [kind, body]", Reason.MALFORMED)
        bodies.append(_body(it[0], it[1]))
    return {"ids": [ev.id for ev in node.publish_many(bodies)]}


async def _op_connect(node: ControlNode, req: dict[str, Any]) -> dict[str, Any]:
    addr = req.get("addr")
    if not isinstance(addr, str):
        raise InvalidMessage("connect needs addr", Reason.MALFORMED)
    peer = await node.host.connect(addr)
    if req.get("keep", True):
        node.discovery.add(addr)
    return {"peer": str(peer)}


def _peer_ids(values: list[Any]) -> list[p2p.PeerId]:
    """Parse every peer id before acting on any, so one bad entry changes nothing
    (a None here used to raise AttributeError in base58 and end the daemon)."""
    if not all(isinstance(v, str) and 0 < len(v) <= 128 for v in values):
        raise InvalidMessage("peer ids are base58 strings", Reason.MALFORMED)
    return [p2p.parse_peer_id(v) for v in values]


async def _op_block(node: ControlNode, req: dict[str, Any]) -> dict[str, Any]:
    peers, seconds = req.get("peers"), req.get("seconds", 3600)
    if not isinstance(peers, list) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise InvalidMessage("block needs peers: [peer id, ...] and seconds > 0", Reason.MALFORMED)
    for p in _peer_ids(peers):
        node.host.block(p, float(seconds))
    return {"blocked": len(peers)}


async def _op_unblock(node: ControlNode, req: dict[str, Any]) -> dict[str, Any]:
    peers = req.get("peers")
    if not isinstance(peers, list):
        raise InvalidMessage("unblock needs peers: [peer id, ...]", Reason.MALFORMED)
    for p in _peer_ids(peers):
        node.host.unblock(p)
    node.discovery.retry_now()
    return {"unblocked": len(peers)}


async def _op_sync(node: ControlNode, req: dict[str, Any]) -> dict[str, Any]:
    peers = node.host.connected_peers()
    if "peer" in req:
        peers = _peer_ids([req["peer"]])
    done = 0
    for p in peers:
        if await node.replicator.sync_with(p) is not None:
            done += 1
    return {"synced_with": done, "digest": node.ledger.digest().hex()}


BUILTIN_OPS: dict[str, ControlOp] = {
    "status": _op_status, "publish": _op_publish, "connect": _op_connect,
    "block": _op_block, "unblock": _op_unblock, "sync": _op_sync,
}


async def _read_exact(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise InvalidMessage("control connection closed mid-message", Reason.TRUNCATED)
        buf += chunk
    return bytes(buf)


async def _control_conn(node: ControlNode, stream: trio.SocketStream) -> None:
    async with stream:
        while True:
            try:
                with trio.fail_after(60):
                    head = await stream.receive_some(LEN.size)
                    if not head:
                        return
                    head += await _read_exact(stream, LEN.size - len(head))
                    (n,) = LEN.unpack(head)
                    if n > CONTROL_MAX:
                        raise InvalidMessage(f"control request over {CONTROL_MAX} bytes",
                                             Reason.OVERSIZED)
                    raw = await _read_exact(stream, n)
            except (trio.TooSlowError, trio.BrokenResourceError, InvalidMessage):
                return
            try:
                resp = await _dispatch(node, codec.unpack(raw, CONTROL_MAX))
            except InvalidMessage as e:  # undecodable: say so instead of hanging up
                resp = {"ok": False, "reason": e.reason, "error": str(e)}
            data = codec.pack(resp)
            try:
                await stream.send_all(LEN.pack(len(data)) + data)
            except trio.BrokenResourceError:
                return


async def _dispatch(node: ControlNode, req: Any) -> dict[str, Any]:
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        return {"ok": False, "reason": Reason.MALFORMED, "error": "a request is a map with op"}
    op = node.control_ops.get(req["op"])
    if op is None:
        return {"ok": False, "reason": Reason.UNKNOWN_OP,
                "error": f"unknown op {req['op']!r}; known: {', '.join(sorted(node.control_ops))}"}
    try:
        return {"ok": True, **await op(node, req)}
    except (InvalidEvent, InvalidMessage) as e:
        return {"ok": False, "reason": e.reason, "error": str(e)}
    except BidmeshError as e:
        return {"ok": False, "reason": type(e).__name__, "error": str(e)}
    except Exception as e:  # the daemon's outermost boundary: a bug answers, never ends it
        log.exception("control op %s failed", req["op"][:40])
        return {"ok": False, "reason": Reason.INTERNAL,
                "error": f"{type(e).__name__}: see node log"}


async def serve_control(node: ControlNode, path: Path,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    if len(str(path).encode()) > 100:
        raise UsageError(f"control socket path {path} is too long for a Unix socket "
                         "(max ~100 bytes); use a shorter node.data_dir")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda s: _control_conn(node, s), [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

