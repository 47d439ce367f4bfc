"""`python -m node.cli`: the `bidmesh` command."""

import sys

# The importable `node.cli` (this file runs as `__main__`): plugins register their
# commands into `node.cli`'s registry.
from node.cli import main

sys.exit(main())
