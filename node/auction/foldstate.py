"""The state `fold.IncrementalMarket` keeps (split from `fold`, which imports these):
canonical keys, the merged market's ordered dicts and lists, one partition's
bookkeeping, a provider's kept offers."""

from __future__ import annotations

import pickle
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Callable
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
    late are in order in the dict already, the late ones are inserted among them."""

    __slots__ = ("d", "late", "pos", "top", "watch")

    def __init__(self, d: dict[Any, Any]) -> None:
        self.d = d
        self.pos: dict[Any, CKey] = {}
        self.late: list[Any] = []  # keys put before `top` since the last rebuild
        self.top: tuple[CKey, Any] | None = None  # the greatest (sk, key) put so far
        # Told (key, old value, new value) of every change: keeps an index current.
        self.watch: Callable[[Any, Any, Any], None] | None = None

    @property
    def stale(self) -> bool:
        return bool(self.late)

    def sk(self, k: Any) -> CKey:
        """The canonical key of the event that first set `k` (of a cold entry: from
        the store, which keeps them with its values)."""
        got = self.pos.get(k)
        if got is None:
            ref, d = dict.__getitem__(self.d, k), self.d
            assert type(ref) is ColdRef and isinstance(d, LazyDict) and d.load is not None
            got = d.load(ref.pk)[SK][d.name][k]
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
            self.late.append(k)
        else:
            self.top = ent
        d[k] = v

    def remove(self, k: Any) -> None:
        del self.pos[k]
        if self.late and k in self.late:
            self.late.remove(k)
        if self.watch is not None:
            self.watch(k, self.d[k], None)
        del self.d[k]

    def fix(self) -> None:
        if not self.late:
            return
        d, sk = self.d, self.sk
        late = set(self.late)

        def order(k: Any) -> tuple[CKey, Any]:
            return sk(k), k

        keys = [k for k in d if k not in late]  # appended in order: still in order
        for k in sorted(late, key=order):
            insort(keys, k, key=order)
        get = dict.__getitem__  # as stored: cold values stay placeholders
        items = [(k, get(d, k)) for k in keys]
        d.clear()
        d.update(items)
        self.late = []


class ColdRef:
    """The value of a merged dict's entry whose partition is cold (one per partition,
    shared by its entries): `LazyDict` reads the real one from the store."""

    __slots__ = ("pk",)

    def __init__(self, pk: bytes) -> None:
        self.pk = pk

    def __reduce__(self) -> tuple[Any, ...]:
        return ColdRef, (self.pk,)


K = TypeVar("K")
V = TypeVar("V")


class LazyDict(dict[K, V]):
    """A merged dict of an engine with a cold store: a cold partition's entries keep
    their key and place, their value is a `ColdRef` until read (`load(pk)`: that
    partition's values by dict name). Reads through the dict methods see real values;
    the engine writes and reorders entries with the plain dict methods."""

    __slots__ = ("load", "name")

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.load: ColdValues | None = None

    def _real(self, k: Any, v: Any) -> Any:
        if type(v) is ColdRef:
            assert self.load is not None, "a cold entry needs the store attached"
            return self.load(v.pk)[self.name][k]
        return v

    def __getitem__(self, k: K) -> V:
        return cast(V, self._real(k, dict.__getitem__(self, k)))

    def get(self, k: K, default: Any = None) -> Any:
        v = dict.get(self, k, _MISSING)
        return default if v is _MISSING else self._real(k, v)

    def values(self) -> list[V]:  # type: ignore[override]
        return [self._real(k, v) for k, v in dict.items(self)]

    def items(self) -> list[tuple[K, V]]:  # type: ignore[override]
        return [(k, self._real(k, v)) for k, v in dict.items(self)]

    def copy(self) -> dict[K, V]:
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        return dict(self.items()) == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None

    def __reduce__(self) -> tuple[Any, ...]:
        # As stored (placeholders), without the loader: the engine attaches it again.
        return _lazy_dict, (self.name,), None, None, iter(dict.items(self))


_MISSING = object()
# The merged dicts whose cold entries are placeholders (`offers` holds no partition's
# entries).
LAZY_DICTS = ("auctions", "awards", "leases", "paid", "payments", "ratings", "subcontracts",
              "usage")
SK = "_sk"  # in a cold partition's values: {dict name: {key: its canonical key}}
VALUES_CACHE = 64  # cold partitions' values kept after a read (readers ask in runs)


class ColdValues:
    """Reads cold partitions' merged values from the store, the last few kept."""

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

    def forget(self, pk: bytes) -> None:
        self.cache.pop(pk, None)


def _lazy_dict(name: str) -> LazyDict[Any, Any]:
    return LazyDict(name)


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


class ColdIdx(NamedTuple):
    """What a partition going cold takes out of the engine's in-memory indexes: the
    store keeps it in indexed tables, and the engine reads those where it read its own
    (`foldcold.ColdTier`)."""

    deadline: int | None  # its auction's (open_auctions)
    movers: tuple[tuple[bytes, str, bytes | None], ...] = ()  # (id, kind, ref): routing
    settles: tuple[tuple[bytes, CKey, int, bytes], ...] = ()  # (party, at, end_ms, lease)
    leases: tuple[tuple[bytes, CKey, bytes], ...] = ()  # (party, canonical key, lease)
    ratings: tuple[tuple[bytes, str, int, int], ...] = ()  # (subject, role, ts_ms, attrs)


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
