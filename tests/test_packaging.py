"""Packaging: what `pip install .` installs is the `node` package (with its dashboard
files and `py.typed`) and the `bidmesh` command, and nothing else — no tests, bench,
docs, state or virtualenv.

Everything is built offline from a clean copy of the project (never in the working
tree: an in-tree `build/lib` left over from an earlier build would leak into the
wheel, and other people's files must not be touched):

* `test_package_files` always runs: the venv's own setuptools builds the package
  (`egg_info` + `build_py`, the steps whose output a wheel holds) and the file list,
  entry points and importability are checked.
* `test_wheel_files` builds a real wheel with `pip wheel --no-build-isolation`; that
  needs a setuptools that can build wheels (>= 70.1, or the `wheel` package). When
  the venv's cannot, the test is skipped with that reason (shown by `pytest -ra`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a build reads, plus the folders that must stay out of the wheel.
COPY_FILES = ("pyproject.toml", "README.md")
COPY_DIRS = ("node", "tests", "bench", "docs", "config", "systemd", "fuzz")
TIMEOUT = 60


def _ignore(directory: str, names: list[str]) -> set[str]:
    """Skip caches and anything that is not a regular file or folder (e.g. sockets)."""
    skip = set()
    for n in names:
        p = Path(directory) / n
        mode = p.lstat().st_mode
        if n == "__pycache__" or n.endswith(".pyc") or not (
                stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            skip.add(n)
    return skip


def _clean_copy(dst: Path) -> Path:
    src = dst / "src"
    src.mkdir()
    for name in COPY_FILES:
        shutil.copy2(ROOT / name, src / name)
    for name in COPY_DIRS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=_ignore)
    # Decoys: importable-looking folders and node state next to the package.
    for decoy in ("tests/__init__.py", "bench/__init__.py", "docs/__init__.py"):
        (src / decoy).parent.mkdir(exist_ok=True)
        (src / decoy).touch()
    for decoy in ("state/ledger.db", "state/node.key", "devnet-state/atlas/state/ledger.db",
                  ".venv/lib/python3.11/site-packages/x.py"):
        (src / decoy).parent.mkdir(parents=True, exist_ok=True)
        (src / decoy).write_bytes(b"decoy")
    return src


def _expected() -> set[str]:
    """Every module of the `node` package, `node/py.typed` and `node/web/*`."""
    pkg = ROOT / "node"
    want = {p.relative_to(ROOT).as_posix() for p in pkg.rglob("*.py")
            if "__pycache__" not in p.parts}
    want.add("node/py.typed")
    want |= {p.relative_to(ROOT).as_posix() for p in (pkg / "web").iterdir() if p.is_file()}
    return want


def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"


def _check_entry_points(text: str) -> None:
    assert "[console_scripts]" in text
    assert "bidmesh = node.cli:main" in text
    assert "[bidmesh.processors]" in text
    for name in ("identity", "sha256", "zstd", "zstd-d", "aes-gcm", "aes-gcm-d"):
        assert f"\n{name} = node.processors.builtin:" in text, name


def _check_files(got: set[str]) -> None:
    want = _expected()
    assert got == want, (f"unexpected in the package: {sorted(got - want)}; "
                         f"missing: {sorted(want - got)}")
    assert "node/testing.py" not in got  # raw signing helpers live in tests/testkit.py
    for forbidden in ("tests/", "bench/", "docs/", "state/", "devnet-state/", ".venv/",
                      "fuzz/", "config/", "systemd/"):
        assert not any(f.startswith(forbidden) for f in got), forbidden


def test_package_files(tmp_path: Path) -> None:
    src = _clean_copy(tmp_path)
    lib, egg = tmp_path / "lib", tmp_path / "egg"
    egg.mkdir()
    _run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
          "egg_info", "--egg-base", str(egg), "build_py", "--build-lib", str(lib)], src)

    got = {p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()}
    _check_files(got)
    info = egg / "bidmesh.egg-info"
    _check_entry_points((info / "entry_points.txt").read_text())
    assert (info / "top_level.txt").read_text().split() == ["node"]

    # The built package works on its own: it is what gets imported, finds its
    # dashboard files through importlib.resources, and the command line builds.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import node, node.cli\n"
        "from importlib import resources\n"
        "assert node.__file__.startswith(sys.argv[1]), node.__file__\n"
        "assert resources.files('node').joinpath('web', 'index.html').read_bytes()\n"
        "node.cli.build_parser().parse_args(['keygen', '--out', 'k'])\n"
    )
    _run([sys.executable, "-c", probe, str(lib)], tmp_path)


def _can_build_wheels() -> str | None:
    """None when the venv's setuptools can build a wheel offline, else why not."""
    have = importlib.metadata.version("setuptools")
    version = tuple(int(x) for x in have.split(".")[:2])
    if version >= (70, 1) or importlib.util.find_spec("wheel") is not None:
        return None
    return (f"the venv's setuptools {have} cannot build wheels offline "
            "(needs setuptools>=70.1 or the `wheel` package); test_package_files checks "
            "the same file list with build_py")


def test_wheel_files(tmp_path: Path) -> None:
    why = _can_build_wheels()
    if why is not None:
        pytest.skip(why)
    src = _clean_copy(tmp_path)
    out = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(out), str(src)], tmp_path)
    wheels = list(out.glob("bidmesh-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        names = zf.namelist()
        info = [n for n in names if n.split("/")[0].endswith(".dist-info")]
        _check_files(set(names) - set(info))
        dist_info = info[0].split("/")[0]
        assert dist_info.startswith("bidmesh-")
        _check_entry_points(zf.read(f"{dist_info}/entry_points.txt").decode())
        assert "Name: bidmesh" in zf.read(f"{dist_info}/METADATA").decode()
