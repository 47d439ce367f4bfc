"""What a lease authorises on the dataplane (pure): which chains a member's stream may
declare, and which process requests a contractor serves for another provider.

Rules: docs/dataplane.md §10 ("Authority"). Every refusal is an `Unauthorized` with a
stable reason code; the I/O shell counts it and answers the peer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from ..auction import Lease
from ..errors import Reason, Unauthorized

__all__ = [
    "PASS_THROUGH",
    "chain_position",
    "check_process",
    "check_stream_chains",
    "lease_chain",
    "volume_limit",
]

PASS_THROUGH = ("identity",)
"""A declared chain every lease allows: the packets go through unprocessed."""


def lease_chain(lease: Lease, processors: Collection[str]) -> tuple[str, ...]:
    """The processing a lease pays for, in order: its explicit chain; else its service
    when that names a processor known here; else nothing (a transport lease such as
    `bandwidth`). Mirrors `node.client.lease_chain`, which the member uses."""
    if lease.chain:
        return tuple(lease.chain)
    if lease.service in processors:
        return (lease.service,)
    return ()


def chain_position(part: Sequence[str], chain: Sequence[str], at_least: int = 0) -> int | None:
    """The first position >= `at_least` where `part` is a contiguous run of `chain`."""
    k = len(part)
    if k == 0:
        return None
    for p in range(at_least, len(chain) - k + 1):
        if tuple(chain[p : p + k]) == tuple(part):
            return p
    return None


def check_stream_chains(lease: Lease, chains: Sequence[Sequence[str]],
                        processors: Collection[str]) -> None:
    """Each declared chain must be the lease's chain, a contiguous part of it (e.g. only
    `aes-gcm` of `zstd → aes-gcm`), or pass-through (`identity`). A transport lease
    allows pass-through only. Unauthorized("wrong_chain") otherwise."""
    allowed = lease_chain(lease, processors)
    for chain in chains:
        if tuple(chain) == PASS_THROUGH or chain_position(chain, allowed) is not None:
            continue
        what = ("a transport lease carries no processing (declare ['identity'])"
                if not allowed else f"the lease pays for {'→'.join(allowed)} (declare it, a "
                "contiguous part of it, or ['identity'])")
        raise Unauthorized(f"chain {'→'.join(chain)} is not what lease "
                           f"{lease.id.hex()[:12]} was bought for: {what}", Reason.WRONG_CHAIN)


def check_process(lease: Lease | None, lease_id: bytes, requester: bytes,
                  services: Sequence[str], step: int, now_ms: int, grace_ms: int,
                  processors: Collection[str]) -> None:
    """May `requester` have `services` (starting at chain position `step` of the
    member's declared chain) processed here under the lease it named?

    * the lease is known here (`no_lease`; the requester may retry: the lease may
      not have reached us yet);
    * the requester is the lease's provider (`not_lease_provider`);
    * now is inside the lease window widened by `grace_ms` both ways, for segments in
      flight at the end and clock skew between providers (`outside_window`);
    * the services are a contiguous run of the lease's chain at a position >= `step`
      (a declared chain may be a part of the lease's chain, so positions only grow)
      (`not_in_chain`).
    """
    short = lease_id.hex()[:12]
    if lease is None:
        raise Unauthorized(f"no lease {short} is known here (yet)", Reason.NO_LEASE)
    if requester != lease.provider:
        raise Unauthorized(f"lease {short} is provided by {lease.provider.hex()[:12]}, not "
                           "by the requester; only a lease's provider may subcontract it",
                           Reason.NOT_LEASE_PROVIDER)
    if not lease.start_ms - grace_ms <= now_ms < lease.end_ms + grace_ms:
        raise Unauthorized(f"lease {short} is active in [{lease.start_ms}, {lease.end_ms}), "
                           f"not at {now_ms}", Reason.OUTSIDE_WINDOW)
    if chain_position(services, lease_chain(lease, processors), step) is None:
        raise Unauthorized(f"lease {short} does not pay for {'→'.join(services)} at chain "
                           f"position {step}", Reason.NOT_IN_CHAIN)


def volume_limit(lease: Lease, factor: float, floor: int, grace_ms: int) -> int | None:
    """Bytes of process requests a contractor accepts for one lease in total: what the
    lease can carry at its max rate over its window (plus grace), times `factor`
    (segment framing, per-segment overheads, re-dispatch, earlier steps' expansion),
    plus `floor`. None: the lease has no max rate, so no volume follows from it."""
    if lease.max_rate_bps is None:
        return None
    window_ms = lease.end_ms - lease.start_ms + 2 * grace_ms
    return int(lease.max_rate_bps // 8 * window_ms / 1000 * factor) + floor
