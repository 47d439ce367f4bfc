"""The provider-side dataplane limits (`DataplaneConfig`) and which of them the
service's stats show."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

__all__ = ["SHOWN_LIMITS", "DataplaneConfig"]

# The limits `DataplaneService.stats()` shows under "limits".
SHOWN_LIMITS = ("process_peer_bytes", "process_total_bytes", "process_sessions_per_peer",
                "process_max_sessions", "process_max_concurrent", "served_max", "served_ttl_s",
                "max_streams", "window", "contractor_unrated", "contractor_min_score_ppm",
                "contractor_addrs_allow", "contractor_addrs_deny")


@dataclass(frozen=True)
class DataplaneConfig:
    """Provider-side limits. Sizes in bytes, times in seconds unless named `_ms`."""

    services: frozenset[str] | None = None  # offered here; None: every processor of the pool
    params: Mapping[str, Any] = field(default_factory=dict)  # ProcessContext.params
    allow: frozenset[bytes] = frozenset()  # provider keys served even without an Offer
    # Process requests (authority, docs/dataplane.md §10): the lease window is widened
    # by this much both ways for segments in flight at its end and clock skew ...
    process_grace_ms: int = 10_000
    # ... and one lease's requests may total its max rate x window x factor + floor.
    volume_factor: float = 4.0
    volume_floor: int = 16 << 20
    # A lease without a max rate has no volume either (a requester can make such a
    # lease itself): its requests are capped per requesting key at the capacity our
    # offer commits to for the service (bytes/s; a service we serve without an offer
    # of its own, such as `identity`, at our largest), with bursts of
    # process_rate_burst_s seconds. Empty: no offers, no cap (an allow-list contractor).
    process_rates: tuple[tuple[str, int], ...] = ()
    process_rate_burst_s: float = 10.0
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0  # per input frame: a slow sender is cut off
    write_timeout_s: float = 30.0  # per output frame: a member that stops reading
    max_header: int = 64 << 10
    max_chunk: int = 1 << 20  # input frame
    max_packet: int = 1 << 20  # lp packets; a member may only ask for less
    max_chains: int = 16
    max_chain_len: int = 8
    max_segment_packets: int = 4096
    max_segment_bytes: int = 4 << 20
    min_segment_age_ms: int = 5
    window: int = 16  # segments in flight per stream (= reorder window)
    max_streams: int = 64
    max_streams_per_lease: int = 16
    local_attempts: int = 2
    max_attempts: int = 4  # per step of a segment, local and remote together
    remote_in_flight: int = 8  # per contractor
    subcontract_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    bad_for_s: float = 30.0  # avoid a contractor that failed for this long
    max_result: int = 64 << 20
    process_timeout_s: float = 60.0  # serving side: read + process one request
    process_max_concurrent: int = 32
    process_sessions: bool = True  # serve /process/2 (False: as a node that predates it)
    process_max_sessions: int = 16  # open process sessions served at once
    process_session_concurrency: int = 4  # requests of one session read and processed at once
    process_idle_s: float = 120.0  # serving side: a session without requests is closed
    # Serving side, across every session and single request (issue 12 item 6): bytes of
    # requests held and responses not yet written, per requesting peer and in total ...
    process_peer_bytes: int = 16 << 20
    process_total_bytes: int = 64 << 20
    process_sessions_per_peer: int = 2  # ... and sessions one peer may hold open
    served_max: int = 256  # `served` stats: requesting keys kept (least recently used go)
    served_ttl_s: float = 3600.0  # ... and dropped after this long without a request
    # Whom we hire (node/dataplane/contractors.py): unrated providers "fallback" (only
    # when no acceptable rated one offers the step), "never" or "always"; rated ones
    # below this score (ppm; the neutral prior is 500_000) never ...
    contractor_unrated: str = "fallback"
    contractor_min_score_ppm: int = 400_000
    # ... and which offer addresses we dial: non-global ones (loopback, private...) only
    # when an allow rule admits them ("127.0.0.0/8" for a devnet); deny rules first.
    contractor_addrs_allow: tuple[str, ...] = ()
    contractor_addrs_deny: tuple[str, ...] = ()
    session_idle_s: float = 30.0  # requesting side: close our idle sessions (< the above)
    burst_ms: int = 250  # token bucket depth, in time at the max rate (at least 4 KiB)
    rate_window_ms: int = 1000  # min-rate judgement window
    lease_check_s: float = 1.0
    close_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.window < 1 or self.max_streams < 1 or self.max_attempts < 1:
            raise UsageError("DataplaneConfig: window, max_streams, max_attempts must be >= 1")
        if self.process_session_concurrency < 1 or self.process_max_sessions < 0:
            raise UsageError("DataplaneConfig: process_session_concurrency must be >= 1 and "
                             "process_max_sessions >= 0")
        if not 1 <= self.process_peer_bytes <= self.process_total_bytes:
            raise UsageError("DataplaneConfig: need 1 <= process_peer_bytes <= "
                             "process_total_bytes")
        if self.process_sessions_per_peer < 1 or self.served_max < 1:
            raise UsageError("DataplaneConfig: process_sessions_per_peer and served_max "
                             "must be >= 1")
        for name in ("header_timeout_s", "idle_timeout_s", "write_timeout_s",
                     "subcontract_timeout_s", "process_timeout_s", "lease_check_s",
                     "process_idle_s", "session_idle_s", "served_ttl_s"):
            if getattr(self, name) <= 0:
                raise UsageError(f"DataplaneConfig.{name} must be positive")

