"""Reputation: the documented score, recency, rater weighting, as-of lookups."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from market_helpers import World, award, key, payment, rating, request

from node.errors import UsageError
from node.reputation import DECAY, PPM, UNIT, Policy, Reputation, decay, rating_value

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
