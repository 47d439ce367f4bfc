"""Checks on what nodes answer, before anything is believed: every record decoded with
full signature verification, digests to compare answer sets, and the local fold."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ..auction import Market, derive
from ..errors import InvalidEvent, Reason, UntrustedAnswer
from ..events import Event, decode_wire


def _check_events(node: str, records: Iterable[bytes], network: str) -> list[Event]:
    out = []
    for r in records:
        try:
            out.append(decode_wire(r, network))  # full signature verification
        except InvalidEvent as e:
            raise UntrustedAnswer(f"node {node} returned an event that does not verify "
                                  f"({e.reason}): {e}", Reason.FORGED_EVENT) from e
    return out


def set_digest(events: Iterable[Event]) -> bytes:
    """Digest of an answer set (sorted ids): what cross-checking compares."""
    h = hashlib.sha256(b"bidmesh/answer/v1")
    for i in sorted(ev.id for ev in events):
        h.update(i)
    return h.digest()


def fold(events: Iterable[Event]) -> tuple[Market, list[tuple[bytes, int]]]:
    """Derive a Market from events in any order: dedupe, drop every author's events
    from a seq where two different events exist (a fork, as the ledger does), fold in
    canonical order. Returns the market and the (author, seq) forks seen."""
    by_id = {ev.id: ev for ev in events}
    slots: dict[tuple[bytes, int], bytes] = {}
    fork_at: dict[bytes, int] = {}
    for ev in by_id.values():
        other = slots.setdefault((ev.author, ev.seq), ev.id)
        if other != ev.id:
            fork_at[ev.author] = min(fork_at.get(ev.author, 1 << 62), ev.seq)
    keep = [ev for ev in by_id.values() if ev.seq < fork_at.get(ev.author, 1 << 62)]
    keep.sort(key=lambda e: (e.ts_ms, e.author, e.seq))
    return derive(keep), sorted(fork_at.items())


def _auction_member(ev: Event, request: bytes, commits: set[bytes]) -> bool:
    if ev.id == request:
        return ev.kind == "request"
    if ev.kind == "reveal":
        return ev.ref in commits
    return ev.ref == request and ev.kind in ("bid", "commit", "pledge", "award")
