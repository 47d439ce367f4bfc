"""The one exception hierarchy of bidmesh.

`BidmeshError` is the root. Two branches matter to callers:

* `PeerError`: a peer (or a file, or a user's input) sent something invalid. The node
  rejects it, counts it, and carries on. Each carries a short machine `reason` code
  that shows up in counters, logs and `--json` output.
* `UsageError`: we were misused (bad config, wrong arguments, a missing key file).
  The message says what was wrong and what to do.

`OperationError` covers the rest: a remote refused, a timeout, nobody could serve.
"""

from __future__ import annotations


class BidmeshError(Exception):
    """Root of every error bidmesh raises on purpose."""


class PeerError(BidmeshError):
    """Input from outside was invalid. `reason` is a stable short code."""

    reason: str = "invalid"

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

    reason = "unauthorized"


class RateLimited(PeerError):
    """The peer sent faster than it is allowed to."""

    reason = "rate_limited"


class UsageError(BidmeshError):
    """We were misused: bad config, bad arguments, unusable files."""


class ConfigError(UsageError):
    """A config file or value is invalid; the message names the key."""


class KeyFileError(UsageError):
    """A key file is missing, malformed or readable by others."""


class OperationError(BidmeshError):
    """An operation could not complete (timeouts, refusals, nobody able to serve)."""


class RemoteError(OperationError):
    """The remote side answered with an error."""


class ProcessingError(OperationError):
    """A processing service failed on a segment."""
