"""The seeded fake network: nodes with real ledgers whose gossip and sync requests
drop, duplicate and delay at random (seeded), for replication logic on trio's
virtual clock. `run_fake` publishes, runs anti-entropy and waits for convergence;
tests get it as the `fake_net` fixture (tests/conftest.py)."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from node import sync
from node.events import Offer, sign_event
from node.keys import Identity
from node.ledger import Ledger
from node.sync_recon import ReconSession
from node.sync_session import SyncLimits, SyncSession, drive

NET = "test"


def body(i: int) -> Offer:
    return Offer(services=(), currency="EUR", addrs=(), note=f"e{i}")


class FakeNet:
    """Nodes with real ledgers; gossip and request/response that drop, duplicate and
    delay at random (seeded). Sync sessions use the real codecs end to end."""

    def __init__(self, tmp: Path, n: int, seed: int, *, drop: float, dup: float,
                 delay: float, req_drop: float, versions: list[int] | None = None,
                 preload: int = 0) -> None:
        self.rng = random.Random(seed)
        self.ledgers = [Ledger(tmp / f"n{i}.db", network=NET) for i in range(n)]
        self.idents = [Identity.from_seed(bytes([seed, i]) * 16) for i in range(n)]
        self.drop, self.dup, self.delay, self.req_drop = drop, dup, delay, req_drop
        # Sync protocol per node (1: HEADS, 2: reconciliation); a pair uses the lower.
        self.versions = versions or [1] * n
        self.published = 0
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

        async def send(req: sync.SyncRequest) -> sync.SyncResponse | None:
            await trio.sleep(self.rng.uniform(0, self.delay))
            if self.rng.random() < self.req_drop:
                await trio.sleep(5)  # the request times out
                return None
            data = sync.handle(self.ledgers[peer], sync.decode_request(req.encode(), v).encode(),
                               v)
            await trio.sleep(self.rng.uniform(0, self.delay))
            return sync.decode_response(data, v)

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
