"""Range-based set reconciliation over the per-author heads (the `/sync/2` core).

What two nodes compare is the set the state digest hashes: one *item* per author,
its effective head `(seq, id)` and the fork it announces (the HEADS entry of
`/sync/1`). Chains are hash-linked, so equal items mean equal histories; a
differing item says which author to fetch. The key space is the 256-bit author key
read as a big-endian bit string, cut into a binary trie: a *node* is a key prefix
`(prefix, bits)` covering every author whose first `bits` bits equal `prefix`.

A node's fingerprint is `sha256(FP_DOMAIN || salt || sum || count)[:FP_BYTES]`
where `sum` is the sum mod 2^256 of its items' hashes (little-endian 32 bytes),
`count` the number of items (little-endian 8 bytes) and `salt` a value the asking
side picks per session: 6 bytes suffice because nobody can grind a collision for a
salt they do not know in advance; two different sets collide only by chance (2^-48
per comparison, and a fresh salt next session finds what one missed) or if their
256-bit sums do. Sums are updatable on
insert: `ReconIndex` keeps the sum and the sorted authors of each of 2^BUCKET_BITS
buckets (the nodes at depth BUCKET_BITS), updated in O(log bucket) per head
change, so a node with a million events never hashes everything per session:
nodes at or above the bucket depth add bucket sums (at most 2^BUCKET_BITS
additions), deeper nodes hash only their own authors.

This module is pure: no ledger, no I/O. The ledger owns an index and keeps it up
to date (`Ledger.recon_index`); node/sync.py turns it into messages.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Callable, Iterable
from typing import NamedTuple

from .errors import UsageError

KEY_BITS = 256
BUCKET_BITS = 12  # 4,096 buckets: ~25 authors each at 100k authors, ~244 at 1M
FP_BYTES = 6
SALT_BYTES = 8
MOD = 1 << 256
ITEM_DOMAIN = b"bidmesh/recon/item/v1"
FP_DOMAIN = b"bidmesh/recon/fp/v1"
_NO_ID = bytes(32)


class Item(NamedTuple):
    """What one author contributes: the fields of a HEADS entry (node/sync.py)."""

    seq: int  # effective head: truncated before the author's first fork
    id: bytes | None  # None only when seq == 0
    fork_seq: int | None  # the fork announced (seq == fork_seq - 1), else None


def item_hash(author: bytes, item: Item) -> int:
    """sha256(ITEM_DOMAIN || author || seq u64be || id or 32 zero bytes || fork_seq u64be
    or 0), read as a little-endian integer."""
    data = b"".join((ITEM_DOMAIN, author, item.seq.to_bytes(8, "big"), item.id or _NO_ID,
                     (item.fork_seq or 0).to_bytes(8, "big")))
    return int.from_bytes(hashlib.sha256(data).digest(), "little")


def fingerprint(count: int, total: int, salt: bytes) -> bytes:
    """The fingerprint of a node holding `count` items whose hashes sum to `total`."""
    data = b"".join((FP_DOMAIN, salt, (total % MOD).to_bytes(32, "little"),
                     count.to_bytes(8, "little")))
    return hashlib.sha256(data).digest()[:FP_BYTES]


def check_node(prefix: int, bits: int) -> None:
    if not 0 <= bits <= KEY_BITS or not 0 <= prefix < (1 << bits):
        raise UsageError(f"not a trie node: prefix {prefix} of {bits} bits")


def node_bounds(prefix: int, bits: int) -> tuple[bytes, bytes | None]:
    """[low, high) of the author keys under a node; high None past the last key."""
    shift = KEY_BITS - bits
    low = (prefix << shift).to_bytes(32, "big")
    hi = (prefix + 1) << shift
    return low, None if hi >= MOD else hi.to_bytes(32, "big")


def node_of(author: bytes, bits: int) -> int:
    """The prefix of the node at depth `bits` holding `author`."""
    return int.from_bytes(author, "big") >> (KEY_BITS - bits)


def node_bytes(prefix: int, bits: int) -> bytes:
    """Wire form of a prefix: its `bits` bits, left-aligned in ceil(bits/8) bytes."""
    n = (bits + 7) // 8
    return (prefix << (8 * n - bits)).to_bytes(n, "big")


def node_from_bytes(data: bytes, bits: int) -> int | None:
    """Inverse of `node_bytes`; None if the length is wrong or unused bits are set."""
    n = (bits + 7) // 8
    if len(data) != n or not 0 <= bits <= KEY_BITS:
        return None
    v = int.from_bytes(data, "big")
    pad = 8 * n - bits
    if v & ((1 << pad) - 1):
        return None
    return v >> pad


class Summary(NamedTuple):
    size: int  # number of items
    total: int  # sum of item hashes mod 2^256

    def fp(self, salt: bytes) -> bytes:
        return fingerprint(self.size, self.total, salt)


class ReconIndex:
    """Per-bucket sums and sorted authors over the items of one ledger.

    `item_of(author)` returns an author's current item (None if it has none): deep
    nodes hash items on demand, so nothing per author is kept but its key (a
    reference to the ledger's own bytes object) in its bucket's sorted list."""

    def __init__(self, item_of: Callable[[bytes], Item | None],
                 items: Iterable[tuple[bytes, Item]] = ()) -> None:
        self.item_of = item_of
        self._sums = [0] * (1 << BUCKET_BITS)
        self._keys: list[list[bytes]] = [[] for _ in range(1 << BUCKET_BITS)]
        self._count = 0  # authors in all buckets (a session asks at its start)
        for author, item in items:
            b = node_of(author, BUCKET_BITS)
            self._keys[b].append(author)
            self._sums[b] = (self._sums[b] + item_hash(author, item)) % MOD
            self._count += 1
        for keys in self._keys:
            keys.sort()

    def __len__(self) -> int:
        return self._count

    def update(self, author: bytes, old: Item | None, new: Item | None) -> None:
        """Replace `author`'s item `old` (None: it had none) by `new`."""
        if old == new:
            return
        b = node_of(author, BUCKET_BITS)
        keys = self._keys[b]
        total = self._sums[b]
        if old is not None:
            total -= item_hash(author, old)
        if new is not None:
            total += item_hash(author, new)
        self._sums[b] = total % MOD
        if old is None or new is None:
            i = bisect.bisect_left(keys, author)
            present = i < len(keys) and keys[i] == author
            if new is not None and not present:
                keys.insert(i, author)
                self._count += 1
            elif new is None and present:
                del keys[i]
                self._count -= 1

    def _buckets(self, prefix: int, bits: int) -> range:
        if bits >= BUCKET_BITS:
            b = prefix >> (bits - BUCKET_BITS)
            return range(b, b + 1)
        shift = BUCKET_BITS - bits
        return range(prefix << shift, (prefix + 1) << shift)

    def authors(self, prefix: int, bits: int) -> list[bytes]:
        """The authors under a node, ascending."""
        check_node(prefix, bits)
        rng = self._buckets(prefix, bits)
        if bits <= BUCKET_BITS:
            return [a for b in rng for a in self._keys[b]]
        keys = self._keys[rng.start]
        low, high = node_bounds(prefix, bits)
        i = bisect.bisect_left(keys, low)
        j = len(keys) if high is None else bisect.bisect_left(keys, high, i)
        return keys[i:j]

    def page(self, after: bytes | None, limit: int) -> tuple[list[bytes], bool]:
        """Up to `limit` authors strictly after `after`, ascending, and whether more
        follow (a HEADS page without sorting every author)."""
        b = 0 if after is None else node_of(after, BUCKET_BITS)
        keys = self._keys[b]
        i = 0 if after is None else bisect.bisect_right(keys, after)
        # Chained in C: a small or empty index (a young network) would otherwise cost
        # a Python step for each of the 4,096 buckets per page.
        rest = itertools.chain(keys[i:], itertools.chain.from_iterable(self._keys[b + 1:]))
        out = list(itertools.islice(rest, limit + 1))
        return out[:limit], len(out) > limit

    def count(self, prefix: int, bits: int) -> int:
        if bits <= BUCKET_BITS:
            check_node(prefix, bits)
            return sum(len(self._keys[b]) for b in self._buckets(prefix, bits))
        return len(self.authors(prefix, bits))

    def summary(self, prefix: int, bits: int) -> Summary:
        return self.children(prefix, bits, 0)[0]

    def children(self, prefix: int, bits: int, split: int) -> list[Summary]:
        """Summaries of the 2^split children of a node (split 0: the node itself).

        Work: at most 2^BUCKET_BITS bucket sums at or above bucket depth, else one
        item hash per author under the node."""
        check_node(prefix, bits)
        depth = bits + split
        if split < 0 or depth > KEY_BITS:
            raise UsageError(f"cannot split a node of {bits} bits by {split}")
        n = 1 << split
        if depth <= BUCKET_BITS:
            per = 1 << (BUCKET_BITS - depth)
            first = prefix << (BUCKET_BITS - bits)
            out = []
            for c in range(n):
                lo = first + c * per
                count = total = 0
                for b in range(lo, lo + per):
                    count += len(self._keys[b])
                    total += self._sums[b]
                out.append(Summary(count, total % MOD))
            return out
        counts = [0] * n
        totals = [0] * n
        base = prefix << split
        for a in self.authors(prefix, bits):
            item = self.item_of(a)
            if item is None:
                continue
            c = node_of(a, depth) - base
            counts[c] += 1
            totals[c] += item_hash(a, item)
        return [Summary(c, t % MOD) for c, t in zip(counts, totals, strict=True)]

    def items(self, prefix: int, bits: int, limit: int) -> list[tuple[bytes, Item]]:
        """At most `limit` (author, item) pairs under a node, ascending."""
        out = []
        for a in self.authors(prefix, bits)[:limit]:
            item = self.item_of(a)
            if item is not None:
                out.append((a, item))
        return out


def summary_of(items: Iterable[tuple[bytes, Item]]) -> Summary:
    """The summary of an explicit list of items (to check a peer's leaf answer)."""
    count = total = 0
    for author, item in items:
        count += 1
        total += item_hash(author, item)
    return Summary(count, total % MOD)


# ------------------------------------------------------------------ the exchange

LEAF_ITEMS = 1  # a node holding at most this many items is answered with its items
SPLIT_MAX = 4  # children per split answer: 2^split, split in 1..SPLIT_MAX
SPLIT_SPARSE = 3  # where few children differ (2 sends ~8% fewer bytes, ~40% more trips)
NODES_MAX = 128  # nodes per request (disjoint: see `check_disjoint`)
LIST_MIN = 32  # a differing node where we hold nothing is listed (HEADS) from this size


class Split(NamedTuple):
    """The answer for a node holding more than LEAF_ITEMS items: its children's
    counts, and the fingerprints of the non-empty ones, in key order."""

    counts: tuple[int, ...]
    fps: tuple[bytes, ...]


class Items(NamedTuple):
    """The answer for a node holding at most LEAF_ITEMS items: all of them, ascending."""

    items: tuple[tuple[bytes, Item], ...]


Answer = Split | Items


def answer(index: ReconIndex, prefix: int, bits: int, split: int, salt: bytes) -> Answer:
    """What a node holds, as the peer asking about it will be told (pure, bounded:
    see `ReconIndex.children`)."""
    if index.count(prefix, bits) <= LEAF_ITEMS:
        return Items(tuple(index.items(prefix, bits, LEAF_ITEMS)))
    ch = index.children(prefix, bits, split)
    return Split(tuple(c.size for c in ch), tuple(c.fp(salt) for c in ch if c.size))


def check_disjoint(nodes: list[tuple[int, int]]) -> str | None:
    """Nodes of one request must be in ascending key order and must not overlap (the
    work of answering them is then bounded by the index, whatever they are); the
    problem, or None."""
    last_high: int | None = None
    for prefix, bits in nodes:
        low = prefix << (KEY_BITS - bits)
        if last_high is not None and low < last_high:
            return "nodes must be disjoint and in ascending key order"
        last_high = (prefix + 1) << (KEY_BITS - bits)
    return None


class Node(NamedTuple):
    prefix: int
    bits: int
    size: int | None = None  # what the peer said it holds there (None: the root)

    def child(self, i: int, split: int, count: int) -> Node:
        return Node((self.prefix << split) | i, self.bits + split, count)


class Reconciler:
    """The asking side of one reconciliation, as a state machine (no messages, no I/O).

    Starts at the root; `batch()` gives the split and the nodes to ask about next
    (disjoint, in key order);
    `on_split` / `on_items` take the peer's answer for one node. Children whose
    (count, fingerprint) differ from ours are asked about in turn, except those where
    we hold nothing and the peer at least LIST_MIN (`listing`: cheaper to list them
    with HEADS) and those where the
    peer holds nothing (nothing to pull there). Items that differ from ours are
    `found`; the caller decides what to fetch.

    Bounds: answers are checked for shape only (a peer's ledger moves between two
    answers, so fingerprints cannot be held against it across requests); what a
    lying peer can cost is capped by `budget()`: at most `nodes_base` nodes asked,
    plus `nodes_per_found` for every item found that differs from ours. A peer
    answering with made-up fingerprints (endless splitting) finds nothing and is cut
    at `nodes_base`."""

    def __init__(self, index: Callable[[], ReconIndex], salt: bytes, *,
                 nodes_base: int = 1024, nodes_per_found: int = 64) -> None:
        self.index = index
        self.salt = salt
        self.nodes_base = nodes_base
        self.nodes_per_found = nodes_per_found
        self.queue: list[Node] = [Node(0, 0)]
        self.listing: list[Node] = []  # differing nodes where we hold nothing
        self.asked = 0
        self.found = 0
        self.split = SPLIT_MAX
        self.over_budget = False
        self._differ = self._nonempty = 0  # children in the answers of the last batch

    @property
    def done(self) -> bool:
        return not self.queue

    def budget(self) -> int:
        return self.nodes_base + self.nodes_per_found * self.found

    def batch(self) -> tuple[int, list[Node]] | None:
        """(split, nodes) for the next request; None when nothing is left to ask or
        the budget is spent (`over_budget`)."""
        if not self.queue:
            return None
        room = self.budget() - self.asked
        if room <= 0:
            self.over_budget = True
            self.queue.clear()
            return None
        # Deepest first (the newest children): leaves, and so `found`, come early,
        # which a wide divergence needs to stay within the budget. Queued nodes are
        # disjoint (children of distinct nodes); a request lists them in key order.
        nodes = self.queue[-min(NODES_MAX, room):]
        del self.queue[-len(nodes):]
        nodes.sort(key=lambda n: n.prefix << (KEY_BITS - n.bits))
        self.asked += len(nodes)
        if self._nonempty:
            # Most children differing: few of them are shared, so wider splits cost
            # nothing and save round trips; otherwise narrower ones send fewer prints.
            self.split = SPLIT_MAX if 2 * self._differ >= self._nonempty else SPLIT_SPARSE
        self._differ = self._nonempty = 0
        deepest = max(n.bits for n in nodes)
        return max(1, min(self.split, KEY_BITS - deepest)), nodes

    def on_split(self, node: Node, split: int, ans: Split) -> str | None:
        """Take a split answer; the fault, or None."""
        n = 1 << split
        if len(ans.counts) != n or node.bits + split > KEY_BITS:
            return f"a split of {split} bits must have {n} children"
        if len(ans.fps) != sum(1 for c in ans.counts if c):
            return "one fingerprint per non-empty child"
        if sum(ans.counts) <= LEAF_ITEMS:
            return f"a node of at most {LEAF_ITEMS} items must be answered with its items"
        if node.bits + split > KEY_BITS - SPLIT_MAX:
            # Two authors sharing 252 bits cost ~2^126 work to make; and a node this
            # deep could not be split again in a request.
            return "no two authors share that long a prefix"
        ours = self.index().children(node.prefix, node.bits, split)
        fps = iter(ans.fps)
        differ = nonempty = 0
        for i, (count, mine) in enumerate(zip(ans.counts, ours, strict=True)):
            if not count:
                continue
            nonempty += 1
            fp = next(fps)
            if count == mine.size and fp == mine.fp(self.salt):
                continue
            differ += 1
            child = node.child(i, split, count)
            # Where we hold nothing, listing saves the fingerprints of a descent, but
            # costs a round trip per node: worth it for large nodes only.
            listing = mine.size == 0 and count >= LIST_MIN
            (self.listing if listing else self.queue).append(child)
        self._differ += differ
        self._nonempty += nonempty
        return None

    def on_items(self, node: Node, ans: Items) -> tuple[list[tuple[bytes, Item]], str | None]:
        """Take an items answer: (the items that differ from ours, the fault or None)."""
        if len(ans.items) > LEAF_ITEMS:
            return [], f"at most {LEAF_ITEMS} items per node"
        low, high = node_bounds(node.prefix, node.bits)
        last = None
        for author, _ in ans.items:
            if author < low or (high is not None and author >= high) or (
                    last is not None and author <= last):
                return [], "items must be under the node, ascending"
            last = author
        index = self.index()
        differ = [(a, it) for a, it in ans.items if index.item_of(a) != it]
        self.found += len(differ)
        return differ, None
