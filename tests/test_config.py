"""Node config: defaults, the example file, clear errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from node import config
from node.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "node.example.toml"


def test_example_matches_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # The example is what the systemd unit installs; the unit sets the data dir's env.
    monkeypatch.setenv("BIDMESH_DATA_DIR", "/var/lib/bidmesh")
    cfg = config.load(EXAMPLE)
    default = config.Config()
    for name in config.SECTIONS:
        assert getattr(cfg, name) == getattr(default, name), name


def test_example_documents_every_option() -> None:
    text = EXAMPLE.read_text()
    for name, cls in config.SECTIONS.items():
        assert f"[{name}]" in text
        for f in dataclasses.fields(cls):
            assert f"\n{f.name} = " in text, f"{name}.{f.name} missing from the example"


def test_roundtrip_and_relative_paths(tmp_path: Path) -> None:
    p = tmp_path / "n.toml"
    p.write_text('[node]\ndata_dir = "state"\nnetwork = "dev-1"\n[sync]\ninterval_s = 1\n')
    cfg = config.load(p)
    assert cfg.node.data_dir == tmp_path / "state"
    assert cfg.sync.interval_s == 1.0 and isinstance(cfg.sync.interval_s, float)
    assert cfg.ledger_path == tmp_path / "state" / "ledger.db"
    p2 = tmp_path / "again.toml"
    p2.write_text(config.to_toml(cfg))
    assert config.load(p2).node == cfg.node


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[nod]\n", "unknown section [nod]"),
        ("[gossip]\nbatchsize = 3\n", "unknown key gossip.batchsize"),
        ("[gossip]\nbatch_events = 0\n", "gossip.batch_events: must be between"),
        ("[gossip]\nbatch_events = 'x'\n", "gossip.batch_events: must be an integer"),
        ("[sync]\non_connect = 1\n", "sync.on_connect: must be a boolean"),
        ("[sync]\ninterval_s = true\n", "sync.interval_s"),
        ("[node]\nnetwork = 'Main'\n", "node.network: must match"),
        ("[node]\nlog_level = 'loud'\n", "node.log_level"),
        ("[p2p]\nbootstrap = ['/ip4/1.2.3.4/tcp/1']\n", "p2p.bootstrap"),
        ("[p2p]\nlisten = 'x'\n", "p2p.listen"),
        ("[p2p]\nreconnect_min_s = 9\nreconnect_max_s = 2\n", "p2p.reconnect_min_s"),
        ("node = 3\n", "node: must be a table"),
        ("[bandwidth]\nallow = ['10.0.0.0/8 0']\n", "bandwidth.allow: port range"),
        ("[bandwidth]\ndeny = ['example.org']\n", "bandwidth.deny: 'example.org' is not a CIDR"),
        ("[bandwidth]\nmax_tunnels = 0\n", "bandwidth.max_tunnels: must be between"),
        ("[limits]\nip_exempt = ['10.0.0.0/33']\n", "limits.ip_exempt"),
        ("[limits]\nip_exempt = [false]\n", "limits.ip_exempt"),
        ("[limits]\nconns_per_ip = 0\n", "limits.conns_per_ip: must be between"),
        ("[p2p]\nmax_connections = 20\n", "limits.outbound_reserved + limits.trusted_reserved"),
        ("[limits]\ntrusted_reserved_streams = 64\n", "limits.trusted_reserved_streams"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load("/nonexistent/bidmesh.toml")
