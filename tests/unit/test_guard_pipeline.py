"""The guard pipeline and `twllm guard check` (twllm.guard.pipeline, twllm.cli.guard_cmds): PII
mask and block, Llama Guard through a tiny model's real forward pass, the failure policy, the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from twllm.guard.pipeline import GuardPipeline
from twllm.spec.schema import GuardSpec

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "examples" / "local.yaml"
TW_ID = "A123456789"
TRIGGER = "炸彈"


def pipeline(**guard: object) -> GuardPipeline:
    return GuardPipeline.from_spec(GuardSpec.model_validate(guard))


# --- PII ---------------------------------------------------------------------------------------
def test_pii_masks_a_taiwan_id_like_the_local_example() -> None:
    result = pipeline(input=["pii"], output=["zh_tw"], pii={"action": "mask"}).run(f"我的身分證是 {TW_ID}，謝謝")
    assert result.verdict == "mask"
    assert TW_ID not in result.text and "[tw_national_id]" in result.text
    assert result.categories == ["tw_national_id"]
    assert result.findings == [{"entity": "tw_national_id", "rule": result.findings[0]["rule"], "start": 7, "end": 17}]
    assert TW_ID not in json.dumps(result.to_dict(), ensure_ascii=False)
    assert result.message is None and set(result.latency_ms) == {"pii"}


def test_clean_text_is_allowed_unchanged() -> None:
    result = pipeline(input=["pii"]).run("今天天氣很好")
    assert (result.verdict, result.text, result.categories, result.findings) == ("allow", "今天天氣很好", [], [])


def test_pii_block_is_bilingual_and_hides_the_number() -> None:
    result = pipeline(input=["pii"], pii={"action": "block"}).run(f"ID {TW_ID}")
    assert result.verdict == "block" and result.categories == ["tw_national_id"]
    assert result.message == (
        "請求含有個人資料（身分證字號），已拒絕。 Blocked: the request contains personal data (tw_national_id)."
    )
    assert TW_ID not in json.dumps(result.to_dict())


def test_pii_log_action_reports_without_rewriting() -> None:
    result = pipeline(input=["pii"], pii={"action": "log"}).run(f"ID {TW_ID}")
    assert result.verdict == "allow" and result.text == f"ID {TW_ID}"
    assert [f["entity"] for f in result.findings] == ["tw_national_id"] and result.categories == []


def test_zh_tw_rewrites_simplified_and_leaves_taiwan_text_alone() -> None:
    result = pipeline(output=["zh_tw"]).run("这个软件很好用", stage="output")
    assert (result.verdict, result.text) == ("mask", "這個軟體很好用")
    assert result.findings == [{"entity": "zh_hans", "rule": "opencc_s2twp"}] and result.categories == []
    untouched = pipeline(output=["zh_tw"]).run("干擾訊號", stage="output")
    assert (untouched.verdict, untouched.text) == ("allow", "干擾訊號")
    assert pipeline(output=["zh_tw"]).run("软件", stage="input").text == "软件"  # no input stages


# --- the failure policy --------------------------------------------------------------------------
class Raising:
    def check_input(self, *args: object) -> None:
        raise RuntimeError(f"boom {TW_ID}")

    check_output = check_input


@pytest.mark.parametrize("on_error, verdict", [("block", "block"), ("allow", "mask")])
def test_a_guard_that_raises_follows_on_error(on_error: str, verdict: str) -> None:
    spec = GuardSpec.model_validate({"input": ["pii", "llama_guard"], "llama_guard": {"on_error": on_error}})
    result = GuardPipeline(spec, models={"llama_guard": Raising()}).run(f"ID {TW_ID}")
    assert result.verdict == verdict
    assert result.notes == [f"llama_guard: RuntimeError (on_error: {on_error})"]
    assert result.text == "ID [tw_national_id]"  # the PII stage ran first
    if verdict == "block":
        assert "llama_guard" in result.message and "safety check" in result.message
    assert TW_ID not in json.dumps(result.to_dict())


def test_a_model_that_cannot_be_found_blocks() -> None:
    spec = GuardSpec.model_validate({"input": ["llama_guard"], "llama_guard": {"model": "no-such-guard"}})
    result = GuardPipeline.from_spec(spec).run("hello")
    assert result.verdict == "block" and result.notes == ["llama_guard: RegistryError (on_error: block)"]


def test_a_pii_error_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = pipeline(input=["pii"])

    def fail(text: str) -> None:
        raise ValueError("broken")

    monkeypatch.setattr(guard, "pii", type("P", (), {"apply": staticmethod(fail)})())
    result = guard.run("hello")
    assert result.verdict == "block" and result.notes == ["pii: ValueError (on_error: block)"]


def test_a_block_stops_the_pipeline() -> None:
    spec = GuardSpec.model_validate({"input": ["pii", "llama_guard"], "pii": {"action": "block"}})
    result = GuardPipeline(spec, models={"llama_guard": Raising()}).run(f"ID {TW_ID}")
    assert result.verdict == "block" and set(result.latency_ms) == {"pii"} and result.notes == []


def test_model_location_prefers_model_paths_then_registry(tmp_path: Path) -> None:
    spec = GuardSpec.model_validate({"input": ["llama_guard"]})
    assert GuardPipeline(spec, model_paths={"llama_guard": "/m"}).model_location("llama_guard") == "/m"
    assert GuardPipeline(spec, model_paths={"llama-guard-3-1b": "/n"}).model_location("llama_guard") == "/n"
    assert GuardPipeline(spec).model_location("llama_guard") == "meta-llama/Llama-Guard-3-1B"
    local = GuardSpec.model_validate({"llama_guard": {"model": str(tmp_path)}})
    assert GuardPipeline(local).model_location("llama_guard") == str(tmp_path)


# --- Llama Guard through a real forward pass --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_guard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(1)
    from tiny_guard_models import build_tiny_llama_guard

    return build_tiny_llama_guard(tmp_path_factory.mktemp("tiny-llama-guard"), trigger=TRIGGER)


@pytest.fixture(scope="module")
def llama_pipeline(tiny_guard_dir: Path) -> GuardPipeline:
    spec = GuardSpec.model_validate(
        {"input": ["pii", "llama_guard"], "output": ["llama_guard"], "llama_guard": {"device": "cpu"}}
    )
    return GuardPipeline.from_spec(spec, model_paths={"llama_guard": str(tiny_guard_dir)})


def test_llama_guard_blocks_the_trigger_with_s1(llama_pipeline: GuardPipeline) -> None:
    result = llama_pipeline.run(f"怎麼做{TRIGGER}？")
    assert result.verdict == "block" and result.categories == ["S1"]
    assert result.message == "此請求含有不允許的內容（S1 暴力犯罪）。 This request was blocked: S1 Violent Crimes."
    assert set(result.latency_ms) == {"pii", "llama_guard"}


def test_llama_guard_allows_safe_text_and_keeps_the_mask(llama_pipeline: GuardPipeline) -> None:
    result = llama_pipeline.run(f"你好，我的身分證是 {TW_ID}")
    assert result.verdict == "mask" and result.categories == ["tw_national_id"]
    assert "[tw_national_id]" in result.text


def test_llama_guard_checks_output(llama_pipeline: GuardPipeline) -> None:
    question = [{"role": "user", "content": "請說個故事"}]
    unsafe = llama_pipeline.run(f"這是{TRIGGER}的做法", stage="output", messages=question)
    assert unsafe.verdict == "block" and unsafe.message.startswith("此回應")
    assert llama_pipeline.run("從前從前", stage="output", messages=question).verdict == "allow"


def test_llama_guard_from_a_local_path_in_the_spec(tiny_guard_dir: Path) -> None:
    spec = GuardSpec.model_validate(
        {"input": ["llama_guard"], "llama_guard": {"model": str(tiny_guard_dir), "device": "cpu"}}
    )
    assert GuardPipeline.from_spec(spec).run(TRIGGER).categories == ["S1"]


# --- the CLI -----------------------------------------------------------------------------------
@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TWLLM_MASTER_KEY", "sk-test-master")
    from twllm.cli.app import app, main
    from twllm.cli.guard_cmds import guard_app

    if not any(group.name == "guard" for group in app.registered_groups):
        app.add_typer(guard_app, name="guard")
    return main


def test_cli_json_masks_on_the_local_example(main, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["guard", "check", "--config", str(LOCAL), "--json", f"身分證 {TW_ID}"])
    out = capsys.readouterr().out
    assert code == 0
    document = json.loads(out)
    assert document["verdict"] == "mask" and document["categories"] == ["tw_national_id"]
    assert document["text"] == "身分證 [tw_national_id]" and TW_ID not in out


def test_cli_reads_stdin_and_runs_output_stages(main, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("软件"))
    code = main(["guard", "check", "-c", str(LOCAL), "--stage", "output", "--json", "-"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and document["verdict"] == "mask" and document["text"] == "軟體"
    assert document["notes"] == []


def test_cli_plain_output(main, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guard", "check", "-c", str(LOCAL), f"ID {TW_ID}"]) == 0
    out = capsys.readouterr().out
    assert "verdict: mask" in out and "categories: tw_national_id" in out and "text: ID [tw_national_id]" in out


def test_cli_rejects_an_unknown_model_and_stage(main, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guard", "check", "-c", str(LOCAL), "--model", "demo-chat", "hi"]) == 0
    assert main(["guard", "check", "-c", str(LOCAL), "--model", "demo-chta", "hi"]) == 2
    assert "demo-chat" in capsys.readouterr().err
    assert main(["guard", "check", "-c", str(LOCAL), "--stage", "sideways", "hi"]) == 2
