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
"as of" bisects the subject's snapshot history, O(log n).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

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


# Snapshot after each rating: (step, W, V, ratings, satisfied, stars_sum).
_Snap = tuple[int, int, int, int, int, int]


@dataclass(slots=True)
class _History:
    ts: list[int] = field(default_factory=list)
    snaps: list[_Snap] = field(default_factory=list)


class Reputation:
    """Incremental scores per (key, role). Feed `add` in canonical (ts) order."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self._step = self.policy.step_ms
        self._hist: dict[tuple[bytes, str], _History] = {}
        self._last_ts = 0
        self.count = 0

    def add(
        self, subject: bytes, role: str, ts_ms: int, satisfied: bool, score: int,
        rater_weight: int = 1,
    ) -> None:
        """Fold one accepted rating in. O(1)."""
        if ts_ms < self._last_ts:
            raise UsageError("ratings must be added in canonical (timestamp) order")
        if role not in ROLES or not 1 <= score <= 5 or rater_weight < 1:
            raise UsageError("role must be provider/recipient, score 1..5, weight >= 1")
        self._last_ts = ts_ms
        h = self._hist.get((subject, role))
        if h is None:
            h = self._hist[(subject, role)] = _History()
        step = ts_ms // self._step
        w = rater_weight * UNIT
        v = 4 * satisfied + score - 1
        if h.snaps:
            e, big_w, big_v, n, sat, stars = h.snaps[-1]
            if step != e:
                big_w, big_v = decay(big_w, step - e), decay(big_v, step - e)
            snap = (step, big_w + w, big_v + w * v, n + 1, sat + satisfied, stars + score)
        else:
            snap = (step, w, w * v, 1, int(satisfied), score)
        h.ts.append(ts_ms)
        h.snaps.append(snap)
        self.count += 1

    def score(self, key: bytes, role: str, as_of_ms: int | None = None) -> Score:
        """Reputation as of a ledger time (ratings with ts <= as_of_ms). O(log n)."""
        if as_of_ms is None:
            as_of_ms = self._last_ts
        h = self._hist.get((key, role))
        i = bisect_right(h.ts, as_of_ms) if h is not None else 0
        pol = self.policy
        prior_w = pol.prior_weight * UNIT
        if h is None or i == 0:
            ppm = PPM * pol.prior_value // 8
            return Score(key, role, as_of_ms, ppm, 0, 0, 0, 0, 0)
        e, big_w, big_v, n, sat, stars = h.snaps[i - 1]
        k = as_of_ms // self._step - e
        big_w, big_v = decay(big_w, k), decay(big_v, k)
        ppm = PPM * (prior_w * pol.prior_value + big_v) // (8 * (prior_w + big_w))
        return Score(key, role, as_of_ms, ppm, n, sat, n - sat, stars, big_w)

    def ppm(self, key: bytes, role: str, as_of_ms: int) -> int:
        """Just `score(...).ppm`, without building the Score (clearing calls it per bid)."""
        h = self._hist.get((key, role))
        pol = self.policy
        i = bisect_right(h.ts, as_of_ms) if h is not None else 0
        if h is None or i == 0:
            return PPM * pol.prior_value // 8
        e, big_w, big_v = h.snaps[i - 1][:3]
        k = as_of_ms // self._step - e
        prior_w = pol.prior_weight * UNIT
        return PPM * (prior_w * pol.prior_value + decay(big_v, k)) // (
            8 * (prior_w + decay(big_w, k)))

    def keys(self, role: str | None = None) -> list[bytes]:
        """Keys with at least one rating (in `role` if given), sorted."""
        return sorted({k for (k, r) in self._hist if role is None or r == role})


# A rating as `FoldReputation` keeps it: canonical key (ts_ms, author, seq) first.
_Item = tuple[tuple[int, bytes, int], int, int, int, bool, int]  # key, ts, w, v, sat, score


class FoldReputation(Reputation):
    """`Reputation` whose ratings can be inserted and removed in any order.

    Gives exactly the scores `Reputation` gives for the same ratings added in
    canonical order: each (key, role) keeps its ratings sorted by canonical key, and
    its snapshots are recomputed from the first changed position, lazily, on the next
    lookup. A change costs the subject's ratings after it, never the whole market."""

    def __init__(self, policy: Policy | None = None) -> None:
        super().__init__(policy)
        self._items: dict[tuple[bytes, str], list[_Item]] = {}
        self._stale: dict[tuple[bytes, str], int] = {}  # first snapshot to recompute
        self._last_dirty = False

    def add(self, *args: object, **kw: object) -> None:
        raise UsageError("FoldReputation takes insert/remove, not add")

    def insert(self, subject: bytes, role: str, key: tuple[int, bytes, int], satisfied: bool,
               score: int, rater_weight: int) -> None:
        if role not in ROLES or not 1 <= score <= 5 or rater_weight < 1:
            raise UsageError("role must be provider/recipient, score 1..5, weight >= 1")
        items = self._items.setdefault((subject, role), [])
        item = (key, key[0], rater_weight * UNIT, 4 * satisfied + score - 1, satisfied, score)
        i = bisect_right(items, key, key=lambda it: it[0])
        items.insert(i, item)
        self._mark(subject, role, i)
        self.count += 1
        if key[0] > self._last_ts:
            self._last_ts = key[0]

    def remove(self, subject: bytes, role: str, key: tuple[int, bytes, int]) -> None:
        items = self._items.get((subject, role), [])
        i = bisect_right(items, key, key=lambda it: it[0]) - 1
        if i < 0 or items[i][0] != key:
            raise UsageError("no such rating to remove")
        del items[i]
        self._mark(subject, role, i)
        self.count -= 1
        self._last_dirty = True

    def _mark(self, subject: bytes, role: str, i: int) -> None:
        sr = (subject, role)
        old = self._stale.get(sr)
        self._stale[sr] = i if old is None else min(old, i)

    def _flush(self) -> None:
        """Recompute the snapshots of every changed (key, role), from its first change;
        the arithmetic is `Reputation.add`'s, so results are identical."""
        for sr, start in self._stale.items():
            items = self._items[sr]
            if not items:
                del self._items[sr]
                self._hist.pop(sr, None)
                continue
            h = self._hist.get(sr)
            if h is None:
                h = self._hist[sr] = _History()
            del h.ts[start:], h.snaps[start:]
            for _, ts, w, v, sat, score in items[start:]:
                step = ts // self._step
                if h.snaps:
                    e, big_w, big_v, n, s, stars = h.snaps[-1]
                    if step != e:
                        big_w, big_v = decay(big_w, step - e), decay(big_v, step - e)
                    snap = (step, big_w + w, big_v + w * v, n + 1, s + sat, stars + score)
                else:
                    snap = (step, w, w * v, 1, int(sat), score)
                h.ts.append(ts)
                h.snaps.append(snap)
        self._stale.clear()
        if self._last_dirty:
            self._last_dirty = False
            self._last_ts = max((it[-1][1] for it in self._items.values() if it), default=0)

    def score(self, key: bytes, role: str, as_of_ms: int | None = None) -> Score:
        if self._stale or self._last_dirty:
            self._flush()
        return super().score(key, role, as_of_ms)

    def ppm(self, key: bytes, role: str, as_of_ms: int) -> int:
        if self._stale:
            self._flush()
        return super().ppm(key, role, as_of_ms)

    def keys(self, role: str | None = None) -> list[bytes]:
        if self._stale:
            self._flush()
        return super().keys(role)
