"""The light client: a recipient's (or member device's) view of the market, trusting no node.

A light client keeps only its key and a small state file (its own chain head) in a
client directory, and talks to one or more nodes over the query protocol
(node/query.py). It never takes a node's word for anything:

* every event a node returns is decoded with full signature verification (and must
  match what was asked: the requested ids, filters or bundle);
* its own events are checked as a chain (author, consecutive seq, `prev` links)
  before it moves its head forward;
* derived views (auction standing and winner, leases, reputation) are recomputed
  locally from the returned events with the same pure `Market` fold every node uses;
* with two or more nodes configured, each answer set is compared by digest and any
  disagreement is reported (`LightClient.disagreements`); the client folds the union
  of the verified events, so a node can only hide events, not add false ones.

    async with LightClient.open(client_dir, ["/ip4/…/tcp/4001/p2p/12D3…"]) as c:
        req = await c.request("bandwidth", duration_ms=3_600_000, reserve=500,
                              close_in_ms=30_000)
        async for bids in c.watch_bids(req.id): ...
        award = await c.award(req.id)

The Python API and the `bidmesh client` command are documented in docs/client.md.

Modules: `results` (what the client answers with), `state` (the client directory),
`verify` (checks on node answers, the local fold), `transport` (`QueryClient`: nodes,
paging, verified raw queries), `light` (`LightClient`: views, own chain, actions,
dataplane, tunnels), `resolve` (id prefixes). Everything is importable from here.
"""

from __future__ import annotations

from ..errors import UntrustedAnswer
from .light import LightClient
from .results import (
    AuctionInfo,
    BidInfo,
    ChainHead,
    Disagreement,
    LeaseInfo,
    NodeFault,
    ReputationInfo,
    Unverified,
    lease_chain,
    now_ms,
)
from .state import KEY_FILE, STATE_FILE, ClientState
from .transport import MAX_PAGES, QueryClient
from .verify import fold, set_digest

__all__ = [
    "KEY_FILE", "MAX_PAGES", "STATE_FILE", "AuctionInfo", "BidInfo", "ChainHead", "ClientState",
    "Disagreement", "LeaseInfo", "LightClient", "NodeFault", "QueryClient", "ReputationInfo",
    "UntrustedAnswer", "Unverified", "fold", "lease_chain", "now_ms", "set_digest",
]
