"""The seeded fake networks: nodes with real ledgers whose gossip and sync requests
drop, duplicate and delay at random (seeded), for replication logic on trio's
virtual clock. Tests get them through the `fake_net` fixture (tests/conftest.py).

* `FakeNodes`: what both share: the ledgers, fixed identities, one seeded RNG, and
  sync requests through the real codecs with a random delay each way.
* `FakeNet`: gossip to every other node and random anti-entropy, no policy; `run_fake`
  publishes, runs anti-entropy and waits for convergence (`await fake_net(seed)`).
* `FakeMesh`: every node driven by its own `ReplicationPolicy` the way
  node/gossip.py's Replicator drives it, gossip along a mesh the test can cut
  (`fake_net.mesh(n, seed)`).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from node import codec, config, sync
from node.events import Event, Offer, sign_event
from node.keys import Identity
from node.ledger import Ledger, Status
from node.replication import MESH_CHECK_S, Clock, ReplicationPolicy
from node.sync_recon import ReconSession
from node.sync_session import SyncLimits, SyncSession, drive

NET = "test"
EPOCH = 1_800_000_000.0  # FakeMesh's wall clock at virtual time 0


def body(i: int) -> Offer:
    return Offer(services=(), currency="EUR", addrs=(), note=f"e{i}")


class FakeNodes:
    """`n` nodes with real ledgers (tmp/n<i>.db) and identities fixed by `seed`, one
    RNG seeded with it, and sync requests answered by the peer's real ledger through
    the real codecs, each way delayed by up to `delay` s."""

    def __init__(self, tmp: Path, n: int, seed: int, *, delay: float) -> None:
        self.rng = random.Random(seed)
        self.n = n
        self.ledgers = [Ledger(tmp / f"n{i}.db", network=NET) for i in range(n)]
        self.idents = [Identity.from_seed(bytes([seed, i]) * 16) for i in range(n)]
        self.delay = delay
        self.published = 0

    def send_to(self, peer: int, version: int = 1, req_drop: float | None = None,
               ) -> Callable[[sync.SyncRequest], Awaitable[sync.SyncResponse | None]]:
        """A session's `send` to `peer`. With `req_drop`, that share of requests is lost
        (the session sees a timeout after 5 s); None loses none and draws nothing from
        the RNG (FakeMesh's sequence)."""

        async def send(req: sync.SyncRequest) -> sync.SyncResponse | None:
            await self._sleep()
            if req_drop is not None and self.rng.random() < req_drop:
                await trio.sleep(5)  # the request times out
                return None
            data = sync.handle(self.ledgers[peer],
                               sync.decode_request(req.encode(), version).encode(), version)
            await self._sleep()
            return sync.decode_response(data, version)

        return send

    async def _sleep(self) -> None:
        await trio.sleep(self.rng.uniform(0, self.delay))


class FakeNet(FakeNodes):
    """Gossip to every other node and request/response that drop, duplicate and
    delay at random (seeded); anti-entropy with a random peer every 0.5-1.5 s."""

    def __init__(self, tmp: Path, n: int, seed: int, *, drop: float, dup: float,
                 delay: float, req_drop: float, versions: list[int] | None = None,
                 preload: int = 0) -> None:
        super().__init__(tmp, n, seed, delay=delay)
        self.drop, self.dup, self.req_drop = drop, dup, req_drop
        # Sync protocol per node (1: HEADS, 2: reconciliation); a pair uses the lower.
        self.versions = versions or [1] * n
        self.sessions = 0
        self.faults = 0
        # `preload` authors of 1-3 events each, every node holding a random part of
        # each chain: many authors differ at once (what reconciliation is for).
        for k in range(preload):
            ident = Identity.from_seed(bytes([seed, 200, k % 256, k // 256]) * 8)
            chain = [sign_event(ident.seed, 1, None, 1, body(0), NET)]
            for j in range(1, self.rng.randint(1, 3)):
                chain.append(sign_event(ident.seed, j + 1, chain[-1].id, 1, body(j), NET))
            held = [self.rng.randint(0, len(chain)) for _ in self.ledgers]
            self.published += max(held)
            for led, k in zip(self.ledgers, held, strict=True):
                led.append_many([e.wire for e in chain[:k]])

    async def _deliver(self, dst: int, src: int, wires: list[bytes]) -> None:
        await trio.sleep(self.rng.uniform(0, self.delay))
        led = self.ledgers[dst]
        for res in led.append_many(wires):
            assert not sync.counts_against_peer(res), res
        if led.gaps():
            await self.sync(dst, src, gaps=led.gaps())

    def gossip(self, nursery: trio.Nursery, src: int, wires: list[bytes]) -> None:
        for dst in range(len(self.ledgers)):
            if dst == src or self.rng.random() < self.drop:
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):
                nursery.start_soon(self._deliver, dst, src, wires)

    async def sync(self, me: int, peer: int, **kw: object) -> None:
        v = min(self.versions[me], self.versions[peer])
        send = self.send_to(peer, v, self.req_drop)
        lim = SyncLimits(heads_page=4, range_limit=16)
        if v == 2:
            s: SyncSession = ReconSession(self.ledgers[me], lim, salt=self.rng.randbytes(8),
                                          **kw)  # type: ignore[arg-type]
        else:
            s = SyncSession(self.ledgers[me], lim, **kw)  # type: ignore[arg-type]
        await drive(s, send)
        self.sessions += 1
        self.faults += sum(s.stats.faults.values())

    async def anti_entropy(self, me: int) -> None:
        while True:
            await trio.sleep(self.rng.uniform(0.5, 1.5))
            peer = self.rng.choice([i for i in range(len(self.ledgers)) if i != me])
            await self.sync(me, peer)

    async def publisher(self, nursery: trio.Nursery, me: int, count: int, t0: float,
                        fork_at: int | None = None) -> None:
        led, ident = self.ledgers[me], self.idents[me]
        batch: list[bytes] = []
        for i in range(count):
            await trio.sleep(self.rng.expovariate(count / 10))
            ts = int((trio.current_time() - t0) * 1000) + 1
            ev = led.publish(ident, body(i), ts)
            batch.append(ev.wire)
            self.published += 1
            if fork_at == i:
                # Equivocate: a conflicting event at the same seq goes to one other node.
                head = ev.prev
                alt = sign_event(ident.seed, ev.seq, head, ev.ts_ms, body(-i), NET)
                nursery.start_soon(self._deliver, (me + 1) % len(self.ledgers), me, [alt.wire])
            if len(batch) >= self.rng.randint(1, 8):
                self.gossip(nursery, me, batch)
                batch = []
        if batch:
            self.gossip(nursery, me, batch)

    def converged(self) -> bool:
        d = {led.digest() for led in self.ledgers}
        return len(d) == 1


class FakeMesh(FakeNodes):
    """Nodes with real ledgers, each driven by its own ReplicationPolicy the way
    node/gossip.py's Replicator drives it. Gossip goes from a publisher along the
    mesh (symmetric edges; a batch reaches every node connected to it by mesh
    edges), each delivery dropped, duplicated or delayed at random (seeded); sync
    requests use the real codecs. `cut(i)` takes node i out of the mesh as a
    gossipsub PRUNE does; `refuse_until[i]` makes its regrafts fail until then
    (the other side still backing off)."""

    def __init__(self, tmp: Path, n: int, seed: int, *, drop: float = 0.2, dup: float = 0.1,
                 delay: float = 0.3, degree: int = 2, **sections: dict[str, object]) -> None:
        super().__init__(tmp, n, seed, delay=delay)
        self.clock = Clock.virtual(trio.current_time, EPOCH)
        cfg = config.from_dict({"gossip": {"batch_ms": 200.0, "mesh_degree": degree},
                                "sync": {"interval_s": 2.0}, **sections})
        self.policies: list[ReplicationPolicy[int]] = [
            ReplicationPolicy(cfg, self.clock, random.Random(seed * 1000 + i)) for i in range(n)]
        self.drop, self.dup = drop, dup
        self.edges: set[frozenset[int]] = {frozenset((i, (i + k) % n))
                                           for i in range(n) for k in range(1, degree // 2 + 1)}
        self.refuse_until = [0.0] * n
        self.wake = [trio.Event() for _ in range(n)]
        self.gap = [trio.Event() for _ in range(n)]
        self.regrafted_at: dict[int, float] = {}
        self.gossip_at_regraft: dict[int, int] = {}  # events it had by gossip by then
        self.liars: set[int] = set()  # add a forged record to every batch they send
        self.blocked: list[set[int]] = [set() for _ in range(n)]  # cut off by each node

    # mesh
    def mesh(self, i: int) -> set[int]:
        return {j for e in self.edges if i in e for j in e if j != i}

    def reach(self, i: int) -> set[int]:
        seen, todo = {i}, [i]
        while todo:
            for j in self.mesh(todo.pop()):
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen - {i}

    def cut(self, i: int) -> None:
        self.edges = {e for e in self.edges if i not in e}

    # gossip
    async def _deliver(self, dst: int, src: int, wires: list[bytes]) -> None:
        await trio.sleep(self.rng.uniform(0, self.delay))
        if src in self.blocked[dst]:
            return
        p, led = self.policies[dst], self.ledgers[dst]
        p.stats.batches_received += 1
        accepted: list[Event] = []
        for res in led.append_many(wires):
            if sync.counts_against_peer(res):
                assert src in self.liars, res
                cut = p.fault(src, res.reason or "rejected", lambda q: q in self.blocked[dst])
                if cut is not None:  # what the shell does: block, and the mesh link goes
                    self.blocked[dst].add(cut.peer)
                    self.edges.discard(frozenset((dst, cut.peer)))
            accepted.extend(res.accepted)
            if res.status is Status.PENDING:
                self.gap[dst].set()
        if accepted:
            p.stats.events["accepted_gossip"] += len(accepted)
            p.gossip_received(max(ev.ts_ms for ev in accepted))

    def queue(self, i: int, wires: list[bytes]) -> None:
        self.policies[i].queue(wires)
        self.wake[i].set()

    async def sender(self, nursery: trio.Nursery, i: int) -> None:
        p = self.policies[i]
        while True:
            await self.wake[i].wait()
            self.wake[i] = trio.Event()
            await trio.sleep_until(p.round_at())
            p.start_round()
            while batch := p.next_batch():
                p.stats.batches_sent += 1
                if i in self.liars:
                    batch = [*batch, self.forged()]
                for dst in self.reach(i):
                    if self.rng.random() < self.drop:
                        continue
                    for _ in range(2 if self.rng.random() < self.dup else 1):
                        nursery.start_soon(self._deliver, dst, i, batch)
            if p.outbox_len:
                self.wake[i].set()  # paced: the rest goes in a later round

    def forged(self) -> bytes:
        """A fresh event whose signature does not verify."""
        ev = sign_event(bytes([77]) * 32, 1, None, int(self.clock.wall() * 1000),
                        body(self.rng.randrange(1 << 30)), NET)
        return codec.pack([codec.unpack(ev.wire, 1 << 20)[0], bytes(64)])

    # pull
    async def session(self, me: int, peer: int, **kw: object) -> SyncSession:
        s = SyncSession(self.ledgers[me], SyncLimits(heads_page=4, range_limit=16),
                        clock=self.clock.now, **kw)  # type: ignore[arg-type]
        await drive(s, self.send_to(peer))
        p = self.policies[me]
        p.stats.sync_rounds += 1
        p.stats.sync_events += len(s.accepted)
        if s.accepted and p.regossip(s.accepted):
            self.wake[me].set()
        return s

    async def periodic(self, i: int) -> None:
        p = self.policies[i]
        while True:
            await trio.sleep(p.periodic_delay())
            peer = p.pick([j for j in range(self.n) if j != i and j not in self.blocked[i]])
            assert peer is not None
            s = await self.session(i, peer, live_after_ms=p.live_after_ms())
            p.periodic_done(len(s.accepted))

    async def gaps(self, i: int) -> None:
        p = self.policies[i]
        while True:
            await self.gap[i].wait()
            await trio.sleep(p.gap_grace_s())
            self.gap[i] = trio.Event()
            if gaps := self.ledgers[i].gaps():
                p.stats.gap_syncs += 1
                await self.session(i, self.rng.choice([j for j in range(self.n) if j != i]),
                                   gaps=gaps)

    async def watchdog(self, i: int) -> None:
        p = self.policies[i]
        while True:
            await trio.sleep(MESH_CHECK_S)
            # Topic peers: those still connected (a cut-off closes the connection).
            peers = {j for j in range(self.n)
                     if j != i and j not in self.blocked[i] and i not in self.blocked[j]}
            action = p.mesh_check(self.mesh(i), peers)
            if (action is not None and action.want
                    and trio.current_time() >= self.refuse_until[i]):
                self.edges |= {frozenset((i, j)) for j in action.peers[:action.want]}
                if i not in self.regrafted_at:
                    self.regrafted_at[i] = trio.current_time()
                    self.gossip_at_regraft[i] = p.stats.events["accepted_gossip"]

    async def publisher(self, i: int, count: int, rate: float) -> None:
        for k in range(count):
            await trio.sleep(self.rng.expovariate(rate))
            ev = self.ledgers[i].publish(self.idents[i], body(k), int(self.clock.wall() * 1000))
            self.published += 1
            self.queue(i, [ev.wire])

    def converged(self) -> bool:
        honest = [led for i, led in enumerate(self.ledgers) if i not in self.liars]
        return len({led.digest() for led in honest}) == 1 and all(
            led.count() >= self.published - self.published_by_liars for led in honest)

    @property
    def published_by_liars(self) -> int:
        return sum(self.ledgers[i].count() for i in self.liars)

    async def run(self, per_node: int, rate: float, during: object = None) -> float:
        """Publish `per_node` events on every node at `rate`/s; `during(net)` runs
        alongside; returns virtual seconds from the last publish to convergence."""
        async with trio.open_nursery() as nursery:
            for i in range(self.n):
                for fn in (self.periodic, self.gaps, self.watchdog):
                    nursery.start_soon(fn, i)
                nursery.start_soon(self.sender, nursery, i)
            if during is not None:
                nursery.start_soon(during, self)  # type: ignore[arg-type]
            async with trio.open_nursery() as pubs:
                for i in range(self.n):
                    pubs.start_soon(self.publisher, i, per_node, rate)
            end = trio.current_time()
            with trio.fail_after(600):  # virtual seconds
                while not self.converged():
                    await trio.sleep(0.1)
            took = trio.current_time() - end
            nursery.cancel_scope.cancel()
        return took


async def run_fake(tmp: Path, seed: int, *, n: int = 5, per_node: int = 40, drop: float = 0.3,
                   dup: float = 0.1, delay: float = 0.3, req_drop: float = 0.1,
                   fork: bool = False, versions: list[int] | None = None,
                   preload: int = 0) -> FakeNet:
    net = FakeNet(tmp, n, seed, drop=drop, dup=dup, delay=delay, req_drop=req_drop,
                  versions=versions, preload=preload)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(net.anti_entropy, i)
        async with trio.open_nursery() as pubs:
            for i in range(n):
                pubs.start_soon(net.publisher, nursery, i, per_node, t0,
                                per_node // 2 if fork and i == 0 else None)
        end = trio.current_time()
        with trio.fail_after(600):  # virtual seconds
            while not net.converged():
                await trio.sleep(0.1)
        net.converge_s = trio.current_time() - end  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()
    return net
