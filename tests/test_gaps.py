"""Budgeted gap fetching (node/gaps.py): pure, on made-up gaps and times."""

from __future__ import annotations

from node.gaps import RETRY_S, GapPlanner
from node.ledger import Gap


def gap(i: int, source: str, added: float = 0.0) -> Gap:
    return Gap(i.to_bytes(32, "big"), 1, 1, (source,), added)


def test_asks_the_source_first_then_another_peer_then_gives_up() -> None:
    gp = GapPlanner(authors_per_round=64, peer_requests_per_s=16, tries=2)
    gaps = [gap(1, "B")]
    r = gp.plan(gaps, ["A", "B", "C"], 0.0)
    assert r is not None and r.peer == "B" and r.gaps == ((gaps[0].author, 1, 1),)
    assert gp.plan(gaps, ["A", "B", "C"], 0.1) is None  # too soon to retry
    r = gp.plan(gaps, ["A", "B", "C"], RETRY_S)
    assert r is not None and r.peer == "A"
    assert gp.plan(gaps, ["A", "B", "C"], 10.0) is None  # two tries used: left to expire
    assert gp.next_due(gaps, 10.0) is None
    assert gp.plan([], ["A"], 11.0) is None and gp.status()["tracked"] == 0  # forgotten


def test_an_unfillable_gap_storm_costs_bounded_requests() -> None:
    """20,000 fresh authors at seq 2 from one stranger who then leaves: over 60 s of
    rounds every 0.5 s, the one honest peer is asked at most its budget."""
    gp = GapPlanner(authors_per_round=64, peer_requests_per_s=16, tries=2)
    storm = [gap(i, "gone") for i in range(20_000)]
    asked = 0
    t = 0.0
    while t < 60:
        r = gp.plan(storm, ["honest"], t)
        if r is not None:
            assert r.peer == "honest" and len(r.gaps) <= 64
            asked += len(r.gaps)
        t += 0.5
    assert asked <= 16 * 60 + 16 * 4  # rate x time + burst
    assert asked >= 16 * 55  # ... and it does use the budget


def test_one_sources_many_gaps_do_not_delay_anothers_one() -> None:
    gp = GapPlanner(authors_per_round=4, peer_requests_per_s=100, tries=2)
    gaps = [gap(i, "flood") for i in range(1000)] + [gap(5000, "h")]
    r = gp.plan(gaps, ["p"], 1000.0)
    assert r is not None and len(r.gaps) == 4
    assert (gaps[-1].author, 1, 1) in r.gaps  # interleaved: the honest gap is in round 1


def test_no_peers_no_tokens_no_round() -> None:
    gp = GapPlanner(authors_per_round=64, peer_requests_per_s=1, tries=3)
    gaps = [gap(i, "s") for i in range(10)]
    assert gp.plan(gaps, [], 0.0) is None
    r = gp.plan(gaps, ["p"], 0.0)
    assert r is not None and len(r.gaps) == 4  # the burst: 4 s of 1/s
    assert gp.plan(gaps, ["p"], 0.5) is None  # budget spent, no other peer
    due = gp.next_due(gaps, 0.5)
    assert due is not None and due >= 1.5


def test_a_failed_round_does_not_use_up_a_try_and_progress_makes_a_new_gap() -> None:
    gp = GapPlanner(authors_per_round=64, peer_requests_per_s=16, tries=1)
    g = gap(1, "B")
    r = gp.plan([g], ["B"], 0.0)
    assert r is not None
    gp.failed(r)
    r = gp.plan([g], ["B"], RETRY_S)  # asked again after the retry delay
    assert r is not None and r.peer == "B"
    assert gp.plan([g], ["B"], 10.0) is None  # that one counted
    moved = Gap(g.author, 2, 2, g.sources, g.added)  # seq 1 arrived, seq 2 still missing
    r = gp.plan([moved], ["B"], 10.0)
    assert r is not None and r.gaps == ((g.author, 2, 2),)


def test_forgotten_gaps_leave_the_given_up_count_and_a_storm_plans_in_one_pass() -> None:
    """A gap that used its tries counts as given up until it fills or expires; and a
    round over 20,000 gaps keeps at most its own size per source (the plan runs on
    the event loop every round)."""
    gp = GapPlanner(authors_per_round=64, peer_requests_per_s=1000, tries=1)
    storm = [gap(i, "gone") for i in range(20_000)] + [gap(99_999, "h")]
    r = gp.plan(storm, ["p"], 0.0)
    assert r is not None and len(r.gaps) == 64 and (storm[-1].author, 1, 1) in r.gaps
    assert gp.status() == {"rounds": 1, "asked": 64, "given_up": 64, "tracked": 64}
    # Those 63 of the storm filled meanwhile; the honest one is still waiting.
    assert gp.plan(storm[63:], ["p"], 5.0) is not None
    assert gp.status()["given_up"] == 1 + 64 and gp.status()["tracked"] == 1 + 64
    assert gp.plan([], ["p"], 9.0) is None and gp.status()["given_up"] == 0
