"""The one exception hierarchy of bidmesh.

`BidmeshError` is the root. Two branches matter to callers:

* `PeerError`: a peer (or a file, or a user's input) sent something invalid. The node
  rejects it, counts it, and carries on. Each carries a short machine `reason` code
  that shows up in counters, logs and `--json` output.
* `UsageError`: we were misused (bad config, wrong arguments, a missing key file).
  The message says what was wrong and what to do.

`OperationError` covers the rest: a remote refused, a timeout, nobody could serve.

Every exception class bidmesh defines lives here, so a caller can see the whole tree
in one place (the modules that raise them import them from here).
"""

from __future__ import annotations

import enum
from typing import Protocol


class Reason(enum.StrEnum):
    """The stable reason codes of the protocol: why an event, record or message was
    refused, and what a peer is faulted for. They are part of the protocol (docs/
    PROTOCOL.md, test vectors) and of status, logs and metrics; a `StrEnum`, so each
    member *is* its string on the wire, in JSON and as a counter key. The dataplane and
    tunnel codes are listed in docs/dataplane.md."""

    INVALID = "invalid"  # PeerError without a more precise code
    # Decoding any peer input (codec, frames, messages).
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    NON_CANONICAL = "non_canonical"
    TRUNCATED = "truncated"
    EOF = "eof"  # a clean end of stream: StreamClosed, never a fault
    UNKNOWN_REQUEST = "unknown_request"
    UNKNOWN_RESPONSE = "unknown_response"
    # Events (self-contained checks) and the ledger's chain rules.
    BAD_VERSION = "bad_version"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KIND = "unknown_kind"
    BAD_SCHEMA = "bad_schema"
    BAD_CHAIN = "bad_chain"
    PREV_MISMATCH = "prev_mismatch"
    TS_REGRESS = "ts_regress"
    PENDING_FULL = "pending_full"  # transient: our buffer, not the event
    PENDING_EXPIRED = "pending_expired"
    STORE_ERROR = "store_error"  # our disk, not the event
    # Rights and rates.
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    # What a light client or a sync session holds against a node.
    UNTRUSTED_ANSWER = "untrusted_answer"
    BAD_PAGE = "bad_page"
    WRONG_RESPONSE = "wrong_response"
    BAD_FORK_PROOF = "bad_fork_proof"
    BAD_RECON = "bad_recon"
    # ... and what the light client holds against an answer (docs/client.md).
    FORGED_EVENT = "forged_event"
    UNASKED_EVENT = "unasked_event"
    WRONG_ANSWER = "wrong_answer"
    BAD_CURSOR = "bad_cursor"
    OWN_FORK = "own_fork"
    # `bidmesh ledger check` problems with a record of a file (fork, missing predecessor).
    FORK = "fork"
    MISSING_PREV = "missing_prev"
    # A peer id that does not parse (node/p2p/ids.py); an op the control socket does not
    # know (node/control_server.py, which also answers malformed, internal...).
    BAD_PEER_ID = "bad_peer_id"
    UNKNOWN_OP = "unknown_op"
    # The dataplane's parsers of member input: packets, segments, frames (dataplane.md §7).
    OVERSIZED_PACKET = "oversized_packet"
    TRUNCATED_PACKET = "truncated_packet"
    UNKNOWN_CHAIN = "unknown_chain"
    UNKNOWN_PROTOCOL = "unknown_protocol"
    MALFORMED_SEGMENT = "malformed_segment"
    MALFORMED_FRAME = "malformed_frame"
    TRUNCATED_FRAME = "truncated_frame"
    # A stream, tunnel or process request outside its lease (the member sees
    # LeaseRefused / TunnelUnauthorized): lease, window, membership, authority, volume.
    NO_LEASE = "no_lease"
    NOT_OUR_LEASE = "not_our_lease"
    NOT_LEASE_PROVIDER = "not_lease_provider"
    WRONG_SERVICE = "wrong_service"
    OUTSIDE_WINDOW = "outside_window"
    NOT_MEMBER = "not_member"
    BAD_DELEGATION = "bad_delegation"
    LEASE_CLOSED = "lease_closed"
    LEASE_ENDED = "lease_ended"
    WRONG_CHAIN = "wrong_chain"
    NOT_IN_CHAIN = "not_in_chain"
    OVER_VOLUME = "over_volume"
    OVER_RATE = "over_rate"
    # Dataplane streams and process requests: formats, what a provider serves, and how
    # a stream or request ended (trailers, error answers; dataplane.md §8-§10).
    BAD_HEADER = "bad_header"
    BAD_LIMITS = "bad_limits"
    BAD_REQUEST = "bad_request"
    BAD_RESPONSE = "bad_response"
    MALFORMED_TRAILER = "malformed_trailer"
    OVERSIZED_RESPONSE = "oversized_response"
    OUT_OF_ORDER = "out_of_order"
    BAD_KEY = "bad_key"
    UNKNOWN_SERVICE = "unknown_service"
    UNKNOWN_PROVIDER = "unknown_provider"
    PROCESSING_FAILED = "processing_failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"  # the provider stopped the stream or tunnel
    INTERNAL = "internal"  # a bug on our side, not the peer's input
    FAILED = "failed"  # none of the above
    # Tunnels: the opening, egress, and why an open tunnel ended (dataplane.md §14).
    BAD_OPEN = "bad_open"
    BAD_FRAME = "bad_frame"
    EGRESS_DISABLED = "egress_disabled"
    EGRESS_DENIED = "egress_denied"
    PRIVATE_DESTINATION = "private_destination"
    TOO_MANY_TUNNELS = "too_many_tunnels"
    RESOLVE_FAILED = "resolve_failed"
    CONNECTION_REFUSED = "connection_refused"
    UNREACHABLE = "unreachable"
    IDLE = "idle"
    DESTINATION_RESET = "destination_reset"
    MEMBER_RESET = "member_reset"
    STREAM_FAILED = "stream_failed"
    CLOSED = "closed"  # the provider closed without answering the opening
    BROKEN = "broken"  # the member lost its connection to the provider
    # The local SOCKS5 front of tunnels (node/socks.py, node/tunnel_proxy.py): why a
    # client's handshake was rejected, and the provider being out of reach.
    BAD_ADDRESS_TYPE = "bad_address_type"
    BAD_COMMAND = "bad_command"
    BAD_HOST = "bad_host"
    BAD_PORT = "bad_port"
    NO_ACCEPTABLE_METHOD = "no_acceptable_method"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    CLIENT_RESET = "client_reset"
    PROVIDER_UNREACHABLE = "provider_unreachable"


class _ErrorTrailer(Protocol):
    """What `StreamFailed` reads from a dataplane trailer (node/dataplane/wire.py)."""

    @property
    def reason(self) -> str: ...

    @property
    def error(self) -> str: ...


class BidmeshError(Exception):
    """Root of every error bidmesh raises on purpose."""


class PeerError(BidmeshError):
    """Input from outside was invalid. `reason` is a stable short code."""

    reason: str = Reason.INVALID

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidEvent(PeerError):
    """An event failed a self-contained check (size, codec, signature, schema, chain)."""


class InvalidMessage(PeerError):
    """A wire message (sync, query, dataplane frame) was malformed or too large."""


class Unauthorized(PeerError):
    """The peer is not allowed to do this (no lease, outside the window, not a party)."""

    reason: str = Reason.UNAUTHORIZED


class RateLimited(PeerError):
    """The peer sent faster than it is allowed to."""

    reason: str = Reason.RATE_LIMITED


class LimitExceeded(RateLimited):
    """A scope is full; `scope` says which (e.g. "conns_per_ip", "streams_per_peer_protocol")."""

    def __init__(self, scope: str, message: str) -> None:
        super().__init__(message, f"limit_{scope}")
        self.scope = scope


class SocksError(InvalidMessage):
    """The client's greeting or request is not what we serve; `code` is the reply to
    send before closing (None: close without a reply, e.g. not SOCKS5 at all)."""

    def __init__(self, message: str, reason: str, code: int | None) -> None:
        super().__init__(message, reason)
        self.code = code


class UntrustedAnswer(PeerError):
    """A node returned something that does not verify: a forged or altered event, an
    event that was not asked for, or a chain of our own events that does not link."""

    reason: str = Reason.UNTRUSTED_ANSWER


class UsageError(BidmeshError):
    """We were misused: bad config, bad arguments, unusable files."""


class ConfigError(UsageError):
    """A config file or value is invalid; the message names the key."""


class KeyFileError(UsageError):
    """A key file is missing, malformed or readable by others."""


class IncompatibleDependency(UsageError):
    """An installed dependency is not the release bidmesh was written for."""


class OperationError(BidmeshError):
    """An operation could not complete (timeouts, refusals, nobody able to serve)."""


class StreamTimeout(OperationError):
    """A network operation (dial, stream open, read, write, request) ran out of time."""


class StreamClosed(OperationError):
    """The peer closed the stream cleanly where a new frame could begin: the end of
    what it sends, not invalid input, so never counted against it (a stream that ends
    inside a frame is `InvalidMessage` "truncated")."""

    reason: str = Reason.EOF


class ClientGone(OperationError):
    """A local client (e.g. of the SOCKS proxy) reset or closed its connection under us."""


class RemoteError(OperationError):
    """The remote side answered with an error."""


class RequestRefused(RemoteError):
    """The remote request handler answered with an error; `reason` is its short code."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StreamFailed(RemoteError):
    """The provider ended the stream with an error trailer (`reason`, `trailer`)."""

    def __init__(self, trailer: _ErrorTrailer) -> None:
        super().__init__(f"provider refused or failed the stream ({trailer.reason}): "
                         f"{trailer.error}")
        self.reason = trailer.reason
        self.trailer = trailer


class LeaseRefused(StreamFailed, Unauthorized):
    """The provider refused us under this lease (not a member, outside the window...)."""


class TunnelRefused(RemoteError):
    """The provider refused to open the tunnel; `reason` is its code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"tunnel refused ({reason}): {message}")
        self.reason = reason


class TunnelUnauthorized(TunnelRefused, Unauthorized):
    """Refused under the lease: not a member, outside the window, wrong lease..."""

    def __init__(self, reason: str, message: str) -> None:
        TunnelRefused.__init__(self, reason, message)


class TunnelFailed(RemoteError):
    """An open tunnel ended in error: the provider's END reason (`lease_ended`, `idle`,
    `destination_reset`...) or `broken` when the connection to the provider was lost."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"tunnel failed ({reason}): {message}")
        self.reason = reason


class ProcessingError(OperationError):
    """A processing service failed on a segment."""


class Refusal(BidmeshError):
    """A stream or tunnel we serve is refused or ended; `reason` is the code sent to the
    peer in the trailer or END frame (lease_ended, egress_denied, internal...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StepFailed(BidmeshError):
    """A devnet step did not do what it should."""
