"""Keep the module map of docs/architecture.md in step with node/.

    .venv/bin/python docs/module_map.py          # rewrite the line counts in place
    .venv/bin/python docs/module_map.py --check  # exit 1 if a count, a module or a row is off

A row of the map is `| `path` | lines | responsibility |`, with `path` relative to
node/ (`ledger.py`, `p2p/host.py`). The script rewrites the lines column and names
the modules without a row (write their responsibility by hand) and the rows whose
module is gone.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
ROW = re.compile(r"^\| `([\w/]+\.py)` \| (\d+) \|")


def line_counts() -> dict[str, int]:
    return {str(p.relative_to(ROOT / "node")): p.read_bytes().count(b"\n")
            for p in sorted((ROOT / "node").rglob("*.py"))}


def main(check: bool) -> int:
    counts = line_counts()
    text = DOC.read_text()
    rows: set[str] = set()
    stale: list[str] = []

    def fix(m: re.Match[str]) -> str:
        path, lines = m.group(1), int(m.group(2))
        rows.add(path)
        if path in counts and counts[path] != lines:
            stale.append(f"{path}: {lines} -> {counts[path]}")
            return f"| `{path}` | {counts[path]} |"
        return m.group(0)

    new = "\n".join(ROW.sub(fix, line) for line in text.split("\n"))
    missing = sorted(set(counts) - rows)
    gone = sorted(rows - set(counts))
    for what, items in (("line count changed", stale), ("no row in the map", missing),
                        ("row for a module that is gone", gone)):
        for item in items:
            print(f"{what}: {item}")
    if check:
        return 1 if stale or missing or gone else 0
    if new != text:
        DOC.write_text(new)
    return 1 if missing or gone else 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
