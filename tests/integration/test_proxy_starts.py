"""The LiteLLM proxy starts and serves with our dependency set, without ``litellm[proxy]``.

``litellm[proxy]`` pulls the proprietary ``litellm-enterprise`` and ``litellm-proxy-extras``; we
install the MIT ``litellm`` plus the open packages the proxy really imports instead. These tests
prove that set: the proxy starts from a config file, answers ``/health/liveliness``, serves an
OpenAI-compatible chat completion (with ``mock_response``, so no engine is needed), rejects bad
keys, loads a ``litellm_settings.callbacks`` instance and a ``general_settings.custom_auth``
function, prices a ``hosted_vllm`` model from ``model_info``, and runs with two workers.

Observed with litellm 1.108.7 (no database):
- a wrong ``Bearer`` key with plain master-key auth is answered 400 ``no_db_connection``, not
  401: without a database LiteLLM cannot look virtual keys up. A missing key is 401, but only
  when the ``prisma`` client package is installed: LiteLLM's error handler imports it and would
  otherwise turn every auth error that is not already an HTTP/proxy exception into a 500.
- with ``custom_auth``, the function decides: raising ``ProxyException(code=401)`` gives 401.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import pytest
from proxyutil import ProxyHandle, start_proxy

pytestmark = pytest.mark.integration

MASTER_KEY = "sk-twllm-integration-0123456789"
MOCK_TEXT = "hello from the mock"
INPUT_COST = 0.001
OUTPUT_COST = 0.002
START_TIMEOUT = 300.0  # generous: a busy 2-core CI machine has needed >120 s

HOOKS_PY = textwrap.dedent(
    '''
    """Loaded by the proxy from the config's folder (litellm resolves `module.attr` there first)."""
    import json
    import os

    from litellm.integrations.custom_logger import CustomLogger
    from litellm.proxy._types import ProxyException, UserAPIKeyAuth


    class Recorder(CustomLogger):
        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            slo = kwargs.get("standard_logging_object") or {}
            row = {
                "pid": os.getpid(),
                "response_cost": kwargs.get("response_cost"),
                "model_group": slo.get("model_group"),
                "prompt_tokens": slo.get("prompt_tokens"),
                "completion_tokens": slo.get("completion_tokens"),
            }
            with open(os.environ["TWLLM_TEST_CALLBACK_LOG"], "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\\n")


    recorder = Recorder()


    async def auth(request, api_key):
        if api_key == os.environ["TWLLM_TEST_MASTER_KEY"]:
            return UserAPIKeyAuth(api_key=api_key, user_id="integration-test")
        raise ProxyException(message="invalid api key", type="auth_error", param=None, code=401)
    '''
)


def _config(*, custom_auth: bool) -> str:
    text = textwrap.dedent(
        f"""\
        model_list:
          - model_name: demo
            litellm_params:
              model: hosted_vllm/demo
              api_base: http://127.0.0.1:9/v1
              mock_response: "{MOCK_TEXT}"
            model_info:
              input_cost_per_token: {INPUT_COST}
              output_cost_per_token: {OUTPUT_COST}
        litellm_settings:
          callbacks: twtest_hooks.recorder
        general_settings:
          master_key: os.environ/TWLLM_TEST_MASTER_KEY
        """
    )
    if custom_auth:
        text += "  custom_auth: twtest_hooks.auth\n"
    return text


@dataclass
class RunningProxy:
    handle: ProxyHandle
    startup_log: str
    callback_log: Path


def _start(
    tmp: Path, *, custom_auth: bool, workers: int, server: Literal["uvicorn", "gunicorn"] = "uvicorn"
) -> RunningProxy:
    (tmp / "twtest_hooks.py").write_text(HOOKS_PY, encoding="utf-8")
    config = tmp / "litellm_config.yaml"
    config.write_text(_config(custom_auth=custom_auth), encoding="utf-8")
    callback_log = tmp / "callbacks.jsonl"
    handle = start_proxy(
        config,
        env={"TWLLM_TEST_MASTER_KEY": MASTER_KEY, "TWLLM_TEST_CALLBACK_LOG": str(callback_log)},
        workers=workers,
        timeout=START_TIMEOUT,
        server=server,
        entry="litellm",  # LiteLLM's own command line: proves the dependency set of the bare proxy
    )
    return RunningProxy(handle=handle, startup_log=handle.log_text(), callback_log=callback_log)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """One uvicorn worker, LiteLLM's own master-key auth, a callbacks instance."""
    proxy = _start(tmp_path_factory.mktemp("proxy-single"), custom_auth=False, workers=1)
    with proxy.handle:
        yield proxy


@pytest.fixture(scope="module", params=["uvicorn"])
def multi(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """Two workers (uvicorn's supervisor, or gunicorn with --run_gunicorn) and custom_auth."""
    server = request.param
    if server == "gunicorn":
        pytest.importorskip("gunicorn", reason="--run_gunicorn needs the gunicorn package")
    proxy = _start(tmp_path_factory.mktemp(f"proxy-{server}"), custom_auth=True, workers=2, server=server)
    with proxy.handle:
        yield proxy


def _chat(base_url: str, headers: dict[str, str], **body: object) -> httpx.Response:
    payload = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(f"{base_url}/v1/chat/completions", json=payload, headers=headers, timeout=30, trust_env=False)


def _assert_clean_startup(log: str) -> None:
    for marker in ("Traceback", "ImportError", "ModuleNotFoundError", "No module named", "Child process"):
        assert marker not in log, f"{marker!r} in the proxy's startup log:\n{log[-4000:]}"


def _callback_rows(path: Path, want: int, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        if path.exists():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            if len(rows) >= want:
                return rows
        time.sleep(0.2)
    raise AssertionError(f"expected {want} callback rows in {path}, got {rows}")


# --- (a) no proprietary companion packages -------------------------------------------------------


@pytest.mark.parametrize(
    "dist, module", [("litellm-enterprise", "litellm_enterprise"), ("litellm-proxy-extras", "litellm_proxy_extras")]
)
def test_proprietary_litellm_packages_are_not_installed(dist: str, module: str) -> None:
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version(dist)
    assert importlib.util.find_spec(module) is None


def test_litellm_itself_is_mit() -> None:
    meta = importlib.metadata.metadata("litellm")
    assert "MIT" in (meta.get("License-Expression") or meta.get("License") or ""), meta.get_all("Classifier")


# --- (b) one worker, LiteLLM's master-key auth ----------------------------------------------------


def test_single_worker_starts_cleanly(single: RunningProxy) -> None:
    _assert_clean_startup(single.startup_log)
    r = httpx.get(f"{single.handle.base_url}/health/liveliness", timeout=5, trust_env=False)
    assert r.status_code == 200


def test_chat_completion_through_openai_client(single: RunningProxy) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(api_key=MASTER_KEY, base_url=f"{single.handle.base_url}/v1", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == MOCK_TEXT
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == MOCK_TEXT


def test_missing_key_is_401(single: RunningProxy) -> None:
    # 500 here means the `prisma` client package is missing (LiteLLM's error handler imports it).
    r = _chat(single.handle.base_url, {})
    assert r.status_code == 401, r.text


def test_wrong_key_is_rejected(single: RunningProxy) -> None:
    # Without a database LiteLLM answers a non-master key with 400 "No connected db." (1.108.7).
    r = _chat(single.handle.base_url, {"Authorization": "Bearer sk-not-the-master-key"})
    assert r.status_code in (400, 401), r.text
    assert MOCK_TEXT not in r.text


def test_callback_sees_hosted_vllm_cost_from_model_info(single: RunningProxy) -> None:
    r = _chat(single.handle.base_url, {"Authorization": f"Bearer {MASTER_KEY}"}, user="cost-check")
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    expected = usage["prompt_tokens"] * INPUT_COST + usage["completion_tokens"] * OUTPUT_COST
    rows = _callback_rows(single.callback_log, want=1)
    assert expected > 0
    assert any(row["response_cost"] == pytest.approx(expected) and row["model_group"] == "demo" for row in rows), rows


# --- (c) two workers, custom_auth ----------------------------------------------------------------


def test_two_workers_start_and_serve(multi: RunningProxy) -> None:
    _assert_clean_startup(multi.startup_log)
    worker_pids = set(re.findall(r"Started server process \[(\d+)\]", multi.startup_log))
    assert len(worker_pids) == 2, multi.startup_log[-4000:]
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    for _ in range(4):
        r = _chat(multi.handle.base_url, headers)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == MOCK_TEXT
    assert "Child process" not in multi.handle.log_text()  # uvicorn never had to respawn a worker


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-not-the-master-key"}], ids=["missing", "wrong"])
def test_custom_auth_rejects_with_401(multi: RunningProxy, headers: dict[str, str]) -> None:
    r = _chat(multi.handle.base_url, headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["message"] == "invalid api key"
