"""`bidmesh devnet`: a local network of real node processes playing one full round.

Four provider daemons (`bidmesh run`, each with its own key, SQLite ledger and
dataplane) connect on loopback. Recipients act through light clients exactly as a
user would: a warm-up round gives providers different reputations, and a recipient
who does not pay a record that two providers' policies then skip or charge more for;
a recipient auctions a processing lease (zstd then aes-gcm) shared by three devices with
a maximum and minimum rate, cleared by best value; a sealed Vickrey auction runs
beside it; the award is verified; the devices stream a generated MPEG-TS file
through the winner, which subcontracts the aes-gcm step it lacks; the output is
checked byte for byte; payments and ratings flow both ways; a group buys a lease
with one member sponsoring another. Every node must end with the same state digest.

Modules: `net` (provider specs, node processes, the narrator, light clients, polling
helpers), `round` (`play`, the narrated round), `scenes` (tunnel, unpaid recipient,
lookups), `summary` (tables), `cmd` (`cmd_devnet`).
"""

from __future__ import annotations

from .cmd import cmd_devnet
from .net import NETWORK, PROVIDERS, Devnet, Narrator, ProviderProc, ProviderSpec, make_ts
from .round import play
from .summary import print_summary

__all__ = [
    "NETWORK", "PROVIDERS", "Devnet", "Narrator", "ProviderProc", "ProviderSpec", "cmd_devnet",
    "make_ts", "play", "print_summary",
]
