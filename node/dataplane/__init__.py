"""The dataplane: stream protocols (ingest, process), dispersal and subcontracting,
in-order aggregation, lease enforcement and metering.

* `service.DataplaneService`: the provider side a node daemon plugs in.
* `client.stream_through_lease`: the member side (light client, devnet, bench).
* `dispatch`: local/remote step execution with verification and re-dispatch.
* `wire`: header, trailer, process request/response formats and the per-lease key.

Formats and decisions: docs/dataplane.md. The pure parts are in `node/segments.py`
and `node/processors/`.
"""

from ..errors import LeaseRefused, StreamFailed
from .client import (
    StreamResult,
    member_key,
    split_results,
    stream_through_lease,
)
from .dispatch import Contracts, Dispatcher
from .service import DataplaneConfig, DataplaneService, wall_clock_ms
from .wire import (
    TRAILER_SEQ,
    ProcessRequest,
    SegmentLimits,
    StreamHeader,
    Trailer,
    lease_key,
    process_protocol,
    stream_protocol,
)

__all__ = [
    "TRAILER_SEQ",
    "Contracts",
    "DataplaneConfig",
    "DataplaneService",
    "Dispatcher",
    "LeaseRefused",
    "ProcessRequest",
    "SegmentLimits",
    "StreamFailed",
    "StreamHeader",
    "StreamResult",
    "Trailer",
    "lease_key",
    "member_key",
    "process_protocol",
    "split_results",
    "stream_protocol",
    "stream_through_lease",
    "wall_clock_ms",
]
