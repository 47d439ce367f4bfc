"""Id prefixes for the light client: the 16-digit ids its tables print work wherever
an id is typed (`client bids 3f2a…`), like `bidmesh ledger` accepts them.

A node cannot be asked "which id starts with …" (the query protocol has no such
request, and a node's word would not be proof anyway), so candidates come from
verified events the client fetches: its own chain and leases first, then every
request, offer author or lease party its nodes know. A prefix must match exactly one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..output import parse_hex

if TYPE_CHECKING:
    from .light import LightClient

HEX_RE = re.compile(r"[0-9a-fA-F]{1,64}")
MIN_PREFIX = 4  # shorter prefixes match too much to be what anyone meant


def match_prefix(text: str, candidates: Iterable[bytes], what: str) -> bytes:
    """The one candidate whose hex starts with `text` (case-insensitive); a clear
    UsageError when none or several do."""
    p = text.strip().lower()
    if not HEX_RE.fullmatch(p):
        raise UsageError(f"{what} {text!r} is not hex (give the id or a unique prefix)")
    if len(p) < MIN_PREFIX:
        raise UsageError(f"{what} prefix {text!r} is too short; give at least "
                         f"{MIN_PREFIX} hex digits")
    hits = sorted({c for c in candidates if c.hex().startswith(p)})
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise UsageError(f"no {what} known to the nodes starts with {p!r}")
    shown = ", ".join(h.hex()[:max(16, len(p) + 2)] for h in hits[:5])
    raise UsageError(f"{what} prefix {p!r} is ambiguous: it matches {len(hits)} ({shown}"
                     f"{', …' if len(hits) > 5 else ''}); give more hex digits")


def _full(text: str) -> bytes | None:
    t = text.strip()
    if len(t) == 64 and HEX_RE.fullmatch(t):
        return parse_hex(t, "id", exact=32)
    return None


async def resolve(c: LightClient, text: str, what: str) -> bytes:
    """`text` (full hex or unique prefix) as an id of `what`: "request", "lease" or
    "key". Full ids are taken as given (the command then verifies them)."""
    full = _full(text)
    if full is not None:
        return full
    if not HEX_RE.fullmatch(text.strip()) or len(text.strip()) < MIN_PREFIX:
        match_prefix(text, (), what)  # raises the clear error
    if what == "lease":
        evs = await c.lease_events()
        return match_prefix(text, (e.id for e in evs if e.kind == "award"), what)
    if what == "request":
        own = [e.id for e in await c.find_events(kind="request", author=c.key)]
        try:
            return match_prefix(text, own, what)
        except UsageError:
            pass  # not one of ours (or ambiguous among ours): look at every request
        return match_prefix(text, (e.id for e in await c.find_events(kind="request")), what)
    keys: set[bytes] = {c.key}
    for ev in await c.lease_events():
        keys.add(ev.author)
    keys.update(e.author for e in await c.find_events(kind="offer"))
    try:
        return match_prefix(text, keys, what)
    except UsageError:
        pass
    keys.update(e.author for e in await c.find_events(kind="rating"))
    keys.update(e.author for e in await c.find_events(kind="request"))
    return match_prefix(text, keys, what)
