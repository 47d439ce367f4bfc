"""Reputation: the documented score, recency, rater weighting, as-of lookups."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from market_helpers import World, award, key, payment, rating, request

from node.errors import UsageError
from node.reputation import (
    DECAY,
    PPM,
    UNIT,
    FoldReputation,
    Policy,
    Reputation,
    decay,
    rating_value,
)

K = b"\x01" * 32
DAY = 86_400_000


def test_decay_table_is_two_to_the_minus_sixteenths() -> None:
    for j, v in enumerate(DECAY):
        assert abs(v / UNIT - 2 ** (-j / 16)) < 1e-9
    assert decay(UNIT, 16) == UNIT // 2
    assert decay(UNIT, 0) == UNIT and decay(UNIT, -3) == UNIT
    assert decay(UNIT, 64 * 16) == 0


@given(st.integers(0, 1 << 60), st.integers(0, 2000))
def test_decay_is_monotone_and_bounded(x: int, k: int) -> None:
    assert 0 <= decay(x, k + 1) <= decay(x, k) <= x


def test_values() -> None:
    assert rating_value(True, 5) == 8 and rating_value(False, 1) == 0
    assert rating_value(True, 1) == rating_value(False, 5) == 4


def test_prior_and_counts() -> None:
    rep = Reputation()
    s = rep.score(K, "provider", 0)
    assert s.ppm == PPM // 2 and s.ratings == 0 and s.mean_stars is None
    rep.add(K, "provider", 10, True, 5)
    rep.add(K, "provider", 10, False, 2)
    s = rep.score(K, "provider", 10)
    # (C*P + 8 + 1) / (8 * (C + 2)) with C = 2, P = 4
    assert s.ppm == PPM * (2 * 4 + 8 + 1) // (8 * 4)
    assert (s.ratings, s.satisfied, s.unsatisfied, s.stars_sum) == (2, 1, 1, 7)
    assert s.mean_stars == 3.5 and s.to_json()["score_ppm"] == s.ppm
    assert rep.score(K, "recipient", 10).ratings == 0


def test_as_of_sees_only_earlier_ratings() -> None:
    rep = Reputation()
    rep.add(K, "provider", 100, True, 5)
    rep.add(K, "provider", 200, False, 1)
    assert rep.score(K, "provider", 99).ratings == 0
    assert rep.score(K, "provider", 100).ratings == 1
    assert rep.score(K, "provider", 199).ppm > rep.score(K, "provider", 200).ppm
    assert rep.keys() == [K] and rep.keys("recipient") == []


def test_recency_old_ratings_fade_towards_the_prior() -> None:
    pol = Policy(half_life_ms=10 * DAY)
    rep = Reputation(pol)
    rep.add(K, "provider", 0, False, 1)
    fresh = rep.score(K, "provider", 0).ppm
    assert fresh < rep.score(K, "provider", 10 * DAY).ppm < PPM // 2
    assert rep.score(K, "provider", 10 * DAY).weight == UNIT // 2
    assert rep.score(K, "provider", 1000 * DAY).ppm == PPM // 2
    # A new good rating outweighs the faded bad one.
    rep.add(K, "provider", 20 * DAY, True, 5)
    assert rep.score(K, "provider", 20 * DAY).ppm > PPM // 2


def test_rater_weight_counts() -> None:
    rep = Reputation()
    rep.add(K, "provider", 0, False, 1, rater_weight=5)
    rep.add(K, "provider", 0, True, 5, rater_weight=1)
    assert rep.score(K, "provider", 0).ppm < PPM // 2
    assert Policy().rater_weight(0) == 1 and Policy().rater_weight(99) == 5


def test_misuse_is_refused() -> None:
    rep = Reputation()
    rep.add(K, "provider", 10, True, 5)
    with pytest.raises(UsageError, match="canonical"):
        rep.add(K, "provider", 9, True, 5)
    with pytest.raises(UsageError):
        rep.add(K, "seller", 10, True, 5)
    with pytest.raises(UsageError):
        Policy(prior_value=9)
    with pytest.raises(UsageError):
        Policy(half_life_ms=1)


def test_raters_with_settled_leases_weigh_more(tmp_path: Path) -> None:
    w = World(tmp_path)
    # "veteran" completes and pays a lease first.
    r0 = w.pub("veteran", request(close_ms=20, reveal_ms=20, start_ms=30, duration_ms=10), 10)
    b0 = w.bid("x", r0, 10, 11)
    a0 = w.pub("veteran", award(r0.id, b0.id, 10, [b0.id]), 21)
    w.pub("veteran", payment(a0.id, 10), 22)
    leases = {}
    for n, t in (("veteran", 100), ("newbie", 101)):
        r = w.pub(n, request(close_ms=200, reveal_ms=200, start_ms=300), t)
        b = w.bid("prov-" + n, r, 10, t + 10)
        leases[n] = w.pub(n, award(r.id, b.id, 10, [b.id]), 201 + (t - 100))
    w.pub("veteran", rating(leases["veteran"].id, "prov-veteran", "provider"), 301)
    w.pub("newbie", rating(leases["newbie"].id, "prov-newbie", "provider"), 301)
    m = w.market()
    assert m.settled(key("veteran"), 301) == 1 and m.settled(key("newbie"), 301) == 0
    weights = {r.rater: r.weight for rs in m.ratings.values() for r in rs}
    assert weights == {key("veteran"): 2, key("newbie"): 1}
    assert (m.reputation.score(key("prov-veteran"), "provider").ppm
            > m.reputation.score(key("prov-newbie"), "provider").ppm)


@given(st.lists(st.tuples(st.integers(0, 10 * DAY), st.booleans(), st.integers(1, 5),
                          st.integers(1, 5)), max_size=30),
       st.integers(0, 20 * DAY))
def test_fast_ppm_equals_score(rows: list[tuple[int, bool, int, int]], at: int) -> None:
    rep = Reputation(Policy(half_life_ms=DAY))
    for t, sat, score, wt in sorted(rows):
        rep.add(K, "provider", t, sat, score, wt)
    assert rep.ppm(K, "provider", at) == rep.score(K, "provider", at).ppm
    assert 0 <= rep.ppm(K, "provider", at) <= PPM


def _naive(rows: list[tuple[int, bool, int, int]], at: int, pol: Policy) -> tuple[int, ...]:
    """The documented score straight from the definition: replay every rating with
    ts <= at in time order, no checkpoints, no index."""
    step = pol.step_ms
    e = big_w = big_v = n = sat = stars = 0
    for t, s, score, wt in sorted(r for r in rows if r[0] <= at):
        if n and t // step != e:
            big_w, big_v = decay(big_w, t // step - e), decay(big_v, t // step - e)
        e = t // step
        big_w += wt * UNIT
        big_v += wt * UNIT * rating_value(s, score)
        n, sat, stars = n + 1, sat + s, stars + score
    k = at // step - e
    big_w, big_v = (decay(big_w, k), decay(big_v, k)) if n else (0, 0)
    prior = pol.prior_weight * UNIT
    ppm = PPM * (prior * pol.prior_value + big_v) // (8 * (prior + big_w))
    return ppm, n, sat, stars, big_w


_ROWS = st.lists(st.tuples(st.integers(0, 6 * DAY), st.booleans(), st.integers(1, 5),
                           st.integers(1, 5)), max_size=80)


@given(_ROWS, st.lists(st.integers(0, 8 * DAY), min_size=1, max_size=8),
       st.integers(0, 2**32 - 1))
def test_checkpointed_lookups_equal_the_naive_replay(
    rows: list[tuple[int, bool, int, int]], ats: list[int], shuffle: int
) -> None:
    """`Reputation` (appends) and `FoldReputation` (inserts and removes in any order)
    answer every as-of lookup exactly as the definition replayed from scratch, across
    checkpoint boundaries and ties at one timestamp."""
    import random

    pol = Policy(half_life_ms=DAY)
    rep = Reputation(pol)
    for t, sat, score, wt in sorted(rows, key=lambda r: r[0]):
        rep.add(K, "provider", t, sat, score, wt)
    fold = FoldReputation(pol)
    rnd = random.Random(shuffle)
    live: list[tuple[int, bool, int, int]] = []
    extra = rows[: len(rows) // 3]  # inserted, looked up through, then removed again
    ops = [("in", r) for r in rows + extra]
    rnd.shuffle(ops)
    for i, (_, r) in enumerate(ops):
        fold.insert(K, "provider", r[0], r[1], r[2], r[3])
        live.append(r)
        if i % 7 == 0:  # lookups in between fill checkpoints that later edits drop
            fold.ppm(K, "provider", rnd.choice(ats))
    for r in extra:
        fold.remove(K, "provider", r[0], r[1], r[2], r[3])
        live.remove(r)
        fold.ppm(K, "provider", rnd.choice(ats))
    for at in ats:
        want = _naive(rows, at, pol)
        for r in (rep, fold):
            s = r.score(K, "provider", at)
            assert (s.ppm, s.ratings, s.satisfied, s.stars_sum, s.weight) == want
            assert r.ppm(K, "provider", at) == want[0]
    assert sorted(live) == sorted(rows) and fold.count == len(rows)


def test_removing_an_unknown_rating_is_refused() -> None:
    fold = FoldReputation()
    fold.insert(K, "provider", 5, True, 4, 1)
    with pytest.raises(UsageError):
        fold.remove(K, "provider", 5, True, 3, 1)
    fold.remove(K, "provider", 5, True, 4, 1)
    assert fold.keys() == [] and fold.score(K, "provider", 9).ratings == 0


@settings(deadline=None)  # a SQLite file per example; timing is not under test
@given(_ROWS, st.lists(st.integers(0, 8 * DAY), min_size=1, max_size=8),
       st.integers(0, 2**32 - 1))
def test_cold_ratings_answer_as_if_in_memory(
    rows: list[tuple[int, bool, int, int]], ats: list[int], shuffle: int
) -> None:
    """Ratings moved to a cold store (`cool`, a real SQLite file) and back (`thaw`), with
    inserts, removals and lookups in between: every as-of lookup answers as the
    definition replayed from scratch (the merged history, its cache kept current)."""
    import random

    from node.auction.foldstate import ColdIdx
    from node.marketcold import SqliteCold

    pol = Policy(half_life_ms=DAY)
    store = SqliteCold()
    fold = FoldReputation(pol)
    fold.attach_cold(store)
    rnd = random.Random(shuffle)
    hot = list(rows)
    for r in hot:
        fold.insert(K, "provider", r[0], r[1], r[2], r[3])
    cold: dict[bytes, list[tuple[int, bool, int, int]]] = {}
    for step in range(6):
        if hot and rnd.random() < 0.6:  # a partition's ratings go cold
            part = rnd.sample(hot, rnd.randint(1, len(hot)))
            pk = bytes([step]) * 32
            got = [(K, "provider", r[0], fold.cool(K, "provider", *r)) for r in part]
            store.put(pk, 0, b"s", b"v", (), (), ColdIdx(None, ratings=tuple(got)))
            cold[pk] = part
            for r in part:
                hot.remove(r)
        elif cold and rnd.random() < 0.5:  # one comes back
            pk = rnd.choice(list(cold))
            store.take(pk)
            for r in cold.pop(pk):
                fold.thaw(K, "provider", *r)
                hot.append(r)
        if hot and rnd.random() < 0.5:  # a hot rating removed and inserted again
            r = rnd.choice(hot)
            fold.remove(K, "provider", *r)
            fold.ppm(K, "provider", rnd.choice(ats))
            fold.insert(K, "provider", *r)
        for at in ats:
            want = _naive(rows, at, pol)
            s = fold.score(K, "provider", at)
            assert (s.ppm, s.ratings, s.satisfied, s.stars_sum, s.weight) == want
            assert fold.ppm(K, "provider", at) == want[0]
    assert fold.keys() == ([K] if rows else []) and fold.count == len(rows)
    h = fold._hist.get((K, "provider"))  # only the hot ratings stay in memory
    assert (len(h.ts) if h is not None else 0) == len(hot)
    store.close()
