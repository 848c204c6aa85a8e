"""Fixtures for the dashboard tests: a real Prometheus scraping the FAKE exporters (no vLLM needed)."""

from __future__ import annotations

import shutil

import pytest

from dashboards.localprom import INSTALL_HINT, LocalPrometheus, scrape_config
from tests.conftest import free_port
from tests.dashboards.fake_exporters import FakeFleet


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"`{binary}` not found: {INSTALL_HINT}")
    return path


@pytest.fixture(scope="module")
def fake_stack(tmp_path_factory):
    """(prometheus_url, fleet): the fake gateway, engines and harness, scraped every second with the real rules."""
    require("prometheus")
    with FakeFleet() as fleet:
        config = scrape_config(fleet.scrape_targets(), scrape_interval="1s", evaluation_interval="1s")
        with LocalPrometheus(config, tmp_path_factory.mktemp("prometheus"), free_port()) as prom:
            yield prom.url, fleet
