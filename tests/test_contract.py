"""The contract: protos lint clean, are formatted, don't break main, and gen/ and the
Envoy config match them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pool

from server.config import ROOT, Settings
from server.envoy import EnvoyAddresses, render_config
from server.main import SERVICE_NAMES
from tools import check_breaking, check_generated

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _tools_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # buf runs `python` and the protoc plugins from the virtualenv.
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)


def test_buf_lint() -> None:
    result = run("buf", "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format() -> None:
    result = run("buf", "format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_changes_against_main() -> None:
    if not check_breaking.has_baseline("main"):
        pytest.skip("main has no protos yet: nothing to compare against")
    result = check_breaking.breaking("main")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_fresh() -> None:
    assert check_generated.stale_files() == [], "gen/ is stale: run `make gen` and commit it"


def test_every_rpc_has_a_rest_mapping() -> None:
    pool = descriptor_pool.Default()
    for name in SERVICE_NAMES:
        for method in pool.FindServiceByName(name).methods:
            rule: http_pb2.HttpRule = method.GetOptions().Extensions[annotations_pb2.http]  # type: ignore[index]
            assert rule.WhichOneof("pattern"), f"{name}.{method.name} has no google.api.http rule"


def _validate_envoy(config_path: Path) -> subprocess.CompletedProcess[str]:
    return run(Settings().resolved_envoy_binary, "--mode", "validate", "-c", str(config_path))


def test_envoy_config_validates() -> None:
    result = _validate_envoy(ROOT / "envoy" / "envoy.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_sidecar_config_validates(tmp_path: Path) -> None:
    template = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    addresses = EnvoyAddresses(
        listen_host="0.0.0.0",
        listen_port=18080,
        admin_port=19901,
        grpc_host="0.0.0.0",
        grpc_port=15051,
        ops_host="127.0.0.1",
        ops_port=19464,
        descriptor_set=ROOT / "gen" / "agentmesh.binpb",
        cors_origins=["https://app.example.com"],
    )
    rendered = render_config(template, addresses)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(rendered))
    result = _validate_envoy(path)
    assert result.returncode == 0, result.stdout + result.stderr
    clusters = {c["name"]: c for c in rendered["static_resources"]["clusters"]}
    grpc_address = clusters["agentmesh_grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert grpc_address["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 15051,
    }


def test_envoy_transcodes_every_service() -> None:
    config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    transcoder = next(
        f for f in manager["http_filters"] if f["name"].endswith("grpc_json_transcoder")
    )
    assert transcoder["typed_config"]["services"] == SERVICE_NAMES
