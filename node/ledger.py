"""The replicated ledger: an append-only SQLite (WAL) store of verified events.

`append` takes raw wire bytes and answers accepted / duplicate / pending / rejected /
fork. Checks here are self-contained (codec, signature, schema, chain), so every
honest node stores exactly the same events; rules that depend on other events are
applied by the derivations. Per-author chains must be contiguous: an event whose
predecessor is missing waits in an in-memory pending buffer, charged to the peer
that sent it (bounded per peer and in total, in events and bytes; entries expire)
and is accepted when the gap fills. Two valid events at one (author, seq) are a fork proof: stored,
and the author's events from that seq on are excluded from derived state.

Durability: WAL with synchronous=NORMAL. A committed append survives the process
being killed (the OS has the pages); only power loss can drop the last commits.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

from .errors import UsageError
from .events import Event
from .ledger_append import LedgerAppend
from .ledger_pending import HELD_OVERHEAD, Gap, PendingLimits, Source, _Pending
from .ledger_reads import StoredReads
from .ledger_records import (
    PARALLEL_MIN,
    SCHEMA,
    TRANSIENT_REASONS,
    AppendResult,
    ForkProof,
    Head,
    Status,
    check_records,
    idk,
    read_stream,
)
from .recon import Item, ReconIndex

# Split out of this module (issue 17) and re-exported: the rest of the node imports them here.
__all__ = [
    "CACHE_KIB", "HELD_OVERHEAD", "PARALLEL_MIN", "SCHEMA", "TRANSIENT_REASONS",
    "WAL_CHECKPOINT_PAGES", "AppendResult", "ForkProof", "Gap", "Head", "Ledger",
    "PendingLimits", "Source", "Status", "check_records", "idk", "read_stream",
]


CACHE_KIB = 8 << 10  # the writer's page cache: in the RSS once full (docs/decisions.md)
WAL_CHECKPOINT_PAGES = 10_000  # ~40 MiB of WAL between automatic checkpoints


class Ledger(LedgerAppend, StoredReads):
    """One network's ledger in one SQLite file. Use from a single thread. Its append
    path is `ledger_append.LedgerAppend`, its reads of stored events
    `ledger_reads.StoredReads` (mixins split from this class)."""

    def __init__(
        self,
        path: str | Path,
        *,
        network: str = "main",
        readonly: bool = False,
        pending_per_author: int = 1024,
        pending_total: int = 65_536,
        pending: PendingLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        cache_kib: int | None = None,  # page cache (default CACHE_KIB; node.ledger_cache_mib)
    ) -> None:
        self.path = Path(path)
        self.network = network
        self.readonly = readonly
        self._prechecked: dict[bytes, Event | AppendResult] = {}  # see prechecked()
        if readonly:
            if not self.path.exists():
                raise UsageError(f"no ledger at {self.path}")
            uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            # Batches from many authors dirty one index page per author; fewer, larger
            # checkpoints roughly halve the cost per stored event.
            self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB if cache_kib is None else cache_kib}")
            self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            self.db.execute(f"PRAGMA journal_size_limit={64 << 20}")
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(events)")}
            if cols and "idk" not in cols:
                raise UsageError(f"{self.path} was written by an older bidmesh (no id key "
                                 "column); export it with that version and import it here")
            self.db.executescript(SCHEMA)
        self.db.create_function("idk", 1, idk, deterministic=True)
        self.db.execute("PRAGMA busy_timeout=5000")
        self._check_network()
        self._pending = _Pending(pending or PendingLimits(per_author=pending_per_author,
                                                          total=pending_total))
        self._clock = clock
        # Stored events, kept by the writer once counted (COUNT(*) scans an index:
        # ~30 ms at 1M events, and status, DIGEST answers and metrics ask often).
        self._count: int | None = None
        self.counters: Counter[str] = Counter()  # outcome and rejection-reason counts
        self._digest: bytes | None = None
        self._recon: ReconIndex | None = None  # built on first use, then kept up to date
        self._gap_of: dict[bytes, Gap] = {}  # pending_gaps(), per author, as last summarized
        self.drain_limit: int | None = None
        """Events one append stores from the pending buffer (the chains its events
        complete); None: all of them. A node on an event loop sets it (node/gossip.py):
        a filled gap can release a 1,024-event chain, ~50-100 ms of work in one step.
        Where it stops, the author is *ready* and `drain_ready` stores the rest."""
        self.on_ready: Callable[[], None] | None = None
        """Called after a commit that left authors ready (to wake whoever drains)."""
        self._ready: OrderedDict[bytes, None] = OrderedDict()
        self._load_heads()

    # ------------------------------------------------------------ setup

    def _check_network(self) -> None:
        row = self.db.execute("SELECT v FROM meta WHERE k='network'").fetchone()
        if row is None:
            if self.readonly:
                raise UsageError(f"{self.path} is not an initialised bidmesh ledger")
            self.db.execute("INSERT INTO meta VALUES('network', ?)", (self.network,))
        elif row[0] != self.network:
            raise UsageError(
                f"{self.path} holds network {row[0]!r}, not {self.network!r}; "
                f"pass --network {row[0]} or use another data dir"
            )

    def _load_heads(self) -> None:
        self._heads: dict[bytes, Head] = {}
        q = (
            "SELECT e.author, e.seq, e.id, e.ts_ms FROM events e "
            "JOIN (SELECT author, MAX(seq) AS s FROM events GROUP BY author) m "
            "ON e.author = m.author AND e.seq = m.s"
        )
        for author, seq, id_, ts in self.db.execute(q):
            self._heads[author] = Head(seq, id_, ts)
        self._forks: dict[bytes, int] = {}
        for author, seq in self.db.execute("SELECT author, MIN(seq) FROM forks GROUP BY author"):
            self._forks[author] = seq
        self._digest = None
        self._recon = None

    @staticmethod
    def stored_network(path: str | Path) -> str | None:
        """The network id a ledger file was created for; None if there is no ledger."""
        path = Path(path)
        if not path.exists():
            return None
        uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True)
            try:
                row = db.execute("SELECT v FROM meta WHERE k='network'").fetchone()
            finally:
                db.close()
        except sqlite3.Error as e:
            raise UsageError(f"{path} is not a bidmesh ledger ({e})") from e
        return str(row[0]) if row else None

    def refresh(self) -> None:
        """Re-read heads (read-only handles watching a live daemon's ledger)."""
        self._load_heads()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ queries

    def heads(self) -> dict[bytes, Head]:
        """Stored head per author (including past a fork)."""
        return dict(self._heads)

    def head(self, author: bytes) -> Head | None:
        return self._heads.get(author)

    def forked(self) -> dict[bytes, int]:
        """Author -> lowest seq with a fork proof; events from there on are excluded."""
        return dict(self._forks)

    def fork_proofs(self, author: bytes | None = None) -> list[ForkProof]:
        q, args = "SELECT author, seq, wire_a, wire_b FROM forks", tuple[bytes, ...]()
        if author is not None:
            q, args = q + " WHERE author=?", (author,)
        return [ForkProof(*r) for r in self.db.execute(q + " ORDER BY author, seq", args)]

    def sync_heads(self) -> dict[bytes, tuple[int, bytes | None]]:
        """What sync compares: per author the last seq that counts (forks truncate)."""
        out: dict[bytes, tuple[int, bytes | None]] = {}
        for author, h in self._heads.items():
            fseq = self._forks.get(author)
            if fseq is None or h.seq < fseq:
                # Not forked, or the fork proof came before our chain reached it
                # (FORKS is fetched before RANGE): what we hold is what counts.
                out[author] = (h.seq, h.id)
            else:
                out[author] = (fseq - 1, self._id_at(author, fseq - 1))
        return out

    def recon_item(self, author: bytes) -> Item | None:
        """The author's reconciliation item: its HEADS entry (sync_heads, and the
        fork seq when the effective head is just before it)."""
        h = self._heads.get(author)
        if h is None:
            return None
        fseq = self._forks.get(author)
        if fseq is None or h.seq < fseq - 1:
            return Item(h.seq, h.id, None)
        if h.seq == fseq - 1:
            return Item(h.seq, h.id, fseq)
        return Item(fseq - 1, self._id_at(author, fseq - 1), fseq)

    def recon_index(self) -> ReconIndex:
        """Fingerprints for set reconciliation (node/recon.py), built once from the
        heads (one hash per author) and then updated on every head or fork change."""
        if self._recon is None:
            items = ((a, self.recon_item(a)) for a in self._heads)
            self._recon = ReconIndex(self.recon_item,
                                     ((a, it) for a, it in items if it is not None))
        return self._recon

    def _recon_items(self, authors: Iterable[bytes]) -> dict[bytes, Item | None] | None:
        """Items before a change (None while no index is built: nothing to update)."""
        if self._recon is None:
            return None
        return {a: self.recon_item(a) for a in authors}

    def _recon_update(self, old: dict[bytes, Item | None] | None) -> None:
        if self._recon is None or old is None:
            return
        for author, item in old.items():
            self._recon.update(author, item, self.recon_item(author))

    def id_at(self, author: bytes, seq: int) -> bytes | None:
        """The id of the stored event at (author, seq), if any."""
        return self._id_at(author, seq)

    def _id_at(self, author: bytes, seq: int) -> bytes | None:
        if seq < 1:
            return None
        row = self.db.execute(
            "SELECT id FROM events WHERE author=? AND seq=?", (author, seq)
        ).fetchone()
        return row[0] if row else None

    def digest(self) -> bytes:
        """Hash over every author's effective head and every fork; equal iff nodes agree."""
        if self._digest is None:
            h = hashlib.sha256(b"bidmesh/digest/v1")
            sh = self.sync_heads()
            for author in sorted(sh):
                seq, id_ = sh[author]
                forked = author in self._forks
                h.update(author + seq.to_bytes(8, "big") + (id_ or bytes(32)) + bytes([forked]))
            self._digest = h.digest()
        return self._digest

    def gaps(self) -> list[tuple[bytes, int, int]]:
        """(author, first missing seq, last missing seq) for authors with pending events."""
        return [(g.author, g.first, g.last) for g in self.pending_gaps()]

    def pending_gaps(self) -> list[Gap]:
        """Like `gaps()`, with the sources charged for the waiting events (first come
        first) and when the first of them arrived (for budgeted gap fetching). Only
        the authors whose pending events or head changed since the last call are
        summarized again: the gap loop asks every round, and under a gap storm the
        buffer holds tens of thousands of authors that do not change."""
        self.summarize_gaps(None)
        return list(self._gap_of.values())

    def summarize_gaps(self, limit: int | None) -> bool:
        """Bring up to `limit` (None: all) changed authors' gaps up to date for
        `pending_gaps`; True if changed ones remain (a caller on the event loop
        summarizes in slices and yields between them)."""
        p = self._pending
        n = len(p.touched) if limit is None else min(limit, len(p.touched))
        for _ in range(n):
            author, _ = p.touched.popitem(last=False)
            slot = p.by_author.get(author)
            if not slot:
                self._gap_of.pop(author, None)
                continue
            head = self._heads.get(author)
            have = head.seq if head else 0
            first_held = min(slot)
            if first_held <= have + 1:  # ready (drain_ready stores it): nothing missing
                self._gap_of.pop(author, None)
                continue
            self._gap_of[author] = Gap(author, have + 1, first_held - 1,
                                       tuple(p.author_sources[author]), p.since[author])
        return bool(p.touched)

    @property
    def gap_count(self) -> int:
        """Authors with pending events (what `len(gaps())` says, without summarizing)."""
        return len(self._pending.by_author)

    def expire_pending(self, limit: int | None = None) -> Counter[tuple[Source, bool]]:
        """Drop pending events older than the pending TTL (at most `limit`: a caller
        on the event loop sweeps in slices until fewer come back); count them per
        (source, blame) so the caller can fault sources whose events never chained."""
        out: Counter[tuple[Source, bool]] = Counter()
        for h in self._pending.expire(self._clock(), limit):
            out[(h.source, h.blame)] += 1
        self.counters["pending_expired"] += sum(out.values())
        return out

    def pending_status(self) -> dict[str, object]:
        p = self._pending
        return {"events": p.size, "bytes": p.bytes, "sources": len(p.by_source),
                "evicted": p.evicted, "expired": self.counters["pending_expired"],
                "limits": asdict(p.limits)}

    @property
    def pending_count(self) -> int:
        return self._pending.size

    def count(self) -> int:
        """Stored events. A read-only handle asks SQLite each time (another process
        writes); the writer counts once and then keeps the figure."""
        if self._count is None or self.readonly:
            n = int(self.db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
            if self.readonly:
                return n
            self._count = n
        return self._count

    def count_by_kind(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())
