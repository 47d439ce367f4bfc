"""Set reconciliation core (node/recon.py): the bucketed fingerprint index, kept up to
date by the ledger, and the asking side's state machine against honest and lying
answers. Pure: no network."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from node import recon
from node.errors import UsageError
from node.events import Offer, sign_event
from node.keys import Identity
from node.ledger import Ledger
from node.recon import Item, Items, Node, Reconciler, ReconIndex, Split

SALT = b"saltsalt"


def rand_items(rnd: random.Random, n: int) -> dict[bytes, Item]:
    return {rnd.randbytes(32): Item(rnd.randint(1, 9), rnd.randbytes(32), None)
            for _ in range(n)}


def index_of(items: dict[bytes, Item]) -> ReconIndex:
    return ReconIndex(items.get, items.items())


def brute(items: dict[bytes, Item], prefix: int, bits: int) -> recon.Summary:
    return recon.summary_of((a, it) for a, it in items.items()
                            if recon.node_of(a, bits) == prefix)


def test_children_match_brute_force_at_every_depth() -> None:
    rnd = random.Random(1)
    items = rand_items(rnd, 3000)
    idx = index_of(items)
    assert len(idx) == 3000
    some = next(iter(items))
    for bits in (0, 1, 4, 8, 11, 12, 13, 16, 40, 255):
        prefix = recon.node_of(some, bits)
        for split in (1, 2, 4):
            if bits + split > recon.KEY_BITS:
                continue
            got = idx.children(prefix, bits, split)
            want = [brute(items, (prefix << split) | i, bits + split) for i in range(1 << split)]
            assert got == want, (bits, split)
        assert idx.summary(prefix, bits) == brute(items, prefix, bits)
        assert idx.count(prefix, bits) == brute(items, prefix, bits).size
    with pytest.raises(UsageError):
        idx.children(0, 255, 2)
    with pytest.raises(UsageError):
        idx.children(2, 1, 1)


def test_updates_equal_a_rebuild() -> None:
    rnd = random.Random(2)
    items = rand_items(rnd, 500)
    idx = index_of(items)
    keys = list(items)
    for step in range(2000):
        op = rnd.random()
        if op < 0.3 or not keys:
            a = rnd.randbytes(32)
            new: Item | None = Item(1, rnd.randbytes(32), None)
            keys.append(a)
        elif op < 0.9:
            a = rnd.choice(keys)
            old = items.get(a)
            seq = old.seq + 1 if old else 1
            new = Item(seq, rnd.randbytes(32), rnd.choice([None, seq + 1]))
        else:
            a = keys.pop(rnd.randrange(len(keys)))
            new = None
        old_item = items.get(a)
        if new is None:
            items.pop(a, None)
        else:
            items[a] = new
        idx.update(a, old_item, new)
        if step % 400 == 0:
            fresh = index_of(items)
            for bits in (0, 4, 12):
                for prefix in range(0, 1 << bits, max(1, (1 << bits) // 16)):
                    assert idx.summary(prefix, bits) == fresh.summary(prefix, bits)
    assert idx.authors(0, 0) == sorted(items)


def test_fingerprints_depend_on_salt_count_and_sum() -> None:
    assert recon.fingerprint(1, 5, SALT) != recon.fingerprint(1, 5, b"other!!!")
    assert recon.fingerprint(1, 5, SALT) != recon.fingerprint(2, 5, SALT)
    assert recon.fingerprint(1, 5, SALT) == recon.fingerprint(1, 5 + recon.MOD, SALT)
    assert len(recon.fingerprint(0, 0, SALT)) == recon.FP_BYTES


def test_node_wire_form() -> None:
    for prefix, bits in ((0, 0), (1, 1), (0b1011, 4), (0x3FF, 10), ((1 << 256) - 1, 256)):
        data = recon.node_bytes(prefix, bits)
        assert len(data) == (bits + 7) // 8
        assert recon.node_from_bytes(data, bits) == prefix
    assert recon.node_from_bytes(b"\x01", 4) is None  # unused low bits set
    assert recon.node_from_bytes(b"\x10\x00", 4) is None  # too long
    assert recon.node_from_bytes(b"", 257) is None
    assert recon.check_disjoint([(0, 1), (1, 1)]) is None
    assert recon.check_disjoint([(0b10, 2), (0b0, 1)]) is not None
    assert recon.check_disjoint([(0, 1), (0b01, 2)]) is not None  # inside the first


# ------------------------------------------------------------------ the exchange


def reconcile(client: dict[bytes, Item], server: dict[bytes, Item],
              **kw: int) -> tuple[Reconciler, set[bytes], int]:
    """Run a reconciliation to the end; the authors found (items that differ, plus
    everything under the nodes to list) and the number of requests."""
    ci, si = index_of(client), index_of(server)
    r = Reconciler(lambda: ci, SALT, **kw)
    found: set[bytes] = set()
    trips = 0
    while (b := r.batch()) is not None:
        trips += 1
        split, nodes = b
        assert recon.check_disjoint([(n.prefix, n.bits) for n in nodes]) is None
        for node in nodes:
            ans = recon.answer(si, node.prefix, node.bits, split, SALT)
            if isinstance(ans, Split):
                assert r.on_split(node, split, ans) is None
            else:
                differ, fault = r.on_items(node, ans)
                assert fault is None
                found.update(a for a, _ in differ)
    for node in r.listing:
        found.update(si.authors(node.prefix, node.bits))
    return r, found, trips


def changed(base: dict[bytes, Item], rnd: random.Random, n: int,
            new: int = 0) -> tuple[dict[bytes, Item], set[bytes]]:
    out = dict(base)
    picked = set(rnd.sample(sorted(base), n))
    for a in picked:
        out[a] = Item(base[a].seq + 1, rnd.randbytes(32), None)
    for _ in range(new):
        a = rnd.randbytes(32)
        out[a] = Item(1, rnd.randbytes(32), None)
        picked.add(a)
    return out, picked


@pytest.mark.parametrize("n,d,new", [(2000, 10, 0), (5000, 50, 5), (300, 0, 40), (0, 0, 50)])
def test_finds_exactly_what_differs(n: int, d: int, new: int) -> None:
    rnd = random.Random(n + d)
    base = rand_items(rnd, n)
    server, diff = changed(base, rnd, d, new)
    r, found, _trips = reconcile(base, server)
    assert found == diff and not r.over_budget
    assert r.asked < 64 * (len(diff) + 1)


def test_client_ahead_finds_nothing_to_pull() -> None:
    rnd = random.Random(5)
    base = rand_items(rnd, 3000)
    client, diff = changed(base, rnd, 30, 10)
    r, found, _ = reconcile(client, base)
    assert found <= diff and not r.over_budget  # only the 30 the peer holds older
    assert len(found) == 30


def test_equal_sets_need_one_request() -> None:
    items = rand_items(random.Random(6), 1000)
    r, found, trips = reconcile(items, dict(items))
    assert not found and trips == 1 and r.asked == 1


def test_endless_splitting_is_cut_by_the_budget() -> None:
    """A peer answering every node with a split of made-up prints (never items) finds
    nothing, so the asking side stops after nodes_base nodes."""
    ci = index_of(rand_items(random.Random(7), 100))
    r = Reconciler(lambda: ci, SALT, nodes_base=300)
    rnd = random.Random(8)
    trips = 0
    while (b := r.batch()) is not None:
        trips += 1
        split, nodes = b
        for node in nodes:
            counts = tuple([1000] * (1 << split))
            fps = tuple(rnd.randbytes(recon.FP_BYTES) for _ in counts)
            assert r.on_split(node, split, Split(counts, fps)) is None
    assert r.over_budget and r.asked == 300 and trips <= 8


def test_malformed_answers_are_faults() -> None:
    ci = index_of(rand_items(random.Random(9), 10))
    r = Reconciler(lambda: ci, SALT)
    fp = b"\x00" * recon.FP_BYTES
    root = Node(0, 0)
    assert r.on_split(root, 2, Split((5, 5), (fp, fp)))  # wrong number of children
    assert r.on_split(root, 1, Split((5, 5), (fp,)))  # a print missing
    assert r.on_split(root, 1, Split((1, 0), (fp,)))  # one item: should be items
    assert r.on_split(Node(0, 255, 4), 1, Split((2, 2), (fp, fp)))  # two items at a full key
    a, b = bytes(32), b"\x80" + bytes(31)
    it = Item(1, bytes(32), None)
    assert r.on_items(root, Items(((a, it), (b, it))))[1]  # more than LEAF_ITEMS
    assert r.on_items(Node(0, 1, 1), Items(((b, it),)))[1]  # outside the node
    assert r.on_items(Node(1, 1, 1), Items(((b, it),)))[1] is None


# ------------------------------------------------------------------ the ledger's index


def body(i: int) -> Offer:
    return Offer(services=(), currency="EUR", addrs=(), note=f"e{i}")


def rebuilt(led: Ledger) -> ReconIndex:
    return ReconIndex(led.recon_item, ((a, it) for a in led.heads()
                                       if (it := led.recon_item(a)) is not None))


def same(a: ReconIndex, b: ReconIndex) -> bool:
    return all(a.children(p, 4, 4) == b.children(p, 4, 4) for p in range(16))


def test_ledger_keeps_its_index_up_to_date(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.db", network="test")
    ids = [Identity.generate() for _ in range(40)]
    for i, ident in enumerate(ids):
        led.publish(ident, body(i), 1000)
    idx = led.recon_index()
    assert len(idx) == 40 and same(idx, rebuilt(led))
    for i, ident in enumerate(ids[:20]):
        led.publish(ident, body(100 + i), 1001)
    led.publish(Identity.generate(), body(999), 1000)
    assert led.recon_index() is idx and len(idx) == 41 and same(idx, rebuilt(led))
    # A fork proof changes the author's item (its head is cut back, the fork named).
    liar = ids[30]
    head = led.head(liar.public)
    assert head is not None
    x = sign_event(liar.seed, head.seq + 1, head.id, 2000, body(-1), "test")
    y = sign_event(liar.seed, head.seq + 1, head.id, 2000, body(-2), "test")
    before = led.recon_item(liar.public)
    led.append(x.wire)
    led.append(y.wire)
    assert led.forked() == {liar.public: head.seq + 1}
    assert led.recon_item(liar.public) == Item(head.seq, head.id, head.seq + 1) != before
    assert same(idx, rebuilt(led))
    # The item is the HEADS entry of /sync/1.
    sh = led.sync_heads()
    assert all(led.recon_item(a)[:2] == sh[a] for a in sh)  # type: ignore[index]
    # A fork proof received above our own chain: the item names it once the chain
    # reaches the fork, as HEADS does.
    other = Ledger(tmp_path / "o.db", network="test")
    other.recon_index()
    evs = [other.publish(liar, body(i), 1000 + i) for i in range(3)]
    z = sign_event(liar.seed, 5, evs[-1].id, 3000, body(-3), "test")
    w = sign_event(liar.seed, 5, evs[-1].id, 3000, body(-4), "test")
    assert other.add_fork_proof(z.wire, w.wire)
    assert other.recon_item(liar.public) == Item(3, evs[-1].id, None)
    assert same(other.recon_index(), rebuilt(other))


def test_pages_walk_every_author_in_order() -> None:
    items = rand_items(random.Random(10), 700)
    idx = index_of(items)
    got: list[bytes] = []
    after = None
    while True:
        page, more = idx.page(after, 37)
        got.extend(page)
        if not more:
            break
        after = page[-1]
    assert got == sorted(items)
    assert idx.page(None, 1000) == (sorted(items), False)
    assert idx.page(b"\xff" * 32, 5) == ([], False)
    assert idx.page(None, 700) == (sorted(items), False)
    assert idx.page(None, 699) == (sorted(items)[:699], True)
    empty = index_of({})
    assert empty.page(None, 5) == ([], False) and len(empty) == 0
