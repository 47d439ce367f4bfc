"""Shared driver for the atheris harnesses in this directory.

Each harness defines `test_one(data: bytes)` that raises only on a real bug (an
exception the decoder does not document) and a list of seed inputs. `main()` writes
the seeds into the corpus directory (the first one given on the command line, else
$TMPDIR/bidmesh-fuzz/<harness>/), which libFuzzer then grows with the inputs it finds
interesting (so later runs start where earlier ones stopped). The `node` package is
instrumented for coverage; crashes are written to the current directory.

    .venv/bin/python fuzz/fuzz_events.py -atheris_runs=100000
    .venv/bin/python fuzz/fuzz_events.py my_corpus/ -max_total_time=600

Known bugs that are strict xfails in tests/reliability are skipped here by name
(`KNOWN`), so the harnesses keep finding new ones.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:  # tests/testkit.py: seeds and raw signing
    sys.path.insert(0, str(ROOT / "tests"))


def instrument() -> None:
    """Instrument every `node` module imported from now on (call before importing)."""
    atheris.instrument_imports(include=["node"]).__enter__()


def main(name: str, test_one: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    argv = list(sys.argv)
    dirs = [Path(a) for a in argv[1:] if not a.startswith("-")]
    if not dirs:
        dirs = [Path(tempfile.gettempdir(), "bidmesh-fuzz", name)]
        dirs[0].mkdir(parents=True, exist_ok=True)
        argv.append(str(dirs[0]))
    if dirs[0].is_dir():
        for i, s in enumerate(seeds):
            (dirs[0] / f"seed-{i:04d}").write_bytes(s)
    if not any(a.startswith("-artifact_prefix") for a in argv):
        argv.append(f"-artifact_prefix={os.getcwd()}/")
    atheris.Setup(argv, test_one)
    atheris.Fuzz()
