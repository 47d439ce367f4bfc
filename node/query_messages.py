"""The query protocol's messages and limits (split from `query`, which re-exports
every name): requests and responses declared with node/schema.py, their bounded
decoders, and the protocol id. Specified in docs/PROTOCOL.md ("Query protocol")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import schema
from .errors import InvalidMessage, Reason
from .events import KINDS, MAX_SEQ, MAX_TS_MS, MAX_WIRE, NETWORK_RE
from .ledger import AppendResult, Status
from .schema import Bool, Bytes, Enum, Int, List, Nested, Opt, Str, f

# ------------------------------------------------------------------ limits

MAX_IDS = 256  # ids per GET request, authors per HEADS request
MAX_KEYS = 64  # keys per REPUTATION request
MAX_SUBMIT = 16  # records per SUBMIT request
MAX_LIMIT = 1024  # records per page
MAX_PAGE_BYTES = 1024 * 1024  # record bytes per page (one record may exceed it)
MIN_PAGE_BYTES = 1024
MAX_REQUEST = MAX_SUBMIT * (MAX_WIRE + 8) + 1024
MAX_RESPONSE = MAX_PAGE_BYTES + MAX_WIRE + 64 * 1024
MAX_CURSOR = (1 << 63) - 1
DEFAULT_LIMIT = 512
DEFAULT_PAGE_BYTES = 512 * 1024
KIND_NAMES = frozenset(KINDS)


def protocol_id(network: str) -> str:
    return f"/bidmesh/{network}/query/1"


# ------------------------------------------------------------------ messages
#
# Declared with node/schema.py: each message is a `Row` sent as `[TAG, field...]`;
# `decode_request` / `decode_response` bound the size and reject anything that does
# not match the declaration with `InvalidMessage` (reason "malformed", or
# "unknown_kind" for a FIND naming no event kind).

Message = schema.Message
ID = Bytes(32)
KEY = Bytes(32)
RECORD = Bytes(1, MAX_WIRE)  # one event's wire bytes
CURSOR = Int(0, MAX_CURSOR)


class KindName(Str):
    """An event kind's name; an unknown one is refused as `unknown_kind`."""

    def __init__(self) -> None:
        super().__init__(32)

    def check(self, v: Any, path: str, bad: schema.Invalid = schema.bad) -> str:
        name = super().check(v, path, bad)
        if name not in KIND_NAMES:
            raise InvalidMessage(f"field {path!r}: unknown event kind {name!r}",
                                 Reason.UNKNOWN_KIND)
        return name


@dataclass(frozen=True)
class Page(schema.Row):
    """Paging of a query that returns events."""

    after: int = f(CURSOR, default=0)
    limit: int = f(Int(1, MAX_LIMIT), default=DEFAULT_LIMIT)
    max_bytes: int = f(Int(MIN_PAGE_BYTES, MAX_PAGE_BYTES), default=DEFAULT_PAGE_BYTES)


PAGE = Nested(Page)


@dataclass(frozen=True)
class GetEvents(Message):
    """Events by id (1..256); unknown ids are simply absent from the answer."""

    TAG = 1
    ids: tuple[bytes, ...] = f(List(ID, MAX_IDS, unique=True, lo=1))


@dataclass(frozen=True)
class FindEvents(Message):
    """Events matching every given filter (kind, author, referenced id), paged."""

    TAG = 2
    kind: str | None = f(Opt(KindName()), default=None)
    author: bytes | None = f(Opt(KEY), default=None)
    ref: bytes | None = f(Opt(ID), default=None)
    page: Page = f(PAGE, default_factory=Page)


@dataclass(frozen=True)
class AuctionBundle(Message):
    """A request event and every bid, commit, pledge and award referencing it, and
    every reveal referencing one of its commits."""

    TAG = 3
    request: bytes = f(ID)
    page: Page = f(PAGE, default_factory=Page)


@dataclass(frozen=True)
class ReputationBundle(Message):
    """Everything needed to re-derive the reputation of 1..64 keys (see
    `reputation_ids`)."""

    TAG = 4
    keys: tuple[bytes, ...] = f(List(KEY, MAX_KEYS, unique=True, lo=1))
    page: Page = f(PAGE, default_factory=Page)


@dataclass(frozen=True)
class LeasesOf(Message):
    """Every lease `key` is a party to (recipient, provider, member device, group
    member): each lease's auction bundle plus the events referencing the lease
    (payments, ratings, usage, subcontracts)."""

    TAG = 5
    key: bytes = f(KEY)
    page: Page = f(PAGE, default_factory=Page)


@dataclass(frozen=True)
class GetHeads(Message):
    """The node's effective chain head of each author (1..256)."""

    TAG = 6
    authors: tuple[bytes, ...] = f(List(KEY, MAX_IDS, unique=True, lo=1))


@dataclass(frozen=True)
class GetDigest(Message):
    TAG = 7


@dataclass(frozen=True)
class Submit(Message):
    """Wire records (1..16) for the node to validate, store and gossip."""

    TAG = 8
    records: tuple[bytes, ...] = f(List(RECORD, MAX_SUBMIT, lo=1))


QueryRequest = (GetEvents | FindEvents | AuctionBundle | ReputationBundle | LeasesOf | GetHeads
                | GetDigest | Submit)


@dataclass(frozen=True)
class EventsPage(Message):
    """Wire records in arrival order; pass `cursor` as `after` for the next page."""

    TAG = 1
    records: tuple[bytes, ...] = f(List(RECORD, MAX_LIMIT + MAX_IDS))
    cursor: int = f(CURSOR)
    more: bool = f(Bool())

    def validate(self) -> None:
        if sum(len(r) for r in self.records) > MAX_PAGE_BYTES + MAX_WIRE:
            raise self.reject("records", "exceed the page byte limit")


@dataclass(frozen=True)
class HeadInfo(schema.Row):
    author: bytes = f(KEY)
    seq: int = f(Int(0, MAX_SEQ))  # 0: no event of this author (or forked at seq 1)
    id: bytes | None = f(Opt(ID))
    ts_ms: int = f(Int(0, MAX_TS_MS))
    # Lowest seq with a fork proof; the head is just before it.
    fork_seq: int | None = f(Opt(Int(1, MAX_SEQ)))

    def validate(self) -> None:
        if (self.id is None) != (self.seq == 0):
            raise self.reject("id", "must be nil exactly when seq is 0")


@dataclass(frozen=True)
class Heads(Message):
    TAG = 2
    heads: tuple[HeadInfo, ...] = f(List(Nested(HeadInfo), MAX_IDS))


@dataclass(frozen=True)
class Digest(Message):
    TAG = 3
    network: str = f(Str(32, 1, NETWORK_RE.pattern))
    digest: bytes = f(ID)
    events: int = f(CURSOR)
    authors: int = f(CURSOR)
    forks: int = f(CURSOR)


STATUSES = tuple(s.value for s in Status)


@dataclass(frozen=True)
class SubmitResult(schema.Row):
    status: str = f(Enum(*STATUSES))  # accepted | duplicate | pending | rejected | fork
    event_id: bytes | None = f(Opt(ID))
    reason: str | None = f(Opt(Str(64)))  # stable code for rejected
    detail: str = f(Str(512))

    @property
    def ok(self) -> bool:
        return self.status in ("accepted", "duplicate", "pending")

    @classmethod
    def of(cls, res: AppendResult) -> SubmitResult:
        # str(): a Reason member is a str subclass, and the schema takes exact strs.
        reason = None if res.reason is None else str(res.reason)
        return cls(res.status.value, res.event_id, reason, res.detail[:512])


@dataclass(frozen=True)
class Submitted(Message):
    TAG = 4
    results: tuple[SubmitResult, ...] = f(List(Nested(SubmitResult), MAX_SUBMIT))


QueryResponse = EventsPage | Heads | Digest | Submitted
REQUESTS = schema.Messages("query", "request", MAX_REQUEST, GetEvents, FindEvents,
                           AuctionBundle, ReputationBundle, LeasesOf, GetHeads, GetDigest, Submit)
RESPONSES = schema.Messages("query", "response", MAX_RESPONSE,
                            EventsPage, Heads, Digest, Submitted)


def decode_request(data: bytes) -> QueryRequest:
    return REQUESTS.decode(data)  # type: ignore[return-value]  # one of the classes above


def decode_response(data: bytes) -> QueryResponse:
    return RESPONSES.decode(data)  # type: ignore[return-value]  # one of the classes above
