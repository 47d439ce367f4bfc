"""Runs every atheris harness in fuzz/ for a small, bounded number of iterations (a
smoke test that the harnesses work and find nothing quickly; long runs are manual:
`.venv/bin/python fuzz/fuzz_events.py -max_total_time=600`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESSES = sorted(p.name for p in (ROOT / "fuzz").glob("fuzz_*.py"))
RUNS = 1500

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (wheels exist for Linux x86_64 only; "
           "`.venv/bin/pip install atheris` to run the fuzz harnesses)")


def test_every_decoder_has_a_harness() -> None:
    assert {"fuzz_codec.py", "fuzz_events.py", "fuzz_ledger.py", "fuzz_sync.py",
            "fuzz_query.py", "fuzz_segments.py", "fuzz_p2p.py", "fuzz_config.py",
            "fuzz_lease.py"} <= set(HARNESSES)


def test_harnesses_run_clean(tmp_path: Path) -> None:
    """All harnesses at once (they are independent processes), each bounded by its
    run count, with a private corpus directory and crash artifacts in tmp_path."""
    procs = {}
    for name in HARNESSES:
        corpus = tmp_path / name.removesuffix(".py")
        corpus.mkdir()
        cmd = [sys.executable, str(ROOT / "fuzz" / name), f"-atheris_runs={RUNS}",
               f"-artifact_prefix={tmp_path}/", "-seed=1", str(corpus)]
        procs[name] = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
    failed = {}
    for name, p in procs.items():
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            failed[name] = "timed out\n" + out.decode(errors="replace")[-3000:]
            continue
        text = out.decode(errors="replace")
        if p.returncode != 0 or f"Done {RUNS}" not in text:
            failed[name] = text[-3000:]
    assert not failed, "\n\n".join(f"== {k}\n{v}" for k, v in failed.items())
    assert not list(tmp_path.glob("crash-*"))
