"""`twllm eval zh-tw` against a fake OpenAI endpoint on loopback: scoring, files, errors, no key leaks."""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from twllm.cli.app import main
from twllm.zh_tw.evaluate import PromptsFileError, load_prompts, parse_prompts
from twllm.zh_tw.report import percentile

KEY = "sk-fake-eval-key-0123456789"
FAKE_ANSWERS = {
    "p-simplified": "这个软件的视频很清楚。",  # Simplified, mainland terms; both fixed by normalize
    "p-taiwan": "這個軟體的影片很清楚。",  # already Taiwan Traditional
    "p-neutral": "信息。",  # mainland term in shared characters: survives
    "p-broken": None,  # the fake answers HTTP 500
}
PROMPTS_YAML = "prompts:\n" + "".join(
    f"  - {{id: {pid}, category: daily_life, prompt: 請回答。}}\n" for pid in FAKE_ANSWERS
)


class FakeOpenAI(BaseHTTPRequestHandler):
    """A fake endpoint: answers chat completions from FAKE_ANSWERS by the prompt id in the request."""

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, document: object) -> None:
        body = json.dumps(document, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
        self._send(200, {"object": "list", "data": [{"id": "fake-chat"}, {"id": "fake-other"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        order = self.server.order  # type: ignore[attr-defined]
        with self.server.lock:  # type: ignore[attr-defined]
            pid = order[self.server.seen[request["model"]] % len(order)]  # type: ignore[attr-defined]
            self.server.seen[request["model"]] += 1  # type: ignore[attr-defined]
        answer = FAKE_ANSWERS[pid]
        if answer is None:
            return self._send(500, {"error": {"message": f"boom, auth was {self.headers.get('Authorization')}"}})
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})


@pytest.fixture
def fake_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    server.order, server.lock = list(FAKE_ANSWERS), threading.Lock()  # type: ignore[attr-defined]
    server.seen = {"fake-chat": 0, "fake-other": 0}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_scores_each_answer_before_and_after_and_writes_files(fake_endpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KEY", KEY)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(PROMPTS_YAML, encoding="utf-8")
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "zh-tw",
            "--endpoint",
            fake_endpoint,
            "--model",
            "fake-chat",
            "--model",
            "fake-other",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--api-key-env",
            "FAKE_KEY",
            "--concurrency",
            "1",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    (chat, other) = document["models"]
    assert chat["model"] == "fake-chat" and other["model"] == "fake-other"
    assert (chat["prompts"], chat["answers"], chat["errors"]) == (4, 3, 1)
    assert chat["simplified_before"] == pytest.approx(1 / 3)
    assert chat["simplified_after"] == 0
    assert chat["mainland_before"] == pytest.approx(2 / 3)  # 软件/视频 and 信息
    assert chat["mainland_after"] == pytest.approx(1 / 3)  # 信息 alone is not detected as Simplified
    assert chat["latency_p50_ms"] > 0

    with (out / "zh_tw_eval.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    first = rows[0]
    assert (first["prompt_id"], first["simplified_before"], first["simplified_after"]) == ("p-simplified", "1", "0")
    assert first["mainland_terms_before"] == "软件;视频" and first["mainland_terms_after"] == ""
    assert first["answer_normalized"] == "這個軟體的影片很清楚。"
    broken = rows[3]
    assert broken["ok"] == "0" and broken["error"].startswith("HTTP 500")
    summary = list(csv.DictReader((out / "zh_tw_summary.csv").open(encoding="utf-8")))
    assert [row["model"] for row in summary] == ["fake-chat", "fake-other"]
    assert (out / "zh_tw_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in out.iterdir():
        assert KEY not in path.read_bytes().decode("utf-8", errors="replace"), path  # the 500 echoed it
    assert KEY not in captured.out + captured.err


def test_unknown_model_is_a_usage_error_with_a_suggestion(fake_endpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TWLLM_MASTER_KEY", KEY)
    code = main(["eval", "zh-tw", "--endpoint", fake_endpoint + "/v1", "--model", "fake-chta", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "model 'fake-chta' is not served" in err and "did you mean 'fake-chat'" in err
    assert not (tmp_path / "zh_tw_eval.csv").exists()


def test_a_refused_key_is_named_by_its_variable_not_shown(fake_endpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TWLLM_MASTER_KEY", "sk-wrong-secret-key")
    code = main(["eval", "zh-tw", "--endpoint", fake_endpoint, "--model", "fake-chat", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "refused the API key" in err and "sk-wrong-secret-key" not in err


def test_malformed_prompts_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts:\n  - id: a\n    category: x\n    prompt: ok\n  - id: [b\n", encoding="utf-8")
    code = main(["eval", "zh-tw", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--prompts", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:" in err and "not valid YAML" in err
    assert f"{bad}:6" in err or f"{bad}:5" in err


def test_prompt_entries_are_checked_with_their_line():
    with pytest.raises(PromptsFileError, match=r"f\.yaml:3: prompts\[1\]\.prompt: required"):
        parse_prompts("prompts:\n  - {id: a, category: c, prompt: 好}\n  - {id: b, category: c}\n", "f.yaml")
    with pytest.raises(PromptsFileError, match=r"f\.yaml:3: prompts\[1\]\.id: 'a' is used twice"):
        parse_prompts(
            "prompts:\n  - {id: a, category: c, prompt: 好}\n  - {id: a, category: c, prompt: 好}\n", "f.yaml"
        )
    with pytest.raises(PromptsFileError, match=r"unknown key 'promt' \(did you mean 'prompt'\?\)"):
        parse_prompts("prompts:\n  - {id: a, category: c, promt: 好}\n", "f.yaml")
    with pytest.raises(PromptsFileError, match="cannot read the prompts file"):
        load_prompts(Path("/nonexistent/prompts.yaml"))


def test_builtin_prompts_load():
    prompts = load_prompts()
    assert len(prompts) >= 100 and prompts[0].id == "cs-001"


def test_percentile_is_nearest_rank():
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile([float(i) for i in range(1, 11)], 0.9) == 9.0
    assert percentile([7.0], 0.9) == 7.0
