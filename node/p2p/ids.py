"""Peer identities: Ed25519 keys, libp2p peer ids and the authenticated remote end."""

from __future__ import annotations

from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair as ed25519_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.peer.id import ID

from ..errors import InvalidMessage, Reason, UsageError

PeerId = ID
"""The libp2p peer id type (`libp2p.peer.id.ID`); `str(peer_id)` is its base58 form."""


def _keypair_from_seed(seed: bytes) -> KeyPair:
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise UsageError("the node key seed must be exactly 32 bytes (an Ed25519 seed)")
    return ed25519_key_pair(seed)


def peer_id_from_pubkey(pub32: bytes) -> ID:
    """The libp2p peer id of a raw 32-byte Ed25519 public key (identity multihash)."""
    if not isinstance(pub32, bytes) or len(pub32) != 32:
        raise UsageError("an Ed25519 public key is exactly 32 bytes")
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(pub32))


def parse_peer_id(value: ID | str | bytes) -> ID:
    """Accept an `ID`, its base58 string or its raw bytes; raise InvalidMessage if unusable."""
    if isinstance(value, ID):
        return value
    if isinstance(value, bytes):
        return ID(value)
    try:
        return ID.from_base58(value)
    except ValueError as exc:
        raise InvalidMessage(f"not a peer id: {value!r}", Reason.BAD_PEER_ID) from exc


def pubkey_from_peer_id(peer_id: ID | str | bytes) -> bytes:
    """The raw 32-byte Ed25519 public key inside a peer id; InvalidMessage if it has none."""
    pid = parse_peer_id(peer_id)
    key = pid.extract_public_key()
    if key is None or key.get_type() != KeyType.Ed25519:
        raise InvalidMessage(f"peer id {pid} does not embed an Ed25519 key", Reason.BAD_PEER_ID)
    raw = key.to_bytes()
    if len(raw) != 32:
        raise InvalidMessage(f"peer id {pid} embeds a malformed key", Reason.BAD_PEER_ID)
    return raw


def remote_peer_id(stream: INetStream) -> ID:
    """The authenticated (noise handshake) peer id at the other end of a stream."""
    peer: ID = stream.muxed_conn.peer_id
    return peer


def remote_pubkey(stream: INetStream) -> bytes:
    """The remote peer's raw 32-byte Ed25519 public key (authenticated by noise)."""
    return pubkey_from_peer_id(remote_peer_id(stream))

