"""What `twllm render k8s` gives the pods actually runs: the db-migrate Job's command migrates a
real PostgreSQL from the ConfigMap's plan.json, the gateway container's command and environment
(secrets resolved as the kubelet would) start the real gateway on the ConfigMap's files, and the
wheel the Dockerfile builds carries everything the gateway reads at run time.

No cluster here: the containers' commands run as local processes, with the pod's paths moved
into a temporary folder and its 0.0.0.0 listener moved to 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pgutil import Postgres, free_port

from twllm.render.k8s import CONFIG_MOUNT, STATE_ROOT, render_k8s
from twllm.spec.resolve import parse_spec

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "TWLLM_MASTER_KEY": "sk-k8s-run-master",
    "TWLLM_ENGINE_API_KEY": "sk-k8s-run-engine",
}
SPEC = """\
name: k8s-run
gateway: {master_key: "${TWLLM_MASTER_KEY}"}
database: {url: "${TWLLM_DATABASE_URL}"}
models:
  - {name: chat, model: llama-3.1-8b-instruct, tensor_parallel: 2}
  - {name: embed, model: bge-m3}
"""


@pytest.fixture(scope="module")
def bare_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A PostgreSQL with no twllm schema yet (the Job is what migrates it)."""
    server = Postgres(tmp_path_factory.mktemp("pg"))
    server.start()
    yield server
    server.stop(signal.SIGKILL)


def pod_env(container: dict[str, Any], secrets: dict[str, str], moves: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet sets it: values, and Secret keys resolved."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            value = item["value"]
            for old, new in moves.items():
                value = value.replace(old, new)
            env[item["name"]] = value
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            if ref["key"] in secrets:
                env[item["name"]] = secrets[ref["key"]]
            elif not ref.get("optional"):
                raise AssertionError(f"the pod needs Secret key {ref['key']}")
    return env


def write_config_map(result: Any, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, text in result.gateway_config.items():
        (folder / name).write_text(text)
    return folder


def test_the_migrate_job_and_the_gateway_pod_run(bare_postgres: Postgres, tmp_path: Path) -> None:
    secrets = {**SECRETS, "TWLLM_DATABASE_URL": bare_postgres.url}
    result = render_k8s(parse_spec(SPEC, "k8s.yaml", secrets))
    objs = {(o["kind"], o["metadata"]["name"]): o for o in result.objects()}
    config = write_config_map(result, tmp_path / "etc-twllm")
    state = tmp_path / "var-lib-twllm"
    (state / "spool").mkdir(parents=True)
    moves = {CONFIG_MOUNT: str(config), STATE_ROOT: str(state)}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TWLLM_") and k != "DATABASE_URL"}

    # The Job: `twllm db migrate --state-dir /etc/twllm` with the URL from the Secret.
    job = objs[("Job", "db-migrate")]["spec"]["template"]["spec"]["containers"][0]
    argv = [a.replace(CONFIG_MOUNT, str(config)) for a in job["command"]]
    argv[0] = str(Path(sys.executable).with_name("twllm"))
    done = subprocess.run(
        argv, env={**base_env, **pod_env(job, secrets, moves)}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    with psycopg.connect(bare_postgres.url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"tenants", "api_keys", "spend_ledger", "rate_windows"} <= tables
    again = subprocess.run(
        argv, env={**base_env, **pod_env(job, secrets, moves)}, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "nothing to apply" in again.stdout + again.stderr

    # The gateway container, as the Deployment runs it (one of its replicas).
    container = objs[("Deployment", "gateway")]["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    args = [a.replace(CONFIG_MOUNT, str(config)) for a in container["args"]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    command = [sys.executable if c == "python" else c for c in container["command"]]
    log = (tmp_path / "gateway.log").open("wb")
    env = {**base_env, **pod_env(container, secrets, moves), "HOME": str(state)}
    process = subprocess.Popen(
        [*command, *args], env=env, cwd=state, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        probes = {k: container[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=base, timeout=10, trust_env=False) as client:
            while True:
                assert process.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
                try:
                    if client.get(probes["startupProbe"]).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()[-3000:]
                time.sleep(1)
            assert client.get(probes["livenessProbe"]).status_code == 200
            assert client.get(probes["readinessProbe"]).status_code == 200
            listed = client.get("/v1/models", headers={"Authorization": f"Bearer {SECRETS['TWLLM_MASTER_KEY']}"})
            assert listed.status_code == 200, listed.text
            assert {m["id"] for m in listed.json()["data"]} == {"chat", "embed"}
            assert client.get("/v1/models").status_code == 401
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_the_dockerfile_builds_a_wheel_with_what_the_gateway_reads(tmp_path: Path) -> None:
    """The Dockerfile's build stage (`pip wheel --no-deps .`), run here: the wheel holds the
    migrations, the console's vendored assets, the registry and the zh-TW prompts."""
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]
    assert "USER 10001:10001" in final and "gcc" not in final and "build-essential" not in final
    assert 'ENTRYPOINT ["python", "-m", "twllm.gateway.serve"]' in final
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("twllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "twllm/accounting/migrations/0006_requested_model.sql",
        "twllm/console/static/index.html",
        "twllm/console/static/vendor/chart.umd.min.js",
        "twllm/zh_tw/prompts.yaml",
        "twllm/gateway/serve.py",
    ):
        assert needed in names, needed
    assert any(n.startswith("twllm/model_registry/catalog/") for n in names)
    assert not any(n.startswith("tests/") for n in names)
