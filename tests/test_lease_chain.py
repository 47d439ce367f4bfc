"""What a lease's stream is processed with (node.client.lease_chain)."""

from __future__ import annotations

from dataclasses import replace

from node.auction import Lease
from node.client import lease_chain


def _lease(service: str, chain: tuple[str, ...]) -> Lease:
    return Lease(id=bytes(32), request=bytes(32), bid=bytes(32), provider=bytes(32),
                 recipient=b"\x01" * 32, service=service, chain=chain, start_ms=0, end_ms=1,
                 max_rate_bps=None, min_rate_bps=None, price=1, currency="EUR", devices=(),
                 phones=(), users=(), max_devices=None, group_members=(), payers=(),
                 sponsorships=())


def test_transport_lease_passes_through() -> None:
    assert lease_chain(_lease("bandwidth", ())) == ["identity"]


def test_processing_service_and_explicit_chain() -> None:
    lease = _lease("zstd", ())
    assert lease_chain(lease) == ["zstd"]
    assert lease_chain(replace(lease, chain=("zstd", "aes-gcm"))) == ["zstd", "aes-gcm"]
