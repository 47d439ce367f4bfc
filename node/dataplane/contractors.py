"""Choosing subcontractors (pure; issue 13 item 4): whom to trust with a step, and
which of its offer's addresses we may dial.

* **Whom.** Candidates come ranked by `rank_offers` (provider reputation as of now, then
  price, capacity, key). A *rated* provider has at least one accepted rating as a
  provider; a rated one whose score is below `min_score_ppm` is never chosen. Policy
  `unrated`: `"fallback"` (default) — unrated providers (anyone can publish an offer
  with a fresh key) only when no acceptable rated provider offers the step;
  `"never"` — rated ones only; `"always"` — everyone acceptable, in ranking order.
* **Where.** An offer's addresses are the offerer's claim: dialing them blindly lets a
  stranger aim us at our own loopback, LAN or anything else. Each address's IP (a DNS
  name is resolved once, and we dial the IP we checked) must pass an
  `EgressPolicy` (node/dataplane/egress.py): loopback, private, link-local and other
  non-global addresses are refused unless an `allow` rule (config
  `dataplane.contractor_addrs_allow`, e.g. `127.0.0.0/8` for a devnet) admits them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

from ..auction import RankedOffer
from ..errors import UsageError

__all__ = ["UNRATED_POLICIES", "DialTarget", "choose", "dial_target"]

UNRATED_POLICIES: Final = ("fallback", "never", "always")


def choose(ranked: Sequence[RankedOffer], unrated: str, min_score_ppm: int) -> list[RankedOffer]:
    """The candidates we may hire, best first (see the module doc)."""
    if unrated not in UNRATED_POLICIES:
        raise UsageError(f"unrated policy must be one of {UNRATED_POLICIES}, got {unrated!r}")
    rated = [r for r in ranked if r.reputation.ratings > 0 and r.reputation.ppm >= min_score_ppm]
    fresh = [r for r in ranked if r.reputation.ratings == 0]
    if unrated == "never":
        return rated
    if unrated == "fallback":
        return rated or fresh
    ok = {id(r) for r in rated} | {id(r) for r in fresh}
    return [r for r in ranked if id(r) in ok]


DialTarget = tuple[str, str, int, str]
"""(family "ip4" | "ip6" | "dns" | "dns4" | "dns6", host, TCP port, the rest after
the port, e.g. "" or "/p2p/<id>")."""


def dial_target(maddr: str) -> DialTarget | None:
    """The host and TCP port of an offer address `/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT[...]`,
    None for anything else (we dial nothing we cannot check)."""
    parts = maddr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") \
            or parts[2] != "tcp":
        return None
    try:
        port = int(parts[3])
    except ValueError:
        return None
    if not 1 <= port <= 65535 or not parts[1]:
        return None
    if parts[0] in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(parts[1])
        except ValueError:
            return None
        if ip.version != (4 if parts[0] == "ip4" else 6):
            return None
    rest = "/" + "/".join(parts[4:]) if len(parts) > 4 else ""
    return parts[0], parts[1], port, rest
