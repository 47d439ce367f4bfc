"""The `bidmesh` command.

Structure, so that command groups can be added without touching each other:

* A *group* is a function `register(subparsers)` that adds one top-level command
  (with its own sub-subcommands if it wants). Add yours to `GROUPS` (or call
  `add_group` from your module before `main` runs). Each command sets
  `func=handler` via `set_defaults`; a handler takes the parsed `Namespace` and an
  `Output` and returns the exit status.
* `bidmesh ledger ...` subcommands are registered with `@ledger_command(...)`: the
  handler gets the opened `Ledger` (read-only unless `write=True`, so it works next
  to a running daemon) and an `Output`. Other modules add e.g. `ledger auctions` the
  same way; `_LEDGER_PLUGINS` lists the modules imported for that.
* Every data command accepts `--json`. Errors are `BidmeshError`s, mapped to one line
  on stderr and a non-zero exit status in `main()`; nothing else prints tracebacks
  for expected failures.

Exit status: 0 success; 1 the command ran and found problems (rejected records,
failed verification) or an operation failed; 2 usage errors (bad arguments, missing
files, wrong network).
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import importlib
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .errors import BidmeshError, InvalidEvent, UsageError
from .events import KINDS, decode_wire, event_to_json
from .keys import Identity, load_key, save_key
from .ledger import Ledger, Status, read_stream
from .output import Output

DEFAULT_NETWORK = "main"
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace, Output], int]
LedgerHandler = Callable[[argparse.Namespace, Ledger, Output], int]
Group = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class LedgerCommand:
    name: str
    help: str
    handler: LedgerHandler
    add_args: Callable[[argparse.ArgumentParser], object] | None
    write: bool


_LEDGER_COMMANDS: dict[str, LedgerCommand] = {}
# Modules that register more `ledger` subcommands; imported when the parser is built,
# skipped if they do not exist yet.
_LEDGER_PLUGINS: list[str] = ["node.auction.cli"]


def ledger_command(
    name: str,
    help: str,
    *,
    args: Callable[[argparse.ArgumentParser], object] | None = None,
    write: bool = False,
) -> Callable[[LedgerHandler], LedgerHandler]:
    """Register `bidmesh ledger NAME`. The handler gets (args, ledger, out)."""

    def deco(fn: LedgerHandler) -> LedgerHandler:
        _LEDGER_COMMANDS[name] = LedgerCommand(name, help, fn, args, write)
        return fn

    return deco


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON to stdout")


# ---------------------------------------------------------------- helpers


def parse_time_ms(text: str) -> int:
    """Milliseconds since the epoch, or an ISO 8601 time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {text!r}: give milliseconds since the epoch or an ISO time "
            "such as 2025-01-31T12:00:00Z"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def fmt_time(ms: int) -> str:
    try:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[
            :-4] + "Z"
    except (OverflowError, ValueError, OSError):
        return str(ms)


def parse_hex(text: str, what: str, *, exact: int | None = None) -> bytes:
    try:
        b = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not hex") from None
    if exact is not None and len(b) != exact:
        raise UsageError(f"{what} must be {exact} bytes ({exact * 2} hex digits)")
    return b


def resolve_id(led: Ledger, text: str) -> bytes:
    """A full event id, or a unique prefix of at least 4 bytes (8 hex digits)."""
    if len(text) % 2:
        text = text[:-1]  # an odd prefix: match on the whole bytes before it
    raw = parse_hex(text, "event id")
    if len(raw) == 32:
        return raw
    if len(raw) < 4:
        raise UsageError("give at least 8 hex digits of the event id")
    found = led.ids_with_prefix(raw)
    if not found:
        raise UsageError(f"no event with id starting {text}")
    if len(found) > 1:
        raise UsageError(f"id prefix {text} is ambiguous; give more digits")
    return found[0]


def resolve_author(led: Ledger, text: str) -> bytes:
    """A full author key or a unique prefix of the authors in this ledger."""
    raw = parse_hex(text[: len(text) // 2 * 2], "author")
    if len(raw) == 32:
        return raw
    found = [a for a in led.heads() if a.hex().startswith(text.lower())]
    if len(found) != 1:
        raise UsageError(f"author prefix {text!r} matches {len(found)} authors; give more digits")
    return found[0]


def network_for(data_dir: Path, given: str | None) -> str:
    """--network if given, else the network the ledger was created for, else the default."""
    if given:
        return given
    return Ledger.stored_network(paths.ledger_path(data_dir)) or DEFAULT_NETWORK


def node_running(data_dir: Path) -> bool:
    """True when a daemon is listening on this data dir's control socket."""
    sock_path = data_dir / "control.sock"
    if not sock_path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(sock_path))
    except OSError:
        return False
    finally:
        s.close()
    return True


def short(b: bytes | None, n: int = 8) -> str:
    return b.hex()[: 2 * n] if b else "-"


# ---------------------------------------------------------------- keygen


def register_keygen(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="create a node/client key file (Ed25519 seed, mode 0600)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="key file to write")
    where.add_argument("--data-dir", type=Path,
                       help=f"write DIR/{paths.KEY_FILE} (default: {paths.default_data_dir()})")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    add_json_flag(p)
    p.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace, out: Output) -> int:
    path = args.out or paths.key_path(args.data_dir or paths.default_data_dir())
    if path.exists() and not args.force:
        raise UsageError(f"{path} already exists; pass --force to replace it (the old "
                         "identity and its reputation are lost)")
    ident = Identity.generate()
    save_key(path, ident, overwrite=args.force)
    ident = load_key(path)  # prove it reads back
    data: dict[str, Any] = {"key_file": str(path), "public_key": ident.public.hex()}
    peer = peer_id(ident.public)
    if peer is not None:
        data["peer_id"] = peer
    out.emit(data)
    return EXIT_OK


def peer_id(public: bytes) -> str | None:
    """The libp2p peer id of a key, when the p2p layer is installed and importable."""
    try:
        p2p = importlib.import_module("node.p2p")
    except ImportError:
        return None
    fn = getattr(p2p, "peer_id_from_pubkey", None)
    return str(fn(public).to_base58()) if fn else None


# ---------------------------------------------------------------- ledger group


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
    from .lifecycle import DataDirLock

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
    from .output import pairs, table

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
    from .output import pairs

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
                problems.append({"record": i, "status": "fork", "reason": "fork",
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
            problems.append({"record": i, "status": "pending", "reason": "missing_prev",
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
    from .status_file import read_status

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
        from .control import control_call

        data["sync_now"] = control_call(args.data_dir or paths.default_data_dir(),
                                        {"op": "sync"}, timeout=120)
    st = _status(args)
    sync = st.get("sync", {})
    data.update({"state": st.get("state"), "digest": st.get("digest"), "events": st.get("events"),
                 "pending": st.get("pending"), "gaps": st.get("gaps"), "outbox": st.get("outbox"),
                 "peers": len(st.get("peers", [])), **{f"sync_{k}": v for k, v in sync.items()}})
    if "sync_now" in data:
        data["digest"] = data["sync_now"].get("digest", data["digest"])
    from .output import pairs

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


def register_client(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bidmesh client ...`: the light client (node/client.py, imported only when run)."""
    _client_parsers(sub)


def _client_handler(name: str) -> Handler:
    def run(args: argparse.Namespace, out: Output) -> int:
        from .client_cli import run_command

        _client_defaults(args)
        return run_command(name, args, out)
    return run


def _client_defaults(args: argparse.Namespace) -> None:
    """--dir defaults to DATA_DIR/client; without --node the client talks to the node
    running in DATA_DIR (the one default data dir every command shares), on its network
    unless --network says otherwise."""
    data_dir = paths.default_data_dir()
    if args.dir is None:
        args.dir = paths.client_dir(data_dir)
    if not args.node:
        from .status_file import read_status

        hint = "pass --node /ip4/ADDR/tcp/PORT/p2p/ID"
        if not (data_dir / "status.json").exists():
            raise UsageError(f"no --node given and no node is running in {data_dir} "
                             f"(${paths.DATA_DIR_ENV}); {hint}")
        st = read_status(data_dir)  # unreadable (permissions): its own one line
        args.node = local_dial_addrs(st.get("listen_addrs", []))
        if st.get("state") != "running" or not args.node:
            raise UsageError(f"no --node given and the node in {data_dir} is "
                             f"{st.get('state')}; {hint}")
        args.network = args.network or st.get("network")
    args.network = args.network or DEFAULT_NETWORK


def local_dial_addrs(listen_addrs: Sequence[str]) -> list[str]:
    """How a process on the same host dials a node listening on `listen_addrs`: an
    unspecified address (0.0.0.0, ::) through loopback, others as they are."""
    out = []
    for a in listen_addrs:
        if a.startswith("/ip4/0.0.0.0/"):
            a = "/ip4/127.0.0.1/" + a[len("/ip4/0.0.0.0/"):]
        elif a.startswith("/ip6/::/"):
            a = "/ip6/::1/" + a[len("/ip6/::/"):]
        out.append(a)
    return out


def _yes_no(text: str) -> bool:
    t = text.lower()
    if t in ("yes", "y", "true", "1"):
        return True
    if t in ("no", "n", "false", "0"):
        return False
    raise argparse.ArgumentTypeError("give yes or no")


def _duration_ms(text: str) -> int:
    """`90`, `90s`, `15m`, `2h`, `1d` (no unit: seconds)."""
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    for u in sorted(units, key=len, reverse=True):
        if text.endswith(u) and text[: -len(u)].isdigit():
            return int(text[: -len(u)]) * units[u]
    if text.isdigit():
        return int(text) * 1000
    raise argparse.ArgumentTypeError(f"{text!r}: give a duration such as 90s, 15m, 2h")


def _client_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("client", help="light client for recipients: auctions, leases, ratings",
                       description="Talk to one or more nodes as a recipient; every answer is "
                                   "verified and re-derived locally (docs/client.md).")
    p.add_argument("--dir", type=Path,
                   help="client directory (key and state; default: "
                        f"${paths.DATA_DIR_ENV}/{paths.CLIENT_DIR}, else "
                        f"{paths.client_dir()})")
    p.add_argument("--node", action="append", metavar="MADDR",
                   help="node multiaddr with /p2p/<peer id>; repeat to cross-check nodes "
                        "(default: the node running in the default data dir)")
    p.add_argument("--network",
                   help="network id (default: the local node's when --node is not given, "
                        "else main)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    cs = p.add_subparsers(dest="client_cmd", metavar="COMMAND", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = cs.add_parser(name, help=help)
        add_json_flag(c)
        c.set_defaults(func=_client_handler(name))
        return c

    c = cmd("request", "post a request (open an auction)")
    c.add_argument("service", help="service, e.g. bandwidth or zstd")
    c.add_argument("--duration", type=_duration_ms, required=True, help="block length, e.g. 1h")
    c.add_argument("--reserve", type=int, required=True, help="most you pay (minor units)")
    c.add_argument("--currency", default="EUR")
    c.add_argument("--close-in", type=_duration_ms, default=60_000,
                   help="bids close after this long (default 60s)")
    c.add_argument("--start", type=int, help="lease start, ms since the epoch (default: when "
                                             "bids are final)")
    c.add_argument("--chain", action="append", default=[], help="processing service, in order")
    c.add_argument("--max-rate", type=int, help="max rate, bits/s")
    c.add_argument("--min-rate", type=int, help="min rate, bits/s")
    c.add_argument("--device", action="append", default=[], help="member device key (hex)")
    c.add_argument("--phone", action="append", default=[], help="member phone (+49...)")
    c.add_argument("--user", action="append", default=[], help="member user id")
    c.add_argument("--max-devices", type=int, help="at most N delegated client devices")
    c.add_argument("--rule", choices=["lowest", "best_value", "vickrey"], default="lowest")
    c.add_argument("--sealed", action="store_true", help="sealed bids (commit, then reveal)")
    c.add_argument("--reveal-window", type=_duration_ms, default=30_000,
                   help="sealed: reveal window after close (default 30s)")
    c.add_argument("--group", action="store_true", help="group request (members pledge)")
    c.add_argument("--note", default="")

    c = cmd("bids", "bids of an auction with providers' reputation")
    c.add_argument("request", help="request id (hex)")
    c.add_argument("--watch", action="store_true", help="live view until the auction ends")
    c.add_argument("--interval", type=float, default=1.0, help="--watch poll interval, s")

    c = cmd("award", "award your auction to the rule's winner")
    c.add_argument("request", help="request id (hex)")

    c = cmd("pay", "pay for a lease")
    c.add_argument("lease", help="lease id (= award id, hex)")
    c.add_argument("--amount", type=int, help="default: your share / what is owed")
    c.add_argument("--method", default="ledger")
    c.add_argument("--reference", default="")
    c.add_argument("--on-behalf", action="append", default=[], help="member key (hex)")

    c = cmd("pledge", "join a group request")
    c.add_argument("request", help="request id (hex)")
    c.add_argument("--amount", type=int, default=0, help="most you pay in total")
    c.add_argument("--unwilling", action="store_true", help="join without paying")
    c.add_argument("--sponsor", action="append", default=[], help="member key you pay for")

    c = cmd("stream", "stream a file or stdin through a lease")
    c.add_argument("lease", help="lease id (hex)")
    c.add_argument("--in", dest="infile", default="-", help="input file (default stdin)")
    c.add_argument("--out", dest="outfile", default="-", help="output file (default stdout)")
    c.add_argument("--format", choices=["lp", "ts"], default="lp",
                   help="lp: cut the input into --packet byte packets (default); ts: the "
                        "input is MPEG-TS, sent as its 188-byte packets")
    c.add_argument("--packet", type=int, default=64 * 1024,
                   help="--format lp packet size in bytes")
    c.add_argument("--chain", action="append", default=[], metavar="SERVICE",
                   help="process with these services in order (repeat): a contiguous "
                        "part of the lease's chain, or identity (default: the lease's chain)")
    c.add_argument("--out-format", choices=["results", "frames", "packets"],
                   default="results", help="results: each segment's result in order "
                   "(default); frames: u32 length, u64 seq, result per segment; packets: "
                   "the packets of each result (chains that return packets)")
    c.add_argument("--progress", choices=["auto", "yes", "no"], default="auto")

    c = cmd("tunnel", "a local SOCKS5 proxy through a bandwidth lease")
    c.add_argument("lease", help="lease id (hex or unique prefix)")
    c.add_argument("--socks", default="127.0.0.1:1080", metavar="HOST:PORT",
                   help="where the proxy listens (default 127.0.0.1:1080; port 0: any)")
    c.add_argument("--allow-lan", action="store_true",
                   help="allow a non-loopback --socks address (no SOCKS authentication: "
                        "anyone who reaches it uses your lease)")
    c.add_argument("--max-connections", type=int, default=64,
                   help="SOCKS connections at once (default 64)")
    c.add_argument("--progress", choices=["auto", "yes", "no"], default="auto")

    c = cmd("rate", "rate the other party of a lease")
    c.add_argument("lease", help="lease id (hex)")
    c.add_argument("--satisfied", type=_yes_no, required=True, help="yes or no")
    c.add_argument("--score", type=int, required=True, choices=range(1, 6))
    c.add_argument("--text", default="")

    cmd("leases", "leases you are a party to")
    c = cmd("reputation", "a key's reputation (default: yours)")
    c.add_argument("key", nargs="?", help="public key (hex)")
    cmd("whoami", "your public key, peer id and chain head")




# ---------------------------------------------------------------- run (node/daemon.py)


def register_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run a node daemon from a TOML config",
                       description="Run a bidmesh node until SIGTERM/SIGINT. Every option is "
                       "documented in config/node.example.toml.")
    add_run_args(p)
    p.set_defaults(func=_run)


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path,
                   help=f"node TOML config file (default: DATA_DIR/{paths.CONFIG_FILE} if it "
                        "exists, else the built-in defaults)")
    p.add_argument("--data-dir", type=Path,
                   help="state directory; overrides node.data_dir (default: "
                        f"${paths.DATA_DIR_ENV}, else {paths.default_data_dir()})")


def _run(args: argparse.Namespace, out: Output) -> int:
    from .daemon import cmd_run  # imports trio and libp2p: only for this command

    return cmd_run(args)


# ---------------------------------------------------------------- main

def register_devnet(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "devnet", help="run a local multi-node network through a full round",
        description="Start real provider nodes on loopback and play a narrated round: "
        "auctions (open, sealed, best value, group with a sponsor), award verification, a "
        "3-device stream with subcontracting, payments and ratings both ways; then a "
        "summary. Exits non-zero if any step fails. See docs/devnet.md.")
    p.add_argument("--providers", type=int, default=4, help="provider nodes (4-5, default 4)")
    p.add_argument("--dir", help="state directory (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true",
                   help="leave the network running afterwards (Ctrl-C stops it)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")
    p.set_defaults(func=_devnet)


def _devnet(args: argparse.Namespace, out: Output) -> int:
    from .devnet import cmd_devnet  # trio, libp2p and the light client: only when asked

    return cmd_devnet(args, out)


def register_init(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .init_cmd import register

    register(sub)


GROUPS: list[Group] = [register_init, register_keygen, register_ledger, register_client,
                       register_run, register_devnet]


def add_group(register: Group) -> None:
    """Add a top-level command group (call before `main`)."""
    if register not in GROUPS:
        GROUPS.append(register)


class Parser(argparse.ArgumentParser):
    """No abbreviated options (`--conf` is not `--config`): a typo must fail, not be
    guessed. Subparsers inherit the class (argparse's default `parser_class`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("bidmesh")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = Parser(
        prog="bidmesh",
        description="bidmesh: a peer-to-peer marketplace for communications services",
    )
    parser.add_argument("--version", action="version",
                        version=f"bidmesh {version()} (python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in GROUPS:
        register(sub)
    return parser


def quiet_logging() -> None:
    """For every command but `run` (which sets up its own JSON logs): our own errors go
    to stderr as one plain line (warnings the commands report themselves, e.g. the
    client's node faults); library records never reach the terminal. py-libp2p logs
    routine dial failures at ERROR on loggers that do not propagate and have no
    handler, which Python's `logging.lastResort` would print to stderr."""
    import logging

    logging.lastResort = logging.NullHandler()
    root = logging.getLogger()
    if root.handlers:  # embedded (tests, plugins): the host program decides
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bidmesh: %(levelname)s: %(message)s"))
    handler.addFilter(lambda r: r.name == "bidmesh" or r.name.startswith("bidmesh."))
    handler.setLevel(logging.ERROR)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        quiet_logging()
    out = Output(json_mode=bool(getattr(args, "json", False)))
    try:
        status: int = args.func(args, out)
        return status
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except BidmeshError as e:
        reason = getattr(e, "reason", None)
        return _fail(f"{reason}: {e}" if reason else str(e), EXIT_PROBLEMS)
    except FileNotFoundError as e:
        return _fail(f"{e.filename}: no such file", EXIT_USAGE)
    except PermissionError as e:
        return _fail(f"{e.filename}: permission denied", EXIT_USAGE)
    except BrokenPipeError:
        # `bidmesh ledger events | head`: the reader went away; not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return _fail("no space left on device", EXIT_PROBLEMS)
        return _fail(f"{e.filename or ''}: {e.strerror}", EXIT_PROBLEMS)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, status: int) -> int:
    line = " ".join(message.split())  # one line, always
    sys.stderr.write(f"bidmesh: error: {line}\n")
    return status


if __name__ == "__main__":
    # Run the importable `node.cli`, not this `__main__` copy: plugins register their
    # commands into `node.cli`'s registry.
    from node.cli import main as _main

    sys.exit(_main())
