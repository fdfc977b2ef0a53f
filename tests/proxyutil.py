"""Start a real LiteLLM proxy for tests and stop it again.

Stdlib plus httpx only. ``start_proxy`` runs ``python -m litellm.proxy.proxy_cli`` with the
current interpreter (``sys.executable``) on a free 127.0.0.1 port, in its own process group, with
its output in a log file, and returns once the proxy answers ``/health/liveliness`` and every
worker has logged ``Application startup complete.``. ``ProxyHandle.stop()`` sends SIGTERM to the
whole group and SIGKILL 10 s later if anything is still alive.

Facts this relies on (litellm 1.108.7, see tests/integration/test_proxy_starts.py):

- ``LITELLM_LOCAL_MODEL_COST_MAP=True`` and ``LITELLM_OFFLINE_MODE=true`` keep the proxy from
  fetching a price list at start (and retrying for seconds when offline).
- Several uvicorn workers need ``--timeout_worker_healthcheck``: uvicorn pings each new worker
  and kills it after 5 s without an answer, but a worker spends longer than that importing the
  proxy on a small machine, so without the flag it is killed and respawned forever (only
  "Child process [N] died" in the log) while the first worker serves alone.
- ``--run_gunicorn`` (needs the ``gunicorn`` package) preloads the app once and forks workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import httpx

from twllm.runtime.ports import free_port

__all__ = ["ProxyHandle", "ProxyStartError", "free_port", "start_proxy"]

#: Always set in the proxy's environment (they win over ``env``).
FORCED_ENV: Mapping[str, str] = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_OFFLINE_MODE": "true",
    "OMP_NUM_THREADS": "1",
}

#: Each worker (uvicorn alone or under gunicorn) prints this once its startup event has finished.
STARTUP_COMPLETE = "Application startup complete."

STOP_GRACE_S = 10.0


class ProxyStartError(RuntimeError):
    """The proxy exited or did not become ready in time; the message ends with its log tail."""


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    # Nothing from the developer's shell that would change the proxy's behaviour leaks in.
    base = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TWLLM_")
        and name not in {"DATABASE_URL", "LITELLM_MASTER_KEY", "DEFAULT_NUM_WORKERS_LITELLM_PROXY"}
    }
    base["PYTHONUNBUFFERED"] = "1"
    base.update(env)
    base.update(FORCED_ENV)
    return base


class ProxyHandle:
    """A running proxy. ``stop()`` (or leaving the ``with`` block) ends its process group."""

    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int, log_path: Path) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://{host}:{port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _signal_group(self, sig: signal.Signals) -> bool:
        try:
            os.killpg(self.process.pid, sig)  # start_new_session=True: pgid == pid
            return True
        except ProcessLookupError:
            return False

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; returns the exit code."""
        if self._signal_group(signal.SIGTERM):
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.process.poll()
                if not self._group_alive():
                    break
                time.sleep(0.1)
            else:
                self._signal_group(signal.SIGKILL)
        try:
            return self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            return None

    def __enter__(self) -> ProxyHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ProxyHandle(pid={self.pid}, base_url={self.base_url!r}, log_path={str(self.log_path)!r})"


def start_proxy(
    config_path: Path,
    *,
    env: Mapping[str, str],
    workers: int = 1,
    timeout: float = 60,
    server: Literal["uvicorn", "gunicorn"] = "uvicorn",
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    entry: Literal["twllm", "litellm"] = "twllm",
) -> ProxyHandle:
    """Start the LiteLLM proxy on a free 127.0.0.1 port and wait until it serves.

    ``env`` is added to this process's environment (minus ``TWLLM_*``, ``DATABASE_URL`` and
    ``LITELLM_MASTER_KEY``); ``FORCED_ENV`` is applied last. The child runs in the config's folder
    so that ``callbacks`` / ``custom_auth`` modules next to the config are found. The log goes to
    ``log_path`` (default: ``proxy-<port>.log`` next to the config). Raises ``ProxyStartError``
    with the log tail if the proxy exits or is not ready within ``timeout`` seconds.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    config_path = Path(config_path).resolve()
    host = "127.0.0.1"
    port = free_port(host)
    log_path = Path(log_path) if log_path is not None else config_path.parent / f"proxy-{port}.log"

    if entry == "twllm":  # what the supervisor runs: the proxy app behind twllm's shield
        if server != "uvicorn" or extra_args:
            raise ValueError("twllm's gateway entry point takes no server choice or extra LiteLLM flags")
        argv = [
            sys.executable,
            "-m",
            "twllm.gateway.serve",
            "--config",
            str(config_path),
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        return _launch(argv, config_path, host, port, env, workers, timeout, log_path)
    argv = [
        sys.executable,
        "-m",
        "litellm.proxy.proxy_cli",
        "--config",
        str(config_path),
        "--host",
        host,
        "--port",
        str(port),
        "--num_workers",
        str(workers),
    ]
    if server == "gunicorn":
        argv.append("--run_gunicorn")
    elif workers > 1:
        argv += ["--timeout_worker_healthcheck", str(max(60, int(timeout)))]
    argv += list(extra_args)
    return _launch(argv, config_path, host, port, env, workers, timeout, log_path)


def _launch(
    argv: list[str],
    config_path: Path,
    host: str,
    port: int,
    env: Mapping[str, str],
    workers: int,
    timeout: float,
    log_path: Path,
) -> ProxyHandle:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=config_path.parent,
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    handle = ProxyHandle(process, host, port, log_path)
    try:
        _wait_ready(handle, workers=workers, timeout=timeout)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_ready(handle: ProxyHandle, *, workers: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = f"{handle.base_url}/health/liveliness"
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if not handle.alive():
                raise ProxyStartError(
                    f"LiteLLM proxy exited with code {handle.process.returncode} before it was ready "
                    f"({handle.log_path}):\n{handle.log_tail()}"
                )
            # Count startups in the log so that another server that happens to answer on this
            # port, or a first worker serving alone, does not count as ready.
            if handle.log_text().count(STARTUP_COMPLETE) >= workers:
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise ProxyStartError(
                    f"LiteLLM proxy not ready after {timeout:.0f} s ({handle.log_path}):\n{handle.log_tail()}"
                )
            time.sleep(0.25)
