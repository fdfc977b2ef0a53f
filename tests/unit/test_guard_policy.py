"""Guard policy layering (gateway-wide < model < tenant) and the streamed output stages."""

from __future__ import annotations

import random

import pytest

from twllm.errors import SpecError
from twllm.guard.pipeline import GuardPipeline, GuardResult
from twllm.guard.policy import GuardPolicies, UnknownPolicy
from twllm.guard.streaming import OutputStream, StreamBlocked
from twllm.spec.resolve import parse_spec
from twllm.spec.schema import GuardSpec

TW_ID = "A123456789"
SPEC = """
name: layered
gateway: {master_key: "${TWLLM_MASTER_KEY}"}
guard:
  input: [pii]
  output: [pii, zh_tw]
  pii: {action: mask, entities: [tw_national_id, email]}
  zh_tw: {system_prompt: 用臺灣繁體中文回答。}
  policies:
    strict: {pii: {action: block}}
    silent: {input: [], output: []}
models:
  - {name: a, model: llama-3.2-1b-instruct}
  - {name: b, model: llama-3.2-1b-instruct, zh_tw: false, system_prompt: Be brief.}
  - {name: c, model: llama-3.2-1b-instruct, guard: {pii: {actions: {email: block}}}}
"""


def policies() -> GuardPolicies:
    return GuardPolicies.from_spec(parse_spec(SPEC, "layered.yaml", {"TWLLM_MASTER_KEY": "sk-k"}).spec)


def test_layers_replace_only_what_they_set() -> None:
    p = policies()
    assert p.resolve("a").output == ["pii", "zh_tw"] and p.resolve("b").output == ["pii"]
    c = p.resolve("c").pii
    assert c.action == "mask" and c.entities == ["tw_national_id", "email"] and c.actions == {"email": "block"}
    strict = p.resolve("c", "strict").pii
    assert strict.action == "block" and strict.entities == ["tw_national_id", "email"]
    assert p.resolve("a", "silent").input == [] and p.resolve(None).input == ["pii"]
    with pytest.raises(UnknownPolicy):
        p.resolve("a", "nope")


def test_system_prompts_and_activity() -> None:
    p = policies()
    assert p.system_prompt("a") == "用臺灣繁體中文回答。" and p.system_prompt("b") == "Be brief."
    assert p.active()
    assert not GuardPolicies.from_settings({"base": GuardSpec().model_dump(mode="json")}).active()


def test_the_same_text_gets_each_layers_verdict() -> None:
    p = policies()
    text = f"我是 {TW_ID}，信箱 a.b@example.com"
    assert GuardPipeline(p.resolve("a")).run(text).verdict == "mask"
    assert GuardPipeline(p.resolve("c")).run(text).verdict == "block"
    assert GuardPipeline(p.resolve("a", "strict")).run(text).verdict == "block"
    assert GuardPipeline(p.resolve("a", "silent")).run(text).verdict == "allow"


def test_policy_errors_name_the_field() -> None:
    bad = SPEC.replace("silent: {input: [], output: []}", "silent: {output: [prompt_guard]}")
    with pytest.raises(SpecError) as error:
        parse_spec(bad, "layered.yaml", {"TWLLM_MASTER_KEY": "sk-k"})
    assert "guard.policies.silent" in str(error.value) and "prompt_guard screens input only" in str(error.value)


# --- streams -------------------------------------------------------------------------------------


class Gate:
    """A stand-in Llama Guard (named so): unsafe when the text contains 炸彈."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    def check_output(self, messages, answer, excluded=()):
        from twllm.guard.llama_guard import GuardCheck, Verdict

        self.checked.append(answer)
        unsafe = "炸彈" in answer
        return GuardCheck(Verdict(safe=not unsafe, categories=("S1",) if unsafe else ()), 0.0, "")


def streamed(pipeline: GuardPipeline, text: str, window: int, rng: random.Random) -> tuple[str, GuardResult]:
    stream = OutputStream(pipeline, [{"role": "user", "content": "q"}], window)
    out, i = "", 0
    while i < len(text):
        n = rng.randint(1, 5)
        out += stream.feed(text[i : i + n])
        i += n
    out += stream.flush()
    return out, stream.result()


def test_streamed_output_equals_the_whole_text_result() -> None:
    spec = GuardSpec(output=["pii", "zh_tw"])
    rng = random.Random(7)
    texts = [
        f"联系 {TW_ID} 或 a.b@example.com，这个软件很好。",
        "干擾不要改，這是臺灣。",
        "plain `code` http://x.y/软件",
    ]
    for text in texts:
        whole = GuardPipeline(spec).run(text, "output")
        for _ in range(200):
            out, result = streamed(GuardPipeline(spec), text, 0, rng)
            assert out == whole.text and result.verdict == whole.verdict


def test_rewriting_stages_together_release_each_chunk_at_once() -> None:
    """pii then zh_tw: a chunk leaves as soon as both let it through, so an answer streamed token
    by token leaves token by token (pii holds an English word until the next space: it could be
    an e-mail's local part; zh_tw a Simplified phrase that may still grow)."""
    spec = GuardSpec(output=["pii", "zh_tw"])
    cases = [
        (list("這個軟體的資訊存放在伺服器上，使用者可以透過視訊會議討論專案進度。"), 2),  # decides at 個
        (
            [
                "这个",
                "软件",
                "的",
                "信息",
                "存储",
                "在",
                "服务器",
                "上",
                "，",
                "用户",
                "可以",
                "通过",
                "视频",
                "会议",
                "讨论",
                "。",
            ],
            3,
        ),
        (["The", " gateway", " routes", " each", " request", " to", " an", " engine", "."], 2),  # "engine." may go on
    ]
    for tokens, most_empty in cases:
        text = "".join(tokens)
        stream = OutputStream(GuardPipeline(spec), [], 0)
        released = [stream.feed(token) for token in tokens]
        assert sum(not r for r in released) <= most_empty, released
        assert stream.held <= 8
        assert "".join(released) + stream.flush() == GuardPipeline(spec).run(text, "output").text


def test_a_gate_holds_windows_and_stops_before_unsafe_text() -> None:
    gate = Gate()
    spec = GuardSpec(output=["llama_guard"])
    pipeline = GuardPipeline(spec, models={"llama_guard": gate})
    stream = OutputStream(pipeline, [{"role": "user", "content": "q"}], window=10)
    sent = stream.feed("這是一段正常的開頭。")  # 10 characters: one window, checked and released
    assert sent == "這是一段正常的開頭。" and gate.checked == ["這是一段正常的開頭。"]
    assert stream.feed("接下來") == ""  # held until the next window
    with pytest.raises(StreamBlocked) as blocked:
        stream.feed("是炸彈的做法和材料")
    assert blocked.value.result.categories == ["S1"] and "炸彈" not in stream.released
    assert blocked.value.result.text == "這是一段正常的開頭。"


def test_window_zero_checks_once_at_the_end() -> None:
    gate = Gate()
    pipeline = GuardPipeline(GuardSpec(output=["llama_guard"]), models={"llama_guard": gate})
    out, result = streamed(pipeline, "一二三四五六七八九十" * 5, 0, random.Random(1))
    assert out == "一二三四五六七八九十" * 5 and result.verdict == "allow" and len(gate.checked) == 1


def test_a_blocking_entity_in_a_stream_stops_it() -> None:
    pipeline = GuardPipeline(GuardSpec(output=["pii"], pii={"actions": {"tw_national_id": "block"}}))
    stream = OutputStream(pipeline, [], 0)
    with pytest.raises(StreamBlocked) as blocked:
        for piece in ["身分", f"證 {TW_ID[:4]}", f"{TW_ID[4:]} 後面", "還有字。"]:
            stream.feed(piece)
        stream.flush()
    assert blocked.value.result.categories == ["tw_national_id"] and TW_ID not in stream.released
