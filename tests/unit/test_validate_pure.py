"""`twllm validate` checks the spec, never the host: files, folders, ports, binaries and GPUs are
the runtime's preflight, which `twllm deploy` runs before anything starts."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from twllm.cli.app import main
from twllm.errors import RuntimeFailure, SpecError
from twllm.model_registry import load_registry
from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.runtime.control import preflight
from twllm.runtime.ports import free_port
from twllm.runtime.state import StateDir
from twllm.spec.resolve import LoadedSpec, is_local_folder, load_spec

MISSING = "/nonexistent/twllm-test/model"


def spec_text(models: str, guard: str = "") -> str:
    return (
        textwrap.dedent(f"""\
        name: t
        gateway: {{port: {free_port()}, master_key: "${{TWLLM_MASTER_KEY}}"}}
        engines: {{port_base: {free_port()}, vllm_python: {sys.executable}}}
        database: {{port: {free_port()}}}
        """)
        + guard
        + "models:\n"
        + models
    )


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    monkeypatch.setenv("TWLLM_MASTER_KEY", "sk-pure-test")

    def write(text: str) -> Path:
        path = tmp_path / "spec.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def preflight_problems(loaded: LoadedSpec, state: Path) -> str:
    plan = make_plan(loaded, GpuInventory(0, None, "test"), state)
    with pytest.raises(RuntimeFailure) as info:
        preflight(loaded, plan, StateDir(state))
    assert info.value.hint == "nothing was started or changed"
    return info.value.message


def validate(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["validate", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out + err


def test_a_missing_model_path_passes_validate_and_fails_preflight(
    write: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(spec_text(f"  - {{name: m, source: {{path: {MISSING}}}, device: cpu}}\n"))
    code, output = validate(capsys, path)
    assert (code, "is valid" in output) == (0, True), output
    message = preflight_problems(load_spec(path), tmp_path / "state")
    assert f"m: {MISSING} does not exist" in message


def test_a_guard_model_folder_is_checked_by_preflight_not_validate(
    write: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "guard-model"
    guard = f"guard: {{input: [llama_guard], llama_guard: {{model: {folder}}}}}\n"
    path = write(spec_text(f"  - {{name: m, source: {{path: {MISSING}}}, device: cpu}}\n", guard))
    code, output = validate(capsys, path)
    assert code == 0, output
    loaded = load_spec(path)
    assert loaded.local_folders == (("guard.llama_guard.model", str(folder)),)
    message = preflight_problems(loaded, tmp_path / "state")
    assert f"guard.llama_guard.model: {folder} is not a folder" in message
    folder.mkdir()
    assert "guard.llama_guard.model" not in preflight_problems(
        loaded, tmp_path / "state"
    )  # the model path is still missing


def test_missing_tls_files_fail_preflight(write: Callable[[str], Path], tmp_path: Path) -> None:
    text = spec_text(f"  - {{name: m, source: {{path: {MISSING}}}, device: cpu}}\n")
    text = text.replace('master_key: "', 'tls: {cert: tls/gw.pem, key: tls/gw.key}, master_key: "')
    loaded = load_spec(write(text))
    message = preflight_problems(loaded, tmp_path / "state")
    assert f"gateway.tls.cert: {tmp_path / 'tls' / 'gw.pem'} does not exist" in message
    assert f"gateway.tls.key: {tmp_path / 'tls' / 'gw.key'} does not exist" in message


def test_an_unknown_guard_model_that_is_no_path_is_still_a_spec_error(write: Callable[[str], Path]) -> None:
    guard = "guard: {input: [llama_guard], llama_guard: {model: llama-guard-3-1c}}\n"
    path = write(spec_text(f"  - {{name: m, source: {{path: {MISSING}}}, device: cpu}}\n", guard))
    with pytest.raises(SpecError, match="neither a model of this spec nor a registry id"):
        load_spec(path)


@pytest.mark.parametrize(
    ("ref", "folder"),
    [("/srv/guard", True), ("~/guard", True), ("./guard", True), ("models/guard", True), ("llama-guard-3-1b", False)],
)
def test_a_local_folder_is_told_by_its_shape(ref: str, folder: bool) -> None:
    assert is_local_folder(ref) is folder


def test_validate_touches_no_host_fact(
    write: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With every way to ask the host (does this file exist, is this port free, where is this
    binary, which GPUs) made to fail, validate still passes: it reads the spec file and nothing else."""
    guard = f"guard: {{input: [llama_guard], llama_guard: {{model: {tmp_path / 'no-guard'}}}}}\n"
    path = write(
        spec_text(
            f"  - {{name: m, source: {{path: {MISSING}}}, device: cpu}}\n"
            f"  - {{name: g, source: {{gguf: {MISSING}.gguf}}}}\n"
            "  - {name: big, model: llama-3.3-70b-instruct, tensor_parallel: 4}\n",
            guard,
        )
    )
    load_registry()  # the built-in catalog ships with twllm (cached): not a host fact
    asked: list[str] = []

    def refusing(target: Any, name: str) -> Callable[..., Any]:
        original = getattr(target, name)

        def refuse(*args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], (str, os.PathLike)) and Path(args[0]) == path:
                return original(*args, **kwargs)  # the spec file itself: validate reads it
            asked.append(f"{name}{args[:2]!r}")
            raise AssertionError(f"validate asked the host: {name}{args[:2]!r}")

        return refuse

    for target, name in [
        (Path, "exists"),
        (Path, "is_dir"),
        (Path, "is_file"),
        (os.path, "exists"),
        (os.path, "isdir"),
        (os.path, "isfile"),
        (os, "access"),
        (shutil, "which"),
        (socket, "socket"),
        (subprocess, "Popen"),
        (ctypes, "CDLL"),
    ]:
        monkeypatch.setattr(target, name, refusing(target, name))
    code, output = validate(capsys, path)
    monkeypatch.undo()
    assert (asked, code) == ([], 0), output
