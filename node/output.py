"""Command output: aligned tables for people, JSON for programs.

Every data command builds plain data (dicts, lists, str, int, bool, None; bytes are
shown as hex) and hands it to an `Output`, which prints either JSON (`--json`) or a
human view. Errors never come through here: they go to stderr from `cli.main`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .errors import UsageError
from .events import jsonable


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as an aligned text table; `columns` is (key, header). Numbers align right."""
    cells = [[_cell(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    numeric = [bool(rows) and all(isinstance(r.get(k), int) and not isinstance(r.get(k), bool)
                                  for r in rows if r.get(k) is not None)
               for k, _ in columns]

    def line(vals: Sequence[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric,
                                                                       strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, cells)])


def pairs(items: Sequence[tuple[str, Any]]) -> str:
    """Key/value lines with the values aligned."""
    if not items:
        return ""
    w = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(w)}  {_cell(v)}".rstrip() for k, v in items)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, (list, tuple)):
        return ",".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(jsonable(v), sort_keys=True)
    return str(v)


@dataclass
class Output:
    """Where a command's result goes. `json_mode` selects JSON on stdout."""

    json_mode: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stdout)

    def json(self, data: Any) -> None:
        json.dump(jsonable(data), self.stream, indent=2, sort_keys=False)
        self.stream.write("\n")

    def emit(self, data: Any, human: str | None = None) -> None:
        """JSON of `data` in JSON mode, else the `human` text (or data as pairs)."""
        if self.json_mode:
            self.json(data)
            return
        if human is None:
            human = pairs(list(data.items())) if isinstance(data, Mapping) else _cell(data)
        if human:
            self.stream.write(human + "\n")

    def rows(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]],
             *, empty: str = "(none)") -> None:
        """A list of records: a JSON array, or an aligned table."""
        if self.json_mode:
            self.json(list(rows))
        elif rows:
            self.stream.write(table(rows, columns) + "\n")
        else:
            self.stream.write(empty + "\n")

    def say(self, text: str) -> None:
        """Human-only progress or notes (stderr in JSON mode, so stdout stays JSON)."""
        (sys.stderr if self.json_mode else self.stream).write(text + "\n")


def parse_hex(text: str, what: str, *, exact: int | None = None) -> bytes:
    """Hex a user typed (CLI argument, HTTP query, id prefix) as bytes; UsageError
    naming `what` when it is not hex or, with `exact`, not that many bytes. The one
    hex parser for user input."""
    try:
        b = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{what} {text[:80]!r} is not hex") from None
    if exact is not None and len(b) != exact:
        raise UsageError(f"{what} must be {exact} bytes ({exact * 2} hex digits)")
    return b
