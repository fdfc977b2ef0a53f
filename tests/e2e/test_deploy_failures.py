"""Deploys that cannot succeed: they say why, show the failing component's log, and leave nothing
running."""

from __future__ import annotations

import json
import socket

import pytest
from stackutil import free_block
from test_local_deploy import MASTER, listening, twllm

pytestmark = pytest.mark.e2e

SPEC = """
name: broken
gateway: {{port: {gateway}, master_key: "${{TWLLM_MASTER_KEY}}"}}
database: {{port: {database}}}
engines: {{port_base: {engines}, start_timeout_s: 240}}
models:
  - name: not-a-model
    source: {{path: {model}}}
    device: cpu
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""


def test_an_engine_that_cannot_start_fails_the_deploy_with_its_log(tmp_path, vllm_cpu_env):
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NoSuchArchitecture"], "model_type": "nonsense"}))
    ports = {"gateway": free_block(1), "database": free_block(1), "engines": free_block(1)}
    spec = tmp_path / "broken.yaml"
    spec.write_text(SPEC.format(model=model, **ports))
    state = tmp_path / "state"
    result = twllm("deploy", "--config", str(spec), "--state-dir", str(state), timeout=400)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "vllm-not-a-model-0" in result.stderr
    assert "last lines of vllm-not-a-model-0's log" in result.stderr
    assert "twllm logs vllm-not-a-model-0" in result.stderr
    assert "Traceback (most recent call last)" not in result.stderr.split("last lines")[0]
    assert not any(listening(p) for p in ports.values())
    info = json.loads(twllm("status", "--state-dir", str(state), "--json").stdout)
    assert info["status"] in ("failed", "stopped")
    assert not any(c["pid"] for c in info["components"])


def test_a_busy_port_is_refused_before_anything_starts(tmp_path, demo_models):
    ports = {"gateway": free_block(1), "database": free_block(1), "engines": free_block(1)}
    spec = tmp_path / "busy.yaml"
    spec.write_text(SPEC.format(model=demo_models / "twllm-demo-chat", **ports))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports["gateway"]))
        holder.listen()
        result = twllm("deploy", "--config", str(spec), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1
    assert f"gateway: port {ports['gateway']} is already in use" in result.stderr
    assert "nothing was started" in result.stderr
    assert not (tmp_path / "state" / "state.json").exists()
    assert MASTER not in result.stderr
