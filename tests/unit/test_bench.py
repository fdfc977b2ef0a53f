"""twllm.bench without servers: stream timing, prompts, settings, summaries, the comparison table,
and the GPU benchmark's model builder in its --tiny form."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from twllm.bench import compare, report
from twllm.bench.load import FALLBACK_PROMPTS, LoadSettings, chat_body, load_prompts, read_stream, redact
from twllm.bench.runner import LOCUSTFILE, Load, locust_argv

REPO = Path(__file__).resolve().parents[2]


def sse(*events: object) -> list[bytes]:
    return [f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n".encode() for e in events]


def delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_read_stream_times_first_token_and_gaps_and_takes_tokens_from_usage():
    chunks = sse(
        delta(""),
        delta("你"),
        delta("好"),
        delta("嗎"),
        {"choices": [], "usage": {"completion_tokens": 4, "prompt_tokens": 9}},
        "[DONE]",
    )
    times = iter([1.0, 1.1, 1.15, 1.35, 1.4, 1.41])
    result = read_stream(chunks, started=0.9, clock=lambda: next(times))
    assert result.ttft_ms == pytest.approx(200.0)  # the empty first delta is not a token
    assert result.itl_ms == pytest.approx([50.0, 200.0])
    assert (result.output_tokens, result.prompt_tokens, result.text, result.done) == (4, 9, "你好嗎", True)


def test_read_stream_joins_events_split_across_chunks_and_reports_errors():
    raw = b"".join(sse(delta("a"), {"error": {"message": "boom"}}))
    pieces = [raw[:7], raw[7:30], raw[30:]]
    result = read_stream(pieces, started=0.0, clock=lambda: 1.0)
    assert result.text == "a" and result.output_tokens == 1  # no usage: chunks counted
    assert "boom" in (result.error or "") and not result.done


def test_prompts_builtin_file_and_fallback(tmp_path, monkeypatch):
    assert len(load_prompts("zh-tw")) >= 5
    path = tmp_path / "p.yaml"
    path.write_text("prompts:\n  - {id: a, category: x, prompt: 甲}\n  - {id: b, text: 乙}\n  - 丙\n", encoding="utf-8")
    assert load_prompts(str(path)) == ("甲", "乙", "丙")
    monkeypatch.setattr("twllm.bench.load.builtin_prompts_file", lambda: tmp_path / "absent.yaml")
    assert load_prompts("zh-tw") == FALLBACK_PROMPTS
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(str(tmp_path / "nope.yaml"))


def test_settings_bodies_and_locust_command_line_carry_no_secret(monkeypatch):
    settings = LoadSettings.from_options(
        {"models": "a, b", "max_tokens": "16", "stream": "off", "embeddings_model": "e", "prompt_set": "zh-tw"}
    )
    assert settings.models == ("a", "b") and not settings.stream and settings.work()[-1] == ("embed", "e")
    body = chat_body(settings, "a", "你好")
    assert body["max_tokens"] == 16 and body["ignore_eos"] and "stream" not in body
    streamed = chat_body(LoadSettings(models=("a",)), "a", "x")
    assert streamed["stream"] and streamed["stream_options"] == {"include_usage": True}
    with pytest.raises(ValueError):
        LoadSettings(models=())
    with pytest.raises(ValueError):
        Load(duration="30 seconds")
    argv = locust_argv("http://h/v1/", settings, Load(users=3, duration="1m30s"), Path("o/run"), Path("o/s.jsonl"))
    assert str(LOCUSTFILE) in argv and LOCUSTFILE.exists()
    assert argv[argv.index("--host") + 1] == "http://h/v1" and argv[argv.index("-u") + 1] == "3"
    assert "--api-key-env" in argv and not any(a.startswith("sk-") for a in argv)
    assert redact("bad key sk-secret-0123456789abc", "sk-secret-0123456789abc") == "bad key ***"


def sample(model: str, e2el: float, ok: bool = True, ttft: float | None = 10.0, tokens: int = 5) -> dict:
    return {
        "kind": "chat",
        "model": model,
        "ok": ok,
        "e2el_ms": e2el,
        "ttft_ms": ttft,
        "itl_ms": [2.0, 4.0],
        "tpot_ms": 3.0,
        "output_tokens": tokens,
        "error": None if ok else "HTTP 500",
    }


def test_summary_percentiles_rates_table_and_chart(tmp_path):
    assert report.percentile([1, 2, 3, 4], 50) == 2.5 and report.percentile([], 50) is None
    samples = [sample("m", float(v)) for v in range(1, 101)] + [sample("m", 999.0, ok=False)]
    (s,) = report.summarize(samples, duration_s=10.0)
    assert (s.requests, s.errors, s.output_tokens) == (101, 1, 500)
    assert s.latency_ms["e2el"]["p50"] == pytest.approx(50.5) and s.latency_ms["e2el"]["p99"] == pytest.approx(99.01)
    assert s.requests_per_s == 10.0 and s.output_tokens_per_s == 50.0 and s.error_rate == pytest.approx(1 / 101)
    text = report.table([s])
    assert "E2EL" in text and "TTFT" in text and "ITL" in text and "HTTP 500" in text
    png = report.chart([s], tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_comparison_ratios_and_table():
    def summary(e2el: float, tokens: int) -> report.ModelSummary:
        return report.summarize([sample("m", e2el, tokens=tokens)] * 10, 10.0)[0]

    targets = {n: compare.Target(n, f"http://{n}/v1", "m", "sk-x") for n in compare.TARGETS}
    result = compare.Comparison(
        targets,
        {
            "direct": summary(100, 10),
            "litellm": summary(200, 9),
            "twllm": summary(210, 9),
            "twllm+guard": summary(230, 8),
        },
        [],
        {"users": 4, "model": "m", "rounds": 1, "duration": "5s"},
        {"tenant_key_requests": 20, "ledger_rows": 20},
    )
    ratios = result.ratios()
    assert ratios["twllm"]["e2el_p50_vs_litellm"] == pytest.approx(1.05)
    assert ratios["twllm"]["toks_vs_direct"] == pytest.approx(0.9)
    text = compare.table(result)
    assert "ratios vs direct" in text and "ratios vs litellm" in text
    assert "1.050 (met)" in text and "0.900 (missed)" in text and "20 of 20" in text
    assert "sk-x" not in text and "sk-x" not in json.dumps(result.to_dict())


def test_random_llama_builder_has_llama31_8b_shape_and_tiny_model_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("build_random_llama", REPO / "benchmarks/gpu/build_random_llama.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert builder.parameter_count(builder.LLAMA31_8B) == builder.LLAMA31_8B_PARAMS == 8_030_261_248
    torch = pytest.importorskip("torch")  # the guard extra; CI installs it
    transformers = pytest.importorskip("transformers")
    info = builder.build(tmp_path / "tiny", tiny=True, say=lambda _line: None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert len(tokenizer) == model.config.vocab_size == info["vocab"]
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    ids = tokenizer("台北", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert isinstance(tokenizer.decode([model.config.vocab_size - 1]), str)  # padded ids decode to text
