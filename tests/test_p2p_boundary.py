"""One libp2p boundary: only node/p2p/ imports py-libp2p or touches its objects.

Scans the source with `ast` (imports inside functions and `if TYPE_CHECKING:`
blocks count too), so a new `import libp2p...` elsewhere in the package, or a
module reaching through `host.libp2p` / `ps.router` / `ps.pubsub.pubsub`, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

NODE = Path(__file__).resolve().parent.parent / "node"
BOUNDARY = NODE / "p2p"
# The upstream handles P2PHost and PubSub expose for node/p2p/ itself.
UPSTREAM_HANDLES = {"libp2p", "_swarm", "router"}


def _is_libp2p(module: str) -> bool:
    return module == "libp2p" or module.startswith("libp2p.")


def violations(path: Path) -> list[str]:
    """Every use of py-libp2p in one file, as "path:line: what", in line order."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        where = f"{path.name}:{line}"
        if isinstance(node, ast.Import):
            found += [(line, f"{where}: import {a.name}") for a in node.names
                      if _is_libp2p(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and _is_libp2p(node.module):
                found.append((line, f"{where}: from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            # importlib.import_module("libp2p...") / __import__("libp2p...")
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if (name in ("import_module", "__import__") and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str) and _is_libp2p(node.args[0].value)):
                found.append((line, f"{where}: {name}({node.args[0].value!r})"))
        elif isinstance(node, ast.Attribute) and node.attr in UPSTREAM_HANDLES:
            found.append((line, f"{where}: .{node.attr} (an upstream handle)"))
        elif (isinstance(node, ast.Attribute) and node.attr == "pubsub"
              and isinstance(node.value, ast.Attribute) and node.value.attr == "pubsub"):
            found.append((line, f"{where}: .pubsub.pubsub (the upstream Pubsub)"))
    return [what for _, what in sorted(found, key=lambda f: f[0])]


def test_nothing_outside_node_p2p_imports_libp2p() -> None:
    files = [p for p in NODE.rglob("*.py") if BOUNDARY not in p.parents]
    assert len(files) > 40  # the scan really covers the package
    found = [f"{p.parent.relative_to(NODE.parent)}/{v}" for p in sorted(files)
             for v in violations(p)]
    assert found == [], "py-libp2p used outside node/p2p/:\n" + "\n".join(found)


def test_the_scan_catches_every_form(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import libp2p\n"
        "from libp2p.abc import INetStream\n"
        "def f(host, ps):\n"
        "    import libp2p.pubsub.gossipsub as g\n"
        "    import importlib\n"
        "    importlib.import_module('libp2p.peer.id')\n"
        "    host.libp2p.get_network()\n"
        "    ps.router.protocols = []\n"
        "    return ps.pubsub.pubsub.peers\n"
        "from .p2p import open_host\n"  # ours: fine
        "import libp2pish\n"  # another package: fine
    )
    found = [v.split(": ", 1)[1] for v in violations(bad)]
    assert found == [
        "import libp2p", "from libp2p.abc import ...", "import libp2p.pubsub.gossipsub",
        "import_module('libp2p.peer.id')", ".libp2p (an upstream handle)",
        ".router (an upstream handle)", ".pubsub.pubsub (the upstream Pubsub)",
    ]
