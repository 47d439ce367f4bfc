"""Leases: the pure object the dataplane checks, and member-device delegation."""

from __future__ import annotations

from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions

from ..errors import Reason, Unauthorized, UsageError
from ..keys import Identity

DELEGATION_TAG = b"bidmesh/delegation/v1\n"
MAX_LABEL = 64


@dataclass(frozen=True)
class Lease:
    """The right to use a provider's service, derived from a valid award (id = award id).

    The dataplane reads the plain fields (window, rate limits) and asks `may_use`."""

    id: bytes
    request: bytes
    bid: bytes  # winning bid (or commit) id
    provider: bytes
    recipient: bytes
    service: str
    chain: tuple[str, ...]
    start_ms: int
    end_ms: int  # exclusive
    max_rate_bps: int | None
    min_rate_bps: int | None
    price: int
    currency: str
    devices: tuple[bytes, ...]
    phones: tuple[str, ...]
    users: tuple[str, ...]
    max_devices: int | None
    group_members: tuple[bytes, ...]  # pledgers that pay or are sponsored (sorted)
    payers: tuple[tuple[bytes, int], ...]  # (willing member, pledged amount); solo: recipient
    sponsorships: tuple[tuple[bytes, bytes], ...]  # (sponsor, sponsored member)
    keys: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = frozenset((self.recipient, *self.devices, *self.group_members))
        object.__setattr__(self, "keys", keys)

    def active(self, at_ms: int) -> bool:
        return self.start_ms <= at_ms < self.end_ms

    def may_use(self, peer_pubkey: bytes, at_ms: int) -> bool:
        """Recipient, listed device keys and group members, inside the window."""
        return self.start_ms <= at_ms < self.end_ms and peer_pubkey in self.keys

    def check_delegation(self, device_key: bytes, token: bytes) -> str:
        """Verify a `make_delegation` token for `device_key`; return its label.

        The signer must be the recipient or a group member; the label must be a
        listed phone or user, or anything when the lease allows `max_devices`."""
        if len(token) < 96 + 1 or len(token) > 96 + MAX_LABEL:
            raise Unauthorized("delegation token has the wrong size", Reason.BAD_DELEGATION)
        signer, sig, raw = token[:32], token[32:96], token[96:]
        if signer != self.recipient and signer not in self.group_members:
            raise Unauthorized("delegation not signed by the recipient or a group member")
        msg = DELEGATION_TAG + self.id + device_key + raw
        try:
            nacl.bindings.crypto_sign_open(sig + msg, signer)
        except (nacl.exceptions.BadSignatureError, ValueError) as e:
            raise Unauthorized("delegation signature does not verify", Reason.BAD_DELEGATION) from e
        try:
            label = raw.decode()
        except UnicodeDecodeError as e:
            raise Unauthorized("delegation label is not UTF-8", Reason.BAD_DELEGATION) from e
        if label in self.phones or label in self.users or self.max_devices is not None:
            return label
        raise Unauthorized(f"delegation label {label!r} names no member of lease "
                           f"{self.id.hex()[:12]}")

    def shares(self) -> dict[bytes, int]:
        """The price split over willing payers in proportion to their pledges (largest
        remainder, ties by key); sums to the price when pledges cover it."""
        total = sum(a for _, a in self.payers)
        if total <= 0:
            return {}
        base = {m: self.price * a // total for m, a in self.payers}
        rest = self.price - sum(base.values())
        order = sorted(self.payers, key=lambda p: (-(self.price * p[1] % total), p[0]))
        for m, _ in order[:max(rest, 0)]:
            base[m] += 1
        return base


def make_delegation(recipient: Identity, lease_id: bytes, device_key: bytes, label: str) -> bytes:
    """A token letting `device_key` use a lease as `label` (a phone, user or device
    name): signer key + Ed25519 signature over a domain-tagged message + label."""
    raw = label.encode()
    if not 1 <= len(raw) <= MAX_LABEL or len(lease_id) != 32 or len(device_key) != 32:
        raise UsageError(f"label must be 1..{MAX_LABEL} bytes; ids and keys 32 bytes")
    return recipient.public + recipient.sign(DELEGATION_TAG + lease_id + device_key + raw) + raw


class DeviceAdmission:
    """The provider's count of distinct delegated devices of one lease."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.devices: dict[bytes, str] = {}

    def admit(self, device_key: bytes, at_ms: int, token: bytes | None = None) -> str:
        """Return the member label ("member" for listed keys) or raise Unauthorized."""
        lease = self.lease
        if not lease.active(at_ms):
            raise Unauthorized(f"lease {lease.id.hex()[:12]} is not active at {at_ms}")
        if device_key in lease.keys:
            return "member"
        if token is None:
            raise Unauthorized("not a lease member; present a delegation token")
        label = lease.check_delegation(device_key, token)
        if device_key not in self.devices:
            if lease.max_devices is not None and len(self.devices) >= lease.max_devices:
                raise Unauthorized(f"lease allows at most {lease.max_devices} delegated devices")
            self.devices[device_key] = label
        return label
