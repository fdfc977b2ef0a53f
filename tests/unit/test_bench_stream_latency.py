"""The pure helpers of benchmarks/stream_latency.py: SSE parsing, counting, percentiles, ratios."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "stream_latency.py"
spec = importlib.util.spec_from_file_location("stream_latency", PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules["stream_latency"] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)  # type: ignore[union-attr]


def test_sse_events_stop_at_done_and_skip_other_lines() -> None:
    lines = [": ping", "", 'data: {"a": 1}', "event: x", 'data:{"b": 2}', "data: [DONE]", 'data: {"c": 3}']
    assert list(bench.sse_events(lines)) == [{"a": 1}, {"b": 2}]


def test_stream_stats_counts_only_chunks_with_content() -> None:
    stats = bench.StreamStats(keep_pieces=True)
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "你"}}]},
        {"choices": [{"index": 0, "delta": {"content": None}}]},
        {"choices": [{"index": 0, "delta": {"content": "好"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]
    for at, event in enumerate(events):
        stats.add(event, at / 10)
    assert stats.ttft_s == 0.1
    assert (stats.content_chunks, stats.chunks, stats.text) == (2, 5, "你好")
    assert stats.pieces == ["你", "好"]
    assert (stats.completion_tokens, stats.finish_reason, stats.error) == (2, "length", None)


def test_stream_stats_notes_an_error_event() -> None:
    stats = bench.StreamStats()
    stats.add({"error": {"message": "blocked", "code": "400"}}, 0.2)
    assert stats.ttft_s is None and "blocked" in stats.error


def test_percentile_interpolates_like_numpy() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert bench.percentile(values, 50) == 25.0
    assert bench.percentile(values, 90) == pytest.approx(37.0)
    assert bench.percentile([5.0], 90) == 5.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_rotated_starts_each_round_at_the_next_target() -> None:
    assert [bench.rotated(bench.TARGETS, r)[0] for r in range(5)] == [*bench.TARGETS, bench.TARGETS[0]]
    assert sorted(bench.rotated(bench.TARGETS, 2)) == sorted(bench.TARGETS)


def sample(ttft: float, chunks: int, total: float, error: str | None = None) -> dict:
    return {
        "ttft_ms": ttft,
        "content_chunks": chunks,
        "total_ms": total,
        "chars": chunks,
        "completion_tokens": 200,
        "error": error,
    }


def test_summarize_leaves_out_failed_requests() -> None:
    out = bench.summarize([sample(10, 100, 1000), sample(30, 90, 3000), sample(999, 1, 1, error="HTTP 500")])
    assert (out["requests"], out["errors"]) == (3, 1)
    assert (out["ttft_p50_ms"], out["chunks_p50"], out["total_p50_ms"]) == (20, 95, 2000)
    assert bench.summarize([sample(1, 1, 1, error="x")]) == {"requests": 1, "errors": 1}


def test_ratios_against_litellm_and_engine() -> None:
    summary = {
        "zh": {
            "engine": bench.summarize([sample(20, 100, 900)]),
            "litellm": bench.summarize([sample(40, 100, 1000)]),
            "twllm": bench.summarize([sample(80, 95, 1100)]),
            "twllm+stages": bench.summarize([sample(100, 50, 1200)]),
        }
    }
    r = bench.ratios(summary)["zh"]
    assert r["twllm"]["ttft_p50_minus_litellm_ms"] == 40 and r["twllm"]["meets_ttft"]
    assert r["twllm"]["chunks_over_engine"] == 0.95 and r["twllm"]["meets_chunks"]
    assert r["twllm+stages"]["ttft_p50_minus_litellm_ms"] == 60 and not r["twllm+stages"]["meets_ttft"]
    assert r["twllm+stages"]["chunks_over_engine"] == 0.5 and not r["twllm+stages"]["meets_chunks"]


def test_the_steering_regexes_match_what_answer_check_accepts() -> None:
    english = " ".join(["the", "cat"] * 100)
    assert re.fullmatch(bench.ENGLISH_REGEX, english)
    assert bench.answer_check("en", english) == "english"
    chinese = "这件" * 100
    assert re.fullmatch(bench.CHINESE_REGEX, chinese)
    assert bench.answer_check("zh", chinese) == "simplified"
    assert bench.answer_check("zh", "這件" * 10) == "traditional"
    assert bench.answer_check("en", "hello world").startswith("unexpected")
