"""`bidmesh ledger ...`: inspect, verify, export and import a node's ledger, and the
operator tools that read a running node's status file (`peers`, `sync`, `forks`,
`watch`). Market views (`auctions`, `leases`, ...) are in node/cli/auction.py.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import InvalidEvent, Reason, UsageError
from ..events import KINDS, decode_wire, event_to_json
from ..ledger import Ledger, Status, read_stream
from ..output import Output, parse_hex
from .common import (
    _LEDGER_COMMANDS,
    _LEDGER_PLUGINS,
    DEFAULT_NETWORK,
    EXIT_OK,
    EXIT_PROBLEMS,
    LedgerCommand,
    add_json_flag,
    fmt_time,
    ledger_command,
    network_for,
    node_running,
    parse_time_ms,
    resolve_author,
    resolve_id,
    short,
)


def register_ledger(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ledger", help="inspect, verify, export and import a node's ledger")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"node data directory (default: {paths.default_data_dir()})")
    p.add_argument("--network", help="network id (default: the ledger's own, else "
                                     f"{DEFAULT_NETWORK!r})")
    lsub = p.add_subparsers(dest="ledger_cmd", metavar="COMMAND", required=True)
    for mod in _LEDGER_PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    for cmd in _LEDGER_COMMANDS.values():
        cp = lsub.add_parser(cmd.name, help=cmd.help)
        if cmd.add_args:
            cmd.add_args(cp)
        add_json_flag(cp)
        cp.set_defaults(func=_run_ledger_command, ledger_command=cmd)


def _run_ledger_command(args: argparse.Namespace, out: Output) -> int:
    cmd: LedgerCommand = args.ledger_command
    data_dir = args.data_dir or paths.default_data_dir()
    network = network_for(data_dir, args.network)
    path = paths.ledger_path(data_dir)
    if not cmd.write:
        if not path.exists():
            raise UsageError(f"no ledger at {path}; check --data-dir")
        with Ledger(path, network=network, readonly=True) as led:
            return cmd.handler(args, led, out)
    if node_running(data_dir):
        raise UsageError(f"a node is running with data dir {data_dir}; stop it before "
                         f"`ledger {cmd.name}` (it keeps chain heads in memory)")
    from ..lifecycle import DataDirLock

    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Held while writing, so a node cannot start on the ledger mid-import.
    with DataDirLock(data_dir, what=f"bidmesh ledger {cmd.name}"), \
            Ledger(path, network=network) as led:
        return cmd.handler(args, led, out)


@ledger_command("summary", "counts by kind, authors, forks and the state digest")
def cmd_summary(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    kinds = led.count_by_kind()
    forks = led.forked()
    heads = led.heads()
    row = led.db.execute("SELECT MIN(ts_ms), MAX(ts_ms) FROM events").fetchone()
    data: dict[str, Any] = {
        "network": led.network,
        "events": sum(kinds.values()),
        "authors": len(heads),
        "kinds": {k: kinds.get(k, 0) for k in sorted(set(KINDS) | set(kinds))},
        "forked_authors": len(forks),
        "fork_proofs": len(led.fork_proofs()),
        "pending": None,  # lives in the running node's memory only
        "first_ts_ms": row[0],
        "last_ts_ms": row[1],
        "digest": led.digest().hex(),
    }
    if out.json_mode:
        out.json(data)
        return EXIT_OK
    items: list[tuple[str, Any]] = [
        ("network", led.network), ("events", data["events"]), ("authors", data["authors"]),
        ("forked authors", data["forked_authors"]), ("fork proofs", data["fork_proofs"]),
        ("pending", "none (held in the running node's memory only)"),
        ("first event", fmt_time(row[0]) if row[0] is not None else None),
        ("last event", fmt_time(row[1]) if row[1] is not None else None),
        ("digest", data["digest"]),
    ]
    from ..output import pairs, table

    kind_rows = [{"kind": k, "events": n} for k, n in data["kinds"].items()]
    out.emit(data, pairs(items) + "\n\n" + table(kind_rows, [("kind", "KIND"),
                                                             ("events", "EVENTS")]))
    return EXIT_OK


def _events_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=sorted(KINDS), help="only this kind")
    p.add_argument("--author", help="only this author (hex key or unique prefix)")
    p.add_argument("--ref", help="only events referring to this event id (hex)")
    p.add_argument("--since", help="only events with ts at or after this time "
                                   "(ms since the epoch, or ISO 8601)")
    p.add_argument("--limit", type=int, default=100, help="at most N events (default 100)")
    p.add_argument("--after", type=int, default=0, help="cursor: only events stored after N")


@ledger_command("events", "list events (filters: --kind, --author, --since)", args=_events_args)
def cmd_events(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    found = led.events(
        kind=args.kind,
        author=resolve_author(led, args.author) if args.author else None,
        ref=parse_hex(args.ref, "--ref", exact=32) if args.ref else None,
        since_ms=parse_time_ms(args.since) if args.since else None,
        after=args.after,
        limit=args.limit,
    )
    if out.json_mode:
        out.json([{"cursor": n, **event_to_json(ev)} for n, ev in found])
        return EXIT_OK
    rows = [{"n": n, "time": fmt_time(ev.ts_ms), "kind": ev.kind, "author": short(ev.author),
             "seq": ev.seq, "id": short(ev.id), "ref": short(ev.ref)} for n, ev in found]
    out.rows(rows, [("n", "#"), ("time", "TIME (UTC)"), ("kind", "KIND"),
                    ("author", "AUTHOR"), ("seq", "SEQ"), ("id", "ID"), ("ref", "REF")],
             empty="(no events)")
    return EXIT_OK


@ledger_command("show", "one event in full", args=lambda p: p.add_argument(
    "id", help="event id (hex, or a unique prefix of 8+ digits)"))
def cmd_show(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    id_ = resolve_id(led, args.id)
    wire = led.get_wire(id_)
    if wire is None:
        raise UsageError(f"no event {id_.hex()} in this ledger")
    ev = decode_wire(wire, led.network, verify=False)
    fork_from = led.forked().get(ev.author)
    counts = fork_from is None or ev.seq < fork_from
    data = {**event_to_json(ev), "sig": ev.sig.hex(), "wire": wire.hex(), "counts": counts}
    if out.json_mode:
        out.json(data)
        return EXIT_OK
    from ..output import pairs

    items: list[tuple[str, Any]] = [
        ("id", ev.id), ("kind", ev.kind), ("author", ev.author), ("seq", ev.seq),
        ("prev", ev.prev), ("time", f"{fmt_time(ev.ts_ms)} ({ev.ts_ms})"), ("sig", ev.sig),
        ("counts", "yes" if counts else f"no: author forked at seq {fork_from}"),
    ]
    items += [(f"body.{k}", v) for k, v in ev.body.to_map().items()]
    out.emit(data, pairs(items))
    return EXIT_OK


@ledger_command("verify", "re-check every signature and chain link; exit 1 on problems")
def cmd_verify(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    problems: list[dict[str, Any]] = [{"id": id_.hex(), "problem": why}
                                      for id_, why in led.verify_all()]
    for proof in led.fork_proofs():
        for w in (proof.wire_a, proof.wire_b):
            try:
                decode_wire(w, led.network)
            except InvalidEvent as e:
                problems.append({"id": None, "problem": f"fork proof record: {e.reason}: {e}"})
    data = {"events": led.count(), "fork_proofs": len(led.fork_proofs()),
            "problems": problems, "ok": not problems}
    if out.json_mode:
        out.json(data)
    elif problems:
        out.rows(problems, [("id", "EVENT"), ("problem", "PROBLEM")])
        out.say(f"{len(problems)} problem(s) in {data['events']} events")
    else:
        out.say(f"ok: {data['events']} events, {data['fork_proofs']} fork proofs verified")
    return EXIT_OK if not problems else EXIT_PROBLEMS


@ledger_command("digest", "the state digest (equal on nodes that agree)")
def cmd_digest(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    out.emit({"digest": led.digest().hex(), "events": led.count(), "authors": len(led.heads())},
             led.digest().hex())
    return EXIT_OK


@ledger_command("export", "write every record to FILE (concatenated wire records)",
                args=lambda p: p.add_argument("file", type=Path))
def cmd_export(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    path: Path = args.file
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        for w in led.iter_wires():
            f.write(w)
            n += 1
        # Fork proofs after the events, so an importer re-detects every fork.
        proofs = led.fork_proofs()
        for p in proofs:
            f.write(p.wire_a)
            f.write(p.wire_b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    out.emit({"file": str(path), "records": n + 2 * len(proofs), "events": n,
              "fork_proofs": len(proofs)},
             f"exported {n} events and {len(proofs)} fork proofs to {path}")
    return EXIT_OK


IMPORT_BATCH = 1000


@ledger_command("import", "append the records of FILE; report each bad one",
                args=lambda p: p.add_argument("file", type=Path), write=True)
def cmd_import(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    data = Path(args.file).read_bytes()
    counts = {s.value: 0 for s in Status}
    problems: list[dict[str, Any]] = []
    pending: dict[bytes, int] = {}  # event id -> record number
    batch: list[tuple[int, bytes]] = []

    def flush() -> None:
        results = led.append_many([w for _, w in batch])
        for (i, _), res in zip(batch, results, strict=True):
            counts[res.status.value] += 1
            if res.status is Status.REJECTED:
                problems.append({"record": i, "status": "rejected", "reason": res.reason,
                                 "detail": res.detail})
            elif res.status is Status.PENDING and res.event_id:
                pending[res.event_id] = i
            elif res.status is Status.FORK:
                problems.append({"record": i, "status": "fork", "reason": Reason.FORK,
                                 "detail": res.detail})
        batch.clear()

    n = 0
    for item in read_stream(data):
        n += 1
        if isinstance(item, InvalidEvent):
            counts["rejected"] += 1
            problems.append({"record": n, "status": "rejected", "reason": item.reason,
                             "detail": str(item)})
            continue
        batch.append((n, item))
        if len(batch) >= IMPORT_BATCH:
            flush()
    if batch:
        flush()
    for id_, i in pending.items():
        if not led.has(id_):
            problems.append({"record": i, "status": "pending", "reason": Reason.MISSING_PREV,
                             "detail": "its predecessor is not in the ledger or the file"})
    problems.sort(key=lambda p: p["record"])
    still_pending = sum(p["status"] == "pending" for p in problems)
    summary = {"file": str(args.file), "records": n, **counts, "still_pending": still_pending,
               "problems": problems, "digest": led.digest().hex()}
    failed = counts["rejected"] + still_pending
    if out.json_mode:
        out.json(summary)
    else:
        for p in problems:
            sys.stderr.write(f"record {p['record']}: {p['status']}: {p['reason']}: "
                             f"{p['detail']}\n")
        out.say(f"{n} records: {counts['accepted']} accepted, {counts['duplicate']} duplicate, "
                f"{counts['rejected']} rejected, {still_pending} pending (missing predecessor), "
                f"{counts['fork']} fork")
    if failed and counts["rejected"] == n and all(p["reason"] == "bad_signature"
                                                   for p in problems):
        sys.stderr.write(f"hint: every signature failed; is the file from another network "
                         f"than {led.network!r}? pass --network\n")
    if led.count() == 0 and not led.fork_proofs():
        # Leave no empty ledger bound to a network nothing was imported into, so a
        # retry with the right --network works.
        led.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{led.path}{suffix}").unlink(missing_ok=True)
    return EXIT_PROBLEMS if failed else EXIT_OK


# ---------------------------------------------------------------- operator tools
# `ledger peers | sync | forks | watch` (peers/sync read the daemon's status.json).


def _status(args: argparse.Namespace) -> dict[str, Any]:
    from ..status_file import read_status

    return read_status(args.data_dir or paths.default_data_dir())


@ledger_command("peers", "the running node's peers (from its status file)")
def cmd_peers(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    st = _status(args)
    blocked = st.get("blocked", {})
    rows = [{"peer": p, "state": "connected"} for p in st.get("peers", [])]
    rows += [{"peer": p, "state": f"blocked until {fmt_time(int(t * 1000))}"}
             for p, t in blocked.items()]
    offer = st.get("services", {}).get("provider", {}).get("offer_addrs")
    data = {"state": st.get("state"), "age_s": st.get("age_s"), "peer_id": st.get("peer_id"),
            "listen_addrs": st.get("listen_addrs", []),
            "advertised_addrs": st.get("advertised_addrs", []), "offer_addrs": offer,
            "peers": st.get("peers", []), "blocked": blocked}
    if out.json_mode:
        out.json(data)
        return EXIT_OK
    out.say(f"node {st.get('peer_id')} ({st.get('state')}, status {st.get('age_s')} s old)")
    for label, key in (("listening on", "listen_addrs"), ("advertised", "advertised_addrs"),
                       ("in its offer", "offer_addrs")):
        for a in data[key] or []:
            out.say(f"  {label:<13} {a}")
    out.rows(rows, [("peer", "PEER"), ("state", "STATE")], empty="(no peers)")
    return EXIT_OK


def _sync_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--now", action="store_true",
                   help="ask the running node to sync with every peer now (control socket)")


@ledger_command("sync", "replication state of the running node (--now: sync at once)",
                args=_sync_args)
def cmd_sync(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    data: dict[str, Any] = {}
    if args.now:
        from ..control import control_call

        data["sync_now"] = control_call(args.data_dir or paths.default_data_dir(),
                                        {"op": "sync"}, timeout=120)
    st = _status(args)
    sync = st.get("sync", {})
    data.update({"state": st.get("state"), "digest": st.get("digest"), "events": st.get("events"),
                 "pending": st.get("pending"), "gaps": st.get("gaps"), "outbox": st.get("outbox"),
                 "peers": len(st.get("peers", [])), **{f"sync_{k}": v for k, v in sync.items()}})
    if "sync_now" in data:
        data["digest"] = data["sync_now"].get("digest", data["digest"])
    from ..output import pairs

    last = sync.get("last_at")
    items = [(k.replace("_", " "), v) for k, v in data.items() if k not in ("sync_last_at",
                                                                            "sync_now")]
    items.append(("last sync", fmt_time(int(last * 1000)) if last else None))
    out.emit(data, pairs(items))
    return EXIT_OK


@ledger_command("forks", "fork proofs: authors who signed two events at one seq")
def cmd_forks(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    rows: list[dict[str, Any]] = []
    for p in led.fork_proofs():
        a = decode_wire(p.wire_a, led.network, verify=False)
        b = decode_wire(p.wire_b, led.network, verify=False)
        rows.append({"author": p.author.hex(), "seq": p.seq, "event_a": a.id.hex(),
                     "event_b": b.id.hex(), "kind_a": a.kind, "kind_b": b.kind})
    if out.json_mode:
        out.json(rows)
        return EXIT_OK
    out.rows([{**r, "author": r["author"][:16], "event_a": r["event_a"][:16],
               "event_b": r["event_b"][:16]} for r in rows],
             [("author", "AUTHOR"), ("seq", "FROM SEQ"), ("event_a", "EVENT A"),
              ("kind_a", "KIND"), ("event_b", "EVENT B"), ("kind_b", "KIND")],
             empty="(no forks)")
    return EXIT_OK


def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=sorted(KINDS), help="only this kind")
    p.add_argument("--interval", type=float, default=1.0, help="poll interval, seconds")
    p.add_argument("--seconds", type=float, help="stop after this long (default: until ^C)")
    p.add_argument("--count", type=int, help="stop after N events")
    p.add_argument("--from-start", action="store_true", help="show existing events first")


@ledger_command("watch", "follow new events live (JSON lines with --json)", args=_watch_args)
def cmd_watch(args: argparse.Namespace, led: Ledger, out: Output) -> int:
    import json
    import time

    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    after = 0
    if not args.from_start:
        row = led.db.execute("SELECT MAX(n) FROM events").fetchone()
        after = int(row[0] or 0)
    deadline = time.monotonic() + args.seconds if args.seconds is not None else None
    seen = 0
    if not out.json_mode:
        out.say(f"watching {led.path} (network {led.network}, {led.count()} events); ^C stops")
    while deadline is None or time.monotonic() < deadline:
        for n, ev in led.events(kind=args.kind, after=after, limit=1000):
            after = n
            seen += 1
            if out.json_mode:
                out.stream.write(json.dumps({"cursor": n, **event_to_json(ev)}) + "\n")
            else:
                out.stream.write(f"{fmt_time(ev.ts_ms)}  {ev.kind:<11} {short(ev.author)} "
                                 f"#{ev.seq:<5} {short(ev.id)}  ref {short(ev.ref)}\n")
            if args.count is not None and seen >= args.count:
                out.stream.flush()
                return EXIT_OK
        out.stream.flush()
        time.sleep(args.interval if deadline is None
                   else max(0.0, min(args.interval, deadline - time.monotonic())))
    return EXIT_OK
