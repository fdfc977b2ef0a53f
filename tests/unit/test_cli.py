"""The command line: exit codes, where output goes, and that secrets never leave the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import twllm
from twllm.cli.app import main

ROOT = Path(__file__).resolve().parents[2]
PROD = ROOT / "examples" / "prod.yaml"
LOCAL = ROOT / "examples" / "local.yaml"

MASTER_KEY = "sk-master-VALUE-3f9c1e"
DB_PASSWORD = "dbPASSWORD-7d2a"
DATABASE_URL = f"postgresql://twllm:{DB_PASSWORD}@db.internal:5432/twllm"

BAD_SPEC = textwrap.dedent("""\
    name: t
    gateway:
      master_key: ${TWLLM_MASTER_KEY}
    models:
      - name: chat
        model: llama-3.1-8b-instruct
        gpus: 0
""")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables the examples reference, with values easy to look for in output."""
    monkeypatch.setenv("TWLLM_MASTER_KEY", MASTER_KEY)
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("example", [PROD, LOCAL], ids=["prod", "local"])
def test_validate_examples(example: Path, env: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "validate", "-c", str(example))
    assert (code, err) == (0, "")
    assert "is valid" in out


def test_validate_json(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "validate", "-c", str(LOCAL), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["valid"] is True and doc["name"] == "twllm-local"
    assert [m["name"] for m in doc["models"]] == ["demo-chat", "all-minilm-l6-v2"]


def test_validate_malformed_spec(env: None, write_spec, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_spec(BAD_SPEC)
    code, out, err = cli(capsys, "validate", "-c", str(path))
    assert code == 2
    assert out == ""
    assert f"{path}:7 models[0].gpus: must be ≥ 1" in err
    assert "the spec is invalid (1 problem)" in err
    assert "Traceback" not in err


def test_validate_reports_every_problem(env: None, write_spec, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_spec(BAD_SPEC.replace("gateway:", "gateway:\n  port: 0"))
    code, _, err = cli(capsys, "validate", "-c", str(path))
    assert code == 2
    assert "(2 problems)" in err
    assert err.index(f"{path}:3 gateway.port") < err.index(f"{path}:8 models[0].gpus")


def test_validate_missing_file(env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.yaml"
    code, out, err = cli(capsys, "validate", "-c", str(path))
    assert code == 2
    assert f"{path}: file not found" in err
    assert "Traceback" not in err


def test_validate_without_the_master_key_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "validate", "-c", str(LOCAL))
    assert code == 2
    assert "gateway.master_key: environment variable TWLLM_MASTER_KEY is not set" in err


def test_plan_json_is_one_document(env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "plan", "-c", str(PROD), "--json", "--gpus", "8", "--state-dir", str(tmp_path))
    assert (code, err) == (0, "")
    doc = json.loads(out)  # the whole of stdout, so nothing else was printed there
    assert isinstance(doc, dict)
    assert doc["name"] == "twllm-prod"
    engine_models = sorted({m for e in doc["engines"] for m in e["models"]})
    assert engine_models == ["bge-m3", "llama-3.3-70b", "ministral-8b", "phi-4-mini", "taide-8b"]
    assert sorted({r["model_name"] for r in doc["routes"]}) == engine_models
    assert sum(r["model_name"] == "taide-8b" for r in doc["routes"]) == 2  # replicas: 2
    assert DB_PASSWORD not in out and MASTER_KEY not in out


def test_plan_text(env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "plan", "-c", str(PROD), "--gpus", "8", "--state-dir", str(tmp_path))
    assert (code, err) == (0, "")
    assert "taide-8b" in out and "GPUs planned: 8 of 8" in out
    assert DB_PASSWORD not in out and MASTER_KEY not in out


def test_plan_with_too_few_gpus(env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "plan", "-c", str(PROD), "--gpus", "2", "--state-dir", str(tmp_path))
    assert code == 2
    assert out == ""
    assert "need 8 GPU(s) but 2 are available" in err
    for need in (
        "taide-8b: 2 replica(s) × 1 GPU(s) = 2",
        "llama-3.3-70b: 1 replica(s) × 4 GPU(s) = 4",
        "ministral-8b: 1 replica(s) × 1 GPU(s) = 1",
        "bge-m3: 1 replica(s) × 1 GPU(s) = 1",
    ):
        assert need in err
    assert "phi-4-mini" not in err  # on the CPU, it needs no GPU
    assert "Traceback" not in err


def test_render_writes_files_without_secrets(env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    code, out, err = cli(
        capsys, "render", "-c", str(PROD), "--out", str(out_dir), "--gpus", "8", "--state-dir", str(tmp_path / "state")
    )
    assert (code, err) == (0, "")
    names = {"litellm_config.yaml", "gateway.json", "plan.json"}
    assert names <= {p.name for p in out_dir.iterdir()}
    texts = {p.name: p.read_text(encoding="utf-8") for p in out_dir.rglob("*") if p.is_file()}
    for name, text in texts.items():
        assert MASTER_KEY not in text, name
        assert DB_PASSWORD not in text, name
    assert "master_key: os.environ/TWLLM_MASTER_KEY" in texts["litellm_config.yaml"]
    json.loads(texts["gateway.json"])
    assert json.loads(texts["plan.json"])["name"] == "twllm-prod"
    assert MASTER_KEY not in out and DB_PASSWORD not in out


def test_render_is_stable(env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rendering twice gives byte-identical files (so they can be compared)."""
    outputs = []
    for run in ("a", "b"):
        code, _, _ = cli(
            capsys,
            "render",
            "-c",
            str(PROD),
            "--out",
            str(tmp_path / run),
            "--gpus",
            "8",
            "--state-dir",
            str(tmp_path / "state"),
        )
        assert code == 0
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).iterdir())})
    assert outputs[0] == outputs[1]


def test_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "schema")
    assert (code, err) == (0, "")
    schema = json.loads(out)
    assert "models" in schema["properties"]
    assert {"name", "gateway", "models"} <= set(schema.get("required", []))


def test_models_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "models", "list", "--json")
    assert code == 0
    entries = json.loads(out)
    assert len(entries) >= 22
    assert len({e["id"] for e in entries}) == len(entries)
    assert "llama-guard-3-1b" in {e["id"] for e in entries}


def test_models_list_by_task(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "models", "list", "--json", "--task", "embed")
    assert code == 0
    entries = json.loads(out)
    assert entries and {e["task"] for e in entries} == {"embed"}


def test_models_show(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "models", "show", "llama-guard-3-1b", "--json")
    assert code == 0
    entry = json.loads(out)
    assert entry["id"] == "llama-guard-3-1b"
    assert entry["task"] == "guard"
    assert entry["weight_gib"]


@pytest.mark.parametrize(
    ("model_id", "fragment"),
    [
        ("nope", "unknown model 'nope'"),
        ("llama-guard-3-b", "did you mean 'llama-guard-3-8b'?"),
    ],
)
def test_models_show_unknown(model_id: str, fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "models", "show", model_id)
    assert code == 2
    assert out == ""
    assert fragment in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--version")
    assert code == 0
    assert out.strip() == f"twllm {twllm.__version__}"


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "frobnicate")
    assert code == 2
    assert "No such command" in err
    assert "internal error" not in err


def test_missing_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "validate")
    assert code == 2
    assert "internal error" not in err


def test_unknown_command_is_not_success(capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever the code, an unknown command fails and shows no traceback."""
    code, out, err = cli(capsys, "frobnicate")
    assert code != 0
    assert "frobnicate" in err
    assert "Traceback" not in out + err


def _twllm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twllm", *args], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT
    )


def test_real_entry_point(write_spec) -> None:
    env = {**os.environ, "TWLLM_MASTER_KEY": MASTER_KEY}
    ok = _twllm("validate", "-c", str(LOCAL), env=env)
    assert (ok.returncode, ok.stderr) == (0, ""), ok.stderr
    assert "is valid" in ok.stdout

    path = write_spec(BAD_SPEC)
    bad = _twllm("validate", "-c", str(path), env=env)
    assert bad.returncode == 2
    assert f"{path}:7 models[0].gpus: must be ≥ 1" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert bad.stdout == ""


def test_table_cells_are_text_never_markup(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A tenant's display name like "[/]" or "[b]x" is data: a terminal table shows it as typed."""
    from rich.console import Console

    from twllm.cli import output

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    output.table(("name", "display name"), [("a", "[/]"), ("b", "[b]bold?[/b]")])
    shown = capsys.readouterr().out
    assert "[/]" in shown and "[b]bold?[/b]" in shown
