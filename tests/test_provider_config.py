"""The [provider] and [http] config sections."""

from __future__ import annotations

import tomllib

import pytest

from node import config
from node.errors import ConfigError


def test_provider_offers_round_trip() -> None:
    cfg = config.from_dict({"provider": {"enabled": True, "offers": {
        "zstd": {"price": 5, "capacity": 100}, "bandwidth": {"price": 40}}}})
    assert cfg.provider.offers["zstd"] == {"price": 5, "capacity": 100}
    again = config.from_dict(tomllib.loads(config.to_toml(cfg)))
    assert again.provider == cfg.provider and again.http == cfg.http


@pytest.mark.parametrize("offers, needle", [
    ({"Bad Name": {"price": 1}}, "Bad Name"),
    ({"zstd": {"price": -1}}, "zstd.price"),
    ({"zstd": {"cost": 1}}, "price and capacity"),
    ({"zstd": 3}, "price and capacity"),
])
def test_bad_offers_name_the_key(offers: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"provider\.offers") as e:
        config.from_dict({"provider": {"offers": offers}})
    assert needle in str(e.value)


def test_http_port_range() -> None:
    with pytest.raises(ConfigError, match=r"http\.port"):
        config.from_dict({"http": {"port": 70000}})
