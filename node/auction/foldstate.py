"""The state `fold.IncrementalMarket` keeps (split from `fold`, which imports these):
canonical keys, the merged market's ordered dicts and lists, one partition's
bookkeeping, a provider's kept offers."""

from __future__ import annotations

import pickle
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar, cast

from ..events import Body, Event

if TYPE_CHECKING:
    from .market import Market

CKey = tuple[int, bytes, int]  # canonical key (ts_ms, author, seq)
_MOVERS = ("commit", "award", "subcontract")  # kinds other events are routed through
_DICTS = ("auctions", "awards", "leases", "paid", "payments", "ratings", "subcontracts",
          "usage", "offers")
# The merged dicts folding one event of a kind can add keys to (Market's handlers):
# `_link` looks at those only (it runs per folded event). Other kinds add none.
_KIND_DICTS: dict[str, tuple[str, ...]] = {
    "request": ("auctions",), "award": ("awards", "leases", "paid"),
    "payment": ("payments", "paid"), "rating": ("ratings",),
    "subcontract": ("subcontracts",), "usage": ("usage",), "offer": ("offers",),
    "bid": (), "commit": (), "reveal": (), "pledge": (),
}
_REASSIGNED = ("paid", "offers")  # dicts whose values a fold replaces (<= 1 key a partition)


def ckey(ev: Event) -> CKey:
    return (ev.ts_ms, ev.author, ev.seq)


class _Ordered:
    """A dict of the merged market, kept in the order a full fold inserts its keys
    (by the canonical key of the event that first set each, then the key). A key
    inserted out of order is noted (`late`) and the dict is rebuilt in place once, at
    the end of `market()`: O(its size), only when back-dated events arrived. No list
    of the order is kept (it cost ~64 bytes a key, cold ones included): the keys not
    late are in order in the dict already, the late ones are inserted among them.
    With a cold store the dict (a `LazyDict`) holds the hot entries only: `pos`,
    `late` and the rebuild are theirs; cold keys are the store's."""

    __slots__ = ("d", "late", "pos", "top", "watch")

    def __init__(self, d: dict[Any, Any]) -> None:
        self.d = d
        self.pos: dict[Any, CKey] = {}
        # Keys put before `top` (or thawed) since the last rebuild (a dict: an ordered
        # set, as a thaw can add many).
        self.late: dict[Any, None] = {}
        self.top: tuple[CKey, Any] | None = None  # the greatest (sk, key) put so far
        # Told (key, old value, new value) of every change: keeps an index current.
        self.watch: Callable[[Any, Any, Any], None] | None = None
        if isinstance(d, LazyDict):
            d.pos = self.pos

    @property
    def stale(self) -> bool:
        return bool(self.late)

    def sk(self, k: Any) -> CKey:
        """The canonical key of the event that first set `k` (of a cold entry: from
        the store's key table)."""
        got = self.pos.get(k)
        if got is None:
            d = self.d
            assert isinstance(d, LazyDict)
            at = d.where(k)
            assert at is not None, "a key of the dict is hot or in the store"
            got = at[0]
        return got

    def put(self, k: Any, sk: CKey, v: Any) -> None:
        d = self.d
        old = self.pos.get(k)
        if old is not None:
            if old == sk:
                if self.watch is not None:
                    self.watch(k, d[k], v)
                d[k] = v  # re-derived, same first event: same position
                return
            self.remove(k)
        if self.watch is not None:
            self.watch(k, None, v)
        self.pos[k] = sk
        ent = (sk, k)
        if self.top is not None and ent < self.top:
            self.late[k] = None
        else:
            self.top = ent
        d[k] = v

    def remove(self, k: Any) -> None:
        del self.pos[k]
        if self.late:
            self.late.pop(k, None)
        if self.watch is not None:
            self.watch(k, self.d[k], None)
        del self.d[k]

    def fix(self) -> None:
        if not self.late:
            return
        d, sk, late = self.d, self.sk, self.late

        def order(k: Any) -> tuple[CKey, Any]:
            return sk(k), k

        # As stored (a LazyDict's hot entries): appended in order, still in order.
        keys = [k for k in dict.keys(d) if k not in late]
        for k in sorted(late, key=order):
            insort(keys, k, key=order)
        get = dict.__getitem__
        items = [(k, get(d, k)) for k in keys]
        dict.clear(d)
        dict.update(d, items)
        self.late = {}


K = TypeVar("K")
V = TypeVar("V")


class LazyDict(dict[K, V]):
    """A merged dict of an engine with a cold store. The dict itself (its storage, as
    the engine writes it with the plain dict methods) holds the hot entries only; the
    keys of cold partitions are rows of the store's key table (dict, key, canonical
    key, partition), their values in the partition's pickled values (`load(pk)`).
    Every read through the mapping methods sees both, in the canonical order (hot
    entries by `pos`, the canonical key of each, merged with the table's order), so a
    cold entry costs no memory, and `Market`'s types and every reader stay as they
    are. Keys are bytes (event ids) in every such dict."""

    __slots__ = ("idx", "load", "name", "ncold", "pos")

    def __init__(self, name: str, ncold: int = 0) -> None:
        super().__init__()
        self.name = name
        self.idx = LAZY_DICTS.index(name)  # the dict's number in the key table
        self.ncold = ncold  # keys in the store
        self.load: ColdValues | None = None
        self.pos: dict[Any, CKey] = {}  # the engine's `_Ordered.pos` (hot keys)

    # ---------------------------------------------------------- cold part

    def where(self, k: Any) -> tuple[CKey, bytes] | None:
        """(canonical key, partition) of a cold key; None if `k` is not cold."""
        if not self.ncold or type(k) is not bytes:
            return None
        assert self.load is not None, "a cold entry needs the store attached"
        return self.load.where(self.idx, k)

    def _cold(self, k: Any) -> Any:
        at = self.where(k)
        if at is None:
            return _MISSING
        assert self.load is not None
        return self.load(at[1])[self.name][k]

    def _entries(self) -> list[tuple[Any, bytes | None]]:
        """(key, None for a hot entry or its cold partition) in the canonical order."""
        if not self.ncold:
            return [(k, None) for k in dict.keys(self)]
        assert self.load is not None, "a cold entry needs the store attached"
        pos = self.pos
        # Sorted, not trusted: between a thaw and the next `market()` the thawed keys
        # sit at the end of the storage (otherwise sorted: timsort makes it one pass).
        hot: list[tuple[CKey, Any]] = sorted((pos[k], k) for k in dict.keys(self))
        cold = self.load.ordered(self.idx)
        out: list[tuple[Any, bytes | None]] = []
        i = 0
        for sk, k, pk in cold:
            while i < len(hot) and hot[i] < (sk, k):
                out.append((hot[i][1], None))
                i += 1
            out.append((k, pk))
        out += [(k, None) for _, k in hot[i:]]
        return out

    def _value(self, k: Any, pk: bytes | None) -> Any:
        if pk is None:
            return dict.__getitem__(self, k)
        assert self.load is not None
        return self.load(pk)[self.name][k]

    # ---------------------------------------------------------- the mapping

    def __getitem__(self, k: K) -> V:
        v = dict.get(self, k, _MISSING)
        if v is _MISSING:
            v = self._cold(k)
            if v is _MISSING:
                raise KeyError(k)
        return cast(V, v)

    def get(self, k: K, default: Any = None) -> Any:
        v = dict.get(self, k, _MISSING)
        if v is _MISSING:
            v = self._cold(k)
        return default if v is _MISSING else v

    def __contains__(self, k: object) -> bool:
        return dict.__contains__(self, k) or self.where(k) is not None

    def __len__(self) -> int:
        return dict.__len__(self) + self.ncold

    def __iter__(self) -> Iterator[K]:
        return iter(self.keys())

    def __reversed__(self) -> Iterator[K]:
        return reversed(self.keys())

    def keys(self) -> list[K]:  # type: ignore[override]
        if not self.ncold:
            return list(dict.keys(self))
        return [k for k, _ in self._entries()]

    def values(self) -> list[V]:  # type: ignore[override]
        return [self._value(k, pk) for k, pk in self._entries()]

    def items(self) -> list[tuple[K, V]]:  # type: ignore[override]
        return [(k, self._value(k, pk)) for k, pk in self._entries()]

    def copy(self) -> dict[K, V]:
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        return dict(self.items()) == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __repr__(self) -> str:
        return f"LazyDict({self.name!r}, {dict.__len__(self)} hot, {self.ncold} cold)"

    __hash__ = None

    def __reduce__(self) -> tuple[Any, ...]:
        # The hot entries and the count of cold ones, without the loader and `pos`:
        # the engine attaches them again.
        return _lazy_dict, (self.name, self.ncold), None, None, iter(dict.items(self))


_MISSING = object()
# The merged dicts whose cold entries live in the store (`offers` holds no partition's
# entries). Their index here numbers them in the store's key table.
LAZY_DICTS = ("auctions", "awards", "leases", "paid", "payments", "ratings", "subcontracts",
              "usage")
SK = "_sk"  # in a cold partition's values: {dict name: {key: its canonical key}}
VALUES_CACHE = 64  # cold partitions' values kept after a read (readers ask in runs)


class ColdValues:
    """Reads cold partitions' merged values from the store, the last few kept, and
    their keys from its key table."""

    def __init__(self, cold: ColdStore | None) -> None:
        self.cold = cold
        self.cache: OrderedDict[bytes, dict[str, dict[Any, Any]]] = OrderedDict()

    def __call__(self, pk: bytes) -> dict[str, dict[Any, Any]]:
        got = self.cache.get(pk)
        if got is None:
            assert self.cold is not None
            blob = self.cold.values(pk)
            assert blob is not None, "a cold entry's partition is in the store"
            got = self.cache[pk] = pickle.loads(blob)
            if len(self.cache) > VALUES_CACHE:
                self.cache.popitem(last=False)
        return got

    def where(self, d: int, key: bytes) -> tuple[CKey, bytes] | None:
        assert self.cold is not None
        return self.cold.key(d, key)

    def ordered(self, d: int) -> Iterable[tuple[CKey, bytes, bytes]]:
        assert self.cold is not None
        return self.cold.ordered(d)

    def forget(self, pk: bytes) -> None:
        self.cache.pop(pk, None)


def _lazy_dict(name: str, ncold: int = 0) -> LazyDict[Any, Any]:
    return LazyDict(name, ncold)


# (key of the event whose fold appended the entry, its index in its partition's list,
# the partition): while an event moves between partitions both may list it, briefly.
_MKey = tuple[CKey, int, bytes]


class _Merged:
    """A list of the merged market (ignored, evidence) in canonical fold order: by the
    key of the event whose fold appended each entry, then its position there."""

    __slots__ = ("keys", "out")

    def __init__(self, out: list[Any]) -> None:
        self.out = out
        self.keys: list[_MKey] = []

    def put(self, sk: _MKey, item: Any) -> None:
        if not self.keys or self.keys[-1] < sk:
            self.keys.append(sk)
            self.out.append(item)
            return
        i = bisect_left(self.keys, sk)
        self.keys.insert(i, sk)
        self.out.insert(i, item)

    def remove(self, sk: _MKey) -> None:
        i = bisect_left(self.keys, sk)
        del self.keys[i], self.out[i]


_Rating = tuple[bytes, str, bool, int, int]  # subject, role, satisfied, score, weight
_RepRead = tuple[bytes, str, int, CKey]  # key, role, as of, read at
_SetRead = tuple[bytes, CKey, int]  # key, read at, ended by
_Settle = tuple[tuple[bytes, ...], int, bytes]  # parties, end_ms, lease id
RepRead = _RepRead
SetRead = _SetRead
ColdKey = tuple[int, bytes, CKey]  # merged dict number (of LAZY_DICTS), key, canonical key


class ColdIdx(NamedTuple):
    """What a partition going cold takes out of the engine's in-memory indexes: the
    store keeps it in indexed tables, and the engine reads those where it read its own
    (`foldcold.ColdTier`)."""

    deadline: int | None  # its auction's (open_auctions)
    movers: tuple[tuple[bytes, str, bytes | None], ...] = ()  # (id, kind, ref): routing
    settles: tuple[tuple[bytes, CKey, int, bytes], ...] = ()  # (party, at, end_ms, lease)
    leases: tuple[tuple[bytes, CKey, bytes], ...] = ()  # (party, canonical key, lease)
    ratings: tuple[tuple[bytes, str, int, int], ...] = ()  # (subject, role, ts_ms, attrs)
    keys: tuple[ColdKey, ...] = ()  # its keys in the merged dicts (`LazyDict`)


NO_IDX = ColdIdx(None)


class ColdStore(Protocol):
    """Where `IncrementalMarket` keeps closed partitions' bookkeeping out of memory
    (e.g. `marketcold.SqliteCold`): by partition key, with the reads each recorded
    indexed so that a changed output finds its cold readers."""

    def put(self, pk: bytes, top: int, state: bytes, vals: bytes,
            reads_rep: tuple[RepRead, ...], reads_set: tuple[SetRead, ...],
            idx: ColdIdx = NO_IDX) -> None: ...

    def take(self, pk: bytes) -> bytes | None:
        """The partition's state, which leaves the store; None if it is not there."""

    def values(self, pk: bytes) -> bytes | None:
        """The partition's merged market values (it stays in the store)."""

    def rep_readers(self, key: bytes, role: str, as_of: int) -> list[tuple[CKey, bytes]]:
        """(read at, partition) of reads of (key, role) as of `as_of` or later."""

    def set_readers(self, key: bytes, after: CKey, ended_by: int) -> list[tuple[CKey, bytes]]:
        """(read at, partition) of settled-lease counts of `key` read at a key after
        `after`, counting leases ended by `ended_by` or later."""

    def max_top(self) -> int:
        """The latest event ts_ms of any partition in the store (0: none)."""

    # The in-memory indexes' cold parts (`ColdIdx`):

    def mover(self, event_id: bytes) -> tuple[str, bytes | None] | None:
        """(kind, ref) of a commit, award or subcontract in a cold partition."""

    def settled(self, party: bytes, before: CKey | None, ended_by: int,
                limit: int | None = None) -> int:
        """Cold settlements of `party` at keys before `before` (any if None) of leases
        ended by `ended_by`, counted up to `limit`."""

    def leases(self, party: bytes) -> list[tuple[CKey, bytes]]:
        """(canonical key, lease) of the cold leases `party` is a party to."""

    def open_from(self, now_ms: int) -> list[bytes]:
        """Cold auctions whose deadline is at or after `now_ms`."""

    def ratings(self, key: bytes, role: str) -> list[tuple[int, int]]:
        """(ts_ms, packed attributes) of the cold ratings of (key, role)."""

    def rating_keys(self) -> set[tuple[bytes, str]]:
        """(key, role) of every cold rating."""

    def max_rating_ts(self) -> int:
        """The latest ts_ms of a cold rating (0: none)."""

    def key(self, d: int, key: bytes) -> tuple[CKey, bytes] | None:
        """(canonical key, partition) of `key` in merged dict number `d` (of
        `LAZY_DICTS`), if a partition in the store holds it (`ColdIdx.keys`)."""

    def ordered(self, d: int) -> Iterable[tuple[CKey, bytes, bytes]]:
        """(canonical key, key, partition) of every key of dict `d` in the store, in
        the order of (canonical key, key)."""


class _Part:
    __slots__ = (
        "applied",
        "dirty",
        "evd",
        "evs",
        "full",
        "ids",
        "ign",
        "key",
        "linked",
        "out_r",
        "out_s",
        "pm",
        "reads_rep",
        "reads_set",
        "seen",
        "top",
    )

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.evs: list[tuple[CKey, Event]] = []  # sorted
        self.ids: list[bytes] | None = None  # evicted: evs is empty, these are its ids
        self.top = 0  # the latest ts_ms of its events (kept while evicted)
        self.applied = 0  # evs[:applied] are folded into pm, in order
        self.pm: Market | None = None  # a fold._PartMarket (by its base: no cycle)
        self.linked: dict[str, list[Any]] = {}
        self.seen: dict[str, int] = {}
        self.ign: list[_MKey] = []
        self.evd: list[_MKey] = []
        # Sets while loaded; tuples once evicted (a set costs 216 bytes even empty).
        self.reads_rep: set[_RepRead] | tuple[_RepRead, ...] = set()
        self.reads_set: set[_SetRead] | tuple[_SetRead, ...] = set()
        self.out_r: dict[CKey, _Rating] = {}
        self.out_s: dict[CKey, _Settle] = {}
        self.dirty: CKey | None = None
        self.full = False


# Loads events by id (all of them, in the order asked): where evicted partitions'
# events come back from, e.g. the ledger.
Source = Callable[[list[bytes]], list[Event]]
# (author, latest): the author's earliest (latest=False) or latest present offer in
# canonical order, or None; "present" already excludes the events being removed.
OfferSource = Callable[[bytes, bool], Event | None]


class Kept(NamedTuple):
    """What the engine keeps of an offer event it holds on to: not its signed record;
    not its body either for the first offer when a later one is the value."""

    id: bytes
    author: bytes
    ts_ms: int
    body: Body | None


def kept(ev: Event | Kept, body: bool = True) -> Kept:
    return Kept(ev.id, ev.author, ev.ts_ms, ev.body if body else None)


class _Offers:
    """One provider's present offers: the first (its place in `Market.offers`) and the
    latest (its value); `all` holds every one (sorted) when there is no offer source."""

    __slots__ = ("all", "first", "last")

    def __init__(self, ent: tuple[CKey, Event], keep_all: bool) -> None:
        self.first: tuple[CKey, Event | Kept]
        self.last: tuple[CKey, Event | Kept]
        self.first = self.last = ent if keep_all else (ent[0], kept(ent[1]))
        self.all: list[tuple[CKey, Event]] | None = [ent] if keep_all else None


def _ent(ev: Event | None) -> tuple[CKey, Event] | None:
    return None if ev is None else (ckey(ev), ev)
