#!/usr/bin/env python3
"""Set up `.venv/` and run bidmesh's main job or its tests.

    python3 dev.py devnet [ARGS...]   # set up, then run a local network round
    python3 dev.py test [PYTEST ARGS] # set up, then ruff, mypy --strict and pytest

Needs only Python 3.11+. The venv is rebuilt when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".bidmesh-stamp"


def _run(*cmd: str | os.PathLike[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 — dev.py runs before any venv exists
        sys.exit(f"bidmesh needs Python 3.11+, this is {sys.version.split()[0]}")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    _run(BIN / "python", "-m", "pip", "install", "-q", "-e", ".[test]")
    STAMP.write_text(want)


def ensure_chromium() -> None:
    """The dashboard test drives Debian's headless chromium; install it when we can."""
    if shutil.which("chromium"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("note: chromium is not installed and cannot be installed from here (needs "
              "root and apt-get); the dashboard browser test will fail")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                   check=True, env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("devnet", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "devnet":
            _run(BIN / "bidmesh", "devnet", *rest)
        elif cmd == "test":
            ensure_chromium()
            _run(BIN / "ruff", "check", ".")
            _run(BIN / "mypy")
            _run(BIN / "python", "-m", "pytest", "-n", "2", "--dist", "loadgroup", *rest)
    except subprocess.CalledProcessError as e:
        return e.returncode or 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
