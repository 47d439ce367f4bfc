"""Reputation: accepted ratings folded into a score per (key, role), as of any time.

Pure and deterministic: integer math only for anything that can decide a winner
(`Score.ppm`); floats appear only in display helpers. Which ratings are accepted is
decided by `node.auction.Market`; this module only scores them. See docs/auctions.md.

Score of a key in a role ("provider" or "recipient") as of ledger time T:

* each rating has a value v in eighths: ``v = 4*satisfied + (score - 1)`` (0..8), so
  "satisfied" is half the value and the 1–5 stars the other half;
* its weight is ``rater_weight * 2^(-(e_T - e_i)/16)`` where ``e = ts_ms // step``,
  ``step = half_life_ms // 16`` (recency: a rating loses half its weight per
  half-life of ledger time, in 16 steps, using the fixed-point table `DECAY`);
  ``rater_weight = 1 + min(settled, rater_cap)``, settled = completed paid leases the
  rater was a party to before the rating (computed by the Market);
* ``ppm = 10^6 * (C*P + sum w*v) // (8 * (C + sum w))`` with the prior weight ``C``
  (in ratings of weight 1) and prior value ``P`` (eighths; 4 = neutral).

Sums are kept in fixed point (`UNIT` = 2^32 per weight 1) and decayed with
`decay(x, k) = (x * DECAY[k % 16]) >> (32 + k // 16)` (0 once k >= 64*16), each time
a rating lands in a later step and once more at lookup. Updates are O(1); a lookup
"as of" bisects the subject's rating times, O(log n), and replays at most
`CHECKPOINT` - 1 ratings from the last stored snapshot before it.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from .codec import fast_pickle
from .errors import UsageError

UNIT = 1 << 32
# DECAY[j] = round(2^(32 - j/16)): the fixed-point factors of 2^(-j/16).
DECAY = (
    4294967296, 4112874773, 3938502376, 3771522796, 3611622603, 3458501653, 3311872529,
    3171459999, 3037000500, 2908241642, 2784941738, 2666869345, 2553802834, 2445529972,
    2341847524, 2242560872,
)
MAX_STEPS = 64 * 16  # after 64 half-lives a weight is treated as zero
ROLES = ("provider", "recipient")
PPM = 1_000_000


def decay(x: int, k: int) -> int:
    """`x * 2^(-k/16)` in fixed point, floor-rounded; deterministic across platforms."""
    if k <= 0:
        return x
    if k >= MAX_STEPS:
        return 0
    return (x * DECAY[k & 15]) >> (32 + (k >> 4))


def rating_value(satisfied: bool, score: int) -> int:
    """A rating's value in eighths (0..8)."""
    return 4 * int(satisfied) + score - 1


@dataclass(frozen=True)
class Policy:
    """Network-wide scoring constants; every node must use the same ones."""

    prior_weight: int = 2  # C: the prior counts as this many fresh weight-1 ratings
    prior_value: int = 4  # P, eighths: 4 = neutral (0.5)
    half_life_ms: int = 30 * 86_400_000
    rater_cap: int = 4  # rater weight = 1 + min(settled leases, cap)

    def __post_init__(self) -> None:
        if self.prior_weight < 1 or not 0 <= self.prior_value <= 8:
            raise UsageError("prior_weight must be >= 1 and prior_value within 0..8")
        if self.half_life_ms < 16 or self.rater_cap < 0:
            raise UsageError("half_life_ms must be >= 16 and rater_cap >= 0")

    @property
    def step_ms(self) -> int:
        return self.half_life_ms // 16

    def rater_weight(self, settled: int) -> int:
        return 1 + min(settled, self.rater_cap)


@fast_pickle
@dataclass(frozen=True, slots=True)
class Score:
    """Reputation of `key` in `role` as of `as_of_ms`: the score and the raw counts."""

    key: bytes
    role: str
    as_of_ms: int
    ppm: int  # 0..1_000_000, the integer score that decides (best_value, offers)
    ratings: int
    satisfied: int
    unsatisfied: int
    stars_sum: int  # sum of the 1-5 scores
    weight: int  # decayed total rating weight, fixed point (UNIT = 1.0)

    @property
    def score(self) -> float:
        """For display only."""
        return self.ppm / PPM

    @property
    def mean_stars(self) -> float | None:
        """For display only."""
        return self.stars_sum / self.ratings if self.ratings else None

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key.hex(),
            "role": self.role,
            "as_of_ms": self.as_of_ms,
            "score": round(self.score, 4),
            "score_ppm": self.ppm,
            "ratings": self.ratings,
            "satisfied": self.satisfied,
            "unsatisfied": self.unsatisfied,
            "mean_stars": None if self.mean_stars is None else round(self.mean_stars, 2),
            "weight": round(self.weight / UNIT, 3),
        }


# A running total: (step of the last rating, W, V, ratings, satisfied, stars_sum).
_Snap = tuple[int, int, int, int, int, int]
CHECKPOINT = 8  # ratings between stored snapshots: memory / lookup trade-off


def _pack(rater_weight: int, satisfied: bool, score: int) -> int:
    return rater_weight << 4 | int(satisfied) << 3 | (score - 1)


@fast_pickle
@dataclass(slots=True)
class _History:
    """One (key, role)'s ratings sorted by time, in two machine-integer arrays (16
    bytes a rating), and a snapshot of the running totals every `CHECKPOINT` ratings:
    `cps[j]` is the total after rating `j * CHECKPOINT`. An "as of" lookup bisects the
    times and replays at most CHECKPOINT - 1 ratings from a checkpoint, instead of
    keeping one snapshot per rating (~300 bytes each). Ratings at one timestamp form a
    multiset: a lookup counts all of them or none, and within one decay step the
    totals are plain sums, so their order never changes a result."""

    ts: array[int] = field(default_factory=lambda: array("q"))
    attrs: array[int] = field(default_factory=lambda: array("q"))  # _pack(...)
    cps: list[_Snap] = field(default_factory=list)

    def total(self, i: int, step_ms: int) -> _Snap:
        """The running total after rating `i` (0-based)."""
        cps, k = self.cps, CHECKPOINT
        c = i // k
        while len(cps) <= c:  # extend lazily (appends and edits only truncate)
            j = len(cps)
            cps.append(self._replay(cps[-1], (j - 1) * k + 1, j * k + 1, step_ms) if j
                       else self._replay(None, 0, 1, step_ms))
        return self._replay(cps[c], c * k + 1, i + 1, step_ms)

    def _replay(self, snap: _Snap | None, lo: int, hi: int, step_ms: int) -> _Snap:
        ts, attrs = self.ts, self.attrs
        if snap is None:
            e, big_w, big_v, n, sat, stars = ts[lo] // step_ms, 0, 0, 0, 0, 0
        else:
            e, big_w, big_v, n, sat, stars = snap
        for j in range(lo, hi):
            step = ts[j] // step_ms
            a = attrs[j]
            w = (a >> 4) * UNIT
            s = (a >> 3) & 1
            score = (a & 7) + 1
            if step != e:
                big_w, big_v = decay(big_w, step - e), decay(big_v, step - e)
                e = step
            big_w += w
            big_v += w * (4 * s + score - 1)
            n += 1
            sat += s
            stars += score
        return (e, big_w, big_v, n, sat, stars)

    def edited(self, i: int) -> None:
        """Rating `i` was inserted or removed: drop the checkpoints that covered it."""
        del self.cps[(i + CHECKPOINT - 1) // CHECKPOINT:]


class Reputation:
    """Incremental scores per (key, role). Feed `add` in canonical (ts) order."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self._step = self.policy.step_ms
        self._hist: dict[tuple[bytes, str], _History] = {}
        self._last_ts = 0
        self.count = 0

    @staticmethod
    def _check(role: str, score: int, rater_weight: int) -> None:
        if role not in ROLES or not 1 <= score <= 5 or rater_weight < 1:
            raise UsageError("role must be provider/recipient, score 1..5, weight >= 1")

    def add(
        self, subject: bytes, role: str, ts_ms: int, satisfied: bool, score: int,
        rater_weight: int = 1,
    ) -> None:
        """Fold one accepted rating in. O(1)."""
        if ts_ms < self._last_ts:
            raise UsageError("ratings must be added in canonical (timestamp) order")
        self._check(role, score, rater_weight)
        self._last_ts = ts_ms
        h = self._hist.get((subject, role))
        if h is None:
            h = self._hist[(subject, role)] = _History()
        h.ts.append(ts_ms)
        h.attrs.append(_pack(rater_weight, satisfied, score))
        self.count += 1

    def score(self, key: bytes, role: str, as_of_ms: int | None = None) -> Score:
        """Reputation as of a ledger time (ratings with ts <= as_of_ms): a bisection
        and at most CHECKPOINT - 1 ratings replayed."""
        if as_of_ms is None:
            as_of_ms = self._last_ts
        h = self._history(key, role)
        i = bisect_right(h.ts, as_of_ms) if h is not None else 0
        pol = self.policy
        prior_w = pol.prior_weight * UNIT
        if h is None or i == 0:
            ppm = PPM * pol.prior_value // 8
            return Score(key, role, as_of_ms, ppm, 0, 0, 0, 0, 0)
        e, big_w, big_v, n, sat, stars = h.total(i - 1, self._step)
        k = as_of_ms // self._step - e
        big_w, big_v = decay(big_w, k), decay(big_v, k)
        ppm = PPM * (prior_w * pol.prior_value + big_v) // (8 * (prior_w + big_w))
        return Score(key, role, as_of_ms, ppm, n, sat, n - sat, stars, big_w)

    def ppm(self, key: bytes, role: str, as_of_ms: int) -> int:
        """Just `score(...).ppm`, without building the Score (clearing calls it per bid)."""
        h = self._history(key, role)
        pol = self.policy
        i = bisect_right(h.ts, as_of_ms) if h is not None else 0
        if h is None or i == 0:
            return PPM * pol.prior_value // 8
        e, big_w, big_v = h.total(i - 1, self._step)[:3]
        k = as_of_ms // self._step - e
        prior_w = pol.prior_weight * UNIT
        return PPM * (prior_w * pol.prior_value + decay(big_v, k)) // (
            8 * (prior_w + decay(big_w, k)))

    def keys(self, role: str | None = None) -> list[bytes]:
        """Keys with at least one rating (in `role` if given), sorted."""
        return sorted({k for (k, r) in self._hist if role is None or r == role})

    def _history(self, key: bytes, role: str) -> _History | None:
        return self._hist.get((key, role))


class ColdRatings(Protocol):
    """Where `FoldReputation` finds the ratings it moved out of memory (`cool`): the
    market's cold store (`marketcold.SqliteCold`)."""

    def ratings(self, key: bytes, role: str) -> list[tuple[int, int]]:
        """(ts_ms, packed attributes) of the cold ratings of (key, role)."""

    def rating_keys(self) -> set[tuple[bytes, str]]: ...

    def max_rating_ts(self) -> int: ...


# Merged (hot + cold) histories kept: at most this many keys and ratings (~2 + 4 MiB).
FULL_CACHE_KEYS = 4096
FULL_CACHE_RATINGS = 1 << 18


class FoldReputation(Reputation):
    """`Reputation` whose ratings can be inserted and removed in any order.

    Gives exactly the scores `Reputation` gives for the same ratings added in
    canonical order: a rating goes in at its time (among ratings at the same time,
    anywhere: see `_History`), and only the checkpoints after it are dropped, to be
    replayed on the next lookup that needs them. A change costs the subject's ratings
    after it, never the whole market.

    **Cold ratings** (with a `ColdRatings` store attached): the ratings of closed
    auctions leave memory (`cool`: the engine writes them to the store; `thaw` takes
    them back). A lookup then replays the merged history of the key: its ratings in
    memory and those in the store, merged once and kept in a small cache
    (FULL_CACHE_KEYS keys, FULL_CACHE_RATINGS ratings, least recently used out),
    which `insert`/`remove` keep current and `cool`/`thaw` leave as they are (the
    ratings stay the same, only where they live changes). The decayed sums are
    rounded at each step, so the history is replayed merged, in time order, not
    summed from two parts. A key with no cold rating costs one indexed query."""

    def __init__(self, policy: Policy | None = None) -> None:
        super().__init__(policy)
        self._last_dirty = False
        self._cold: ColdRatings | None = None
        self._full: OrderedDict[tuple[bytes, str], _History] = OrderedDict()
        self._full_n = 0  # ratings in _full

    def attach_cold(self, cold: ColdRatings | None) -> None:
        """Use `cold` for the ratings `cool` moved out (None: detach, to pickle)."""
        self._cold = cold
        self._full = OrderedDict()
        self._full_n = 0

    def __getstate__(self) -> dict[str, object]:
        # The store is attached again by its owner; the cache is rebuilt on demand.
        st = self.__dict__.copy()
        st["_cold"], st["_full"], st["_full_n"] = None, OrderedDict(), 0
        return st

    def cool(self, subject: bytes, role: str, ts_ms: int, satisfied: bool, score: int,
             rater_weight: int) -> int:
        """Move one rating out of memory (the caller puts it in the store); returns its
        packed attributes, as the store keeps them."""
        a = _pack(rater_weight, satisfied, score)
        kr = (subject, role)
        if not _take(self._hist.get(kr), ts_ms, a):
            raise UsageError("no such rating to move out")
        if not self._hist[kr].ts:
            del self._hist[kr]
        return a

    def thaw(self, subject: bytes, role: str, ts_ms: int, satisfied: bool, score: int,
             rater_weight: int) -> None:
        """Take a rating `cool` moved out back into memory (the store forgets it)."""
        h = self._hist.get((subject, role))
        if h is None:
            h = self._hist[(subject, role)] = _History()
        _put(h, ts_ms, _pack(rater_weight, satisfied, score))

    def _history(self, key: bytes, role: str) -> _History | None:
        kr = (key, role)
        hot = self._hist.get(kr)
        if self._cold is None:
            return hot
        f = self._full.get(kr)
        if f is not None:
            self._full.move_to_end(kr)
            return f
        rows = self._cold.ratings(key, role)
        if not rows:
            return hot
        if hot is not None:
            rows += zip(hot.ts, hot.attrs, strict=True)
        rows.sort(key=lambda r: r[0])  # equal times: any order (a multiset, see _History)
        f = self._full[kr] = _History(array("q", [r[0] for r in rows]),
                                      array("q", [r[1] for r in rows]))
        self._full_n += len(rows)
        while (self._full_n > FULL_CACHE_RATINGS or len(self._full) > FULL_CACHE_KEYS) \
                and len(self._full) > 1:
            _, old = self._full.popitem(last=False)
            self._full_n -= len(old.ts)
        return f

    def keys(self, role: str | None = None) -> list[bytes]:
        got = {k for (k, r) in self._hist if role is None or r == role}
        if self._cold is not None:
            got |= {k for (k, r) in self._cold.rating_keys() if role is None or r == role}
        return sorted(got)

    def add(self, *args: object, **kw: object) -> None:
        raise UsageError("FoldReputation takes insert/remove, not add")

    def insert(self, subject: bytes, role: str, ts_ms: int, satisfied: bool, score: int,
               rater_weight: int) -> None:
        self._check(role, score, rater_weight)
        h = self._hist.get((subject, role))
        if h is None:
            h = self._hist[(subject, role)] = _History()
        a = _pack(rater_weight, satisfied, score)
        _put(h, ts_ms, a)
        f = self._full.get((subject, role))
        if f is not None:
            _put(f, ts_ms, a)
            self._full_n += 1
        self.count += 1
        if ts_ms > self._last_ts:
            self._last_ts = ts_ms

    def remove(self, subject: bytes, role: str, ts_ms: int, satisfied: bool, score: int,
               rater_weight: int) -> None:
        """Remove one rating equal to the one given (equal ratings are interchangeable)."""
        kr = (subject, role)
        a = _pack(rater_weight, satisfied, score)
        if not _take(self._hist.get(kr), ts_ms, a):
            raise UsageError("no such rating to remove")
        if not self._hist[kr].ts:
            del self._hist[kr]
        f = self._full.get(kr)
        if f is not None:
            _take(f, ts_ms, a)
            self._full_n -= 1
        self.count -= 1
        self._last_dirty = True

    def _flush(self) -> None:
        if self._last_dirty:
            self._last_dirty = False
            self._last_ts = max(max((h.ts[-1] for h in self._hist.values()), default=0),
                                self._cold.max_rating_ts() if self._cold is not None else 0)

    def score(self, key: bytes, role: str, as_of_ms: int | None = None) -> Score:
        self._flush()
        return super().score(key, role, as_of_ms)


def _put(h: _History, ts_ms: int, a: int) -> None:
    i = bisect_right(h.ts, ts_ms)
    h.ts.insert(i, ts_ms)
    h.attrs.insert(i, a)
    h.edited(i)


def _take(h: _History | None, ts_ms: int, a: int) -> bool:
    """Remove one rating (ts_ms, packed attributes) from `h`; False if none."""
    if h is not None:
        for i in range(bisect_left(h.ts, ts_ms), bisect_right(h.ts, ts_ms)):
            if h.attrs[i] == a:
                del h.ts[i], h.attrs[i]
                h.edited(i)
                return True
    return False
