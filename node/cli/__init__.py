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
import errno
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import BidmeshError, UsageError
from ..output import Output, parse_hex
from .client import local_dial_addrs, register_client
from .common import (
    _LEDGER_COMMANDS as _LEDGER_COMMANDS,  # tests inspect the registry
)
from .common import (
    DEFAULT_NETWORK,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    Group,
    Handler,
    LedgerCommand,
    LedgerHandler,
    add_json_flag,
    fmt_time,
    ledger_command,
    network_for,
    node_running,
    parse_time_ms,
    peer_id,
    resolve_author,
    resolve_id,
    short,
)
from .ledger import register_ledger
from .node_cmds import (
    add_run_args,
    register_devnet,
    register_init,
    register_keygen,
    register_run,
)

__all__ = [
    "DEFAULT_NETWORK", "EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE", "GROUPS", "Group", "Handler",
    "LedgerCommand", "LedgerHandler", "Parser", "add_group", "add_json_flag", "add_run_args",
    "build_parser", "fmt_time", "ledger_command", "local_dial_addrs", "main", "network_for",
    "node_running", "parse_hex", "parse_time_ms", "peer_id", "quiet_logging", "resolve_author",
    "resolve_id", "short", "version",
]


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
