"""The gateway's PostgreSQL goes away and comes back (a real server, stopped and started by the test): what needs
the store answers 503 with Retry-After, chat keeps working and is billed once the database is back, /health says
so, and nothing needs a restart."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import httpx

from lorafleet.core.net import free_port
from lorafleet.services import PostgresServer
from lorafleet.worker import Worker
from serve.gateway.app import ServerThread, create_app
from tests.conftest import MODELS
from tests.serve.conftest import ADMIN_KEY, KEYS, config, scrape, tenant
from tests.serve.fake_engine import wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ACME = {"Authorization": f"Bearer {KEYS['acme']}"}


def _chat(gw) -> httpx.Response:
    body = {"model": "fake-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=ACME, timeout=30)


def _billed(gw) -> int:
    rows = httpx.get(f"{gw.url}/admin/tenants", headers=ADMIN).json()["tenants"]
    return next(t for t in rows if t["name"] == "acme")["usage"]["requests"]


def test_postgresql_away_gives_503s_where_needed_and_loses_no_usage(fake_engine, capsys):
    root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-outage-"))  # pytest's folders are closed to `postgres`
    root.chmod(0o711)
    pg = PostgresServer(root / "pg").start()
    url = pg.fresh_database("outage")
    engine = {"name": "fake", "model": str(MODELS / "tiny-random-llama"), "served_name": "fake-base",
              "urls": [fake_engine.url]}  # fmt: skip
    cfg = config([engine], [tenant("acme", ["fake-base"])], store_url=url, store_poll_s=0.2)
    gw = ServerThread(create_app(cfg), port=free_port()).start()
    worker = Worker(gw.gateway.store, cfg, name="outage", poll_s=0.2)  # polls the same database
    polling = threading.Thread(target=worker.run_forever, daemon=True)
    polling.start()
    try:
        assert _chat(gw).status_code == 200
        assert httpx.get(f"{gw.url}/v1/files", headers=ACME).status_code == 200
        pg.stop()

        files = httpx.get(f"{gw.url}/v1/files", headers=ACME)
        assert files.status_code == 503 and files.headers["retry-after"] == "2"
        assert files.json()["error"]["code"] == "store_unavailable"
        for _ in range(3):  # the hot path needs no database: tenants keep being served, and metered
            assert _chat(gw).status_code == 200
        assert wait_for(lambda: httpx.get(f"{gw.url}/health").json() == {"status": "degraded"})
        detail = httpx.get(f"{gw.url}/health", headers=ADMIN).json()
        assert detail["store"] == {"backend": "postgresql", "up": False}
        assert scrape(gw.url, "lorafleet_state_up", part="store") == 0  # LorafleetStateDown pages after a minute

        pg.start()  # same data, same port
        assert wait_for(lambda: httpx.get(f"{gw.url}/health").json() == {"status": "ok"}, timeout=20)
        assert httpx.get(f"{gw.url}/v1/files", headers=ACME).status_code == 200
        assert scrape(gw.url, "lorafleet_state_up", part="store") == 1
        # the worker met the outage and waited it out (STORE_RETRY_S) instead of dying with it
        assert polling.is_alive() and "is unreachable" in capsys.readouterr().out
    finally:
        worker.stop.set()
        gw.stop()
    # what was metered while the database was away reached the ledger: a new gateway bills all 4 requests
    again = ServerThread(create_app(cfg), port=free_port()).start()
    try:
        assert _billed(again) == 4
    finally:
        again.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
