"""What every `bidmesh` command group shares: exit statuses, the `ledger`
subcommand registry (`ledger_command`), `--json`, and parsers for times, hex, ids and
author prefixes. Re-exported by `node.cli`, where plugins import them from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import UsageError
from ..ledger import Ledger
from ..output import Output, parse_hex

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
_LEDGER_PLUGINS: list[str] = ["node.cli.auction"]


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


def peer_id(public: bytes) -> str | None:
    """The libp2p peer id of a key, when the p2p layer is installed and importable."""
    try:
        p2p = importlib.import_module("node.p2p")
    except ImportError:
        return None
    fn = getattr(p2p, "peer_id_from_pubkey", None)
    return str(fn(public).to_base58()) if fn else None
