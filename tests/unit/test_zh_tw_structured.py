"""zh-TW normalisation of structured answers (issue 19): with response_format json_object or
json_schema, keys and the values a schema fixes never change, the answer still parses and
validates against the client's schema (checked with `jsonschema`), only free-text values are
normalised — whole and streamed; `guard.zh_tw.structured: off` leaves JSON answers alone; tool
calls are never normalised."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest

from twllm.guard.pipeline import GuardPipeline
from twllm.guard.streaming import OutputStream
from twllm.spec.schema import GuardSpec
from twllm.zh_tw.structured import (
    BOUNDED,
    KEEP,
    TEXT,
    JsonFormat,
    JsonStreamNormalizer,
    SchemaRules,
    json_format,
    normalize_json,
)

# A schema whose keys are Simplified words, with every kind of fixed value.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "软件名称": {"type": "string"},
        "状态": {"type": "string", "enum": ["进行中", "已完成"]},
        "类型": {"const": "软件"},
        "网址": {"type": "string", "format": "uri"},
        "代码": {"type": "string", "pattern": "^[\u4e00-\u9fff]+$"},
        "说明": {"type": "string"},
        "简称": {"type": "string", "maxLength": 4},
        "标签": {"type": "array", "items": {"type": "string"}},
        "唯一": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "级别": {"$ref": "#/$defs/级别"},
        "详情": {
            "type": "object",
            "properties": {"信息": {"type": "string"}, "数据类型": {"anyOf": [{"enum": ["软件"]}, {"type": "null"}]}},
            "additionalProperties": {"type": "string"},
        },
        "元组": {"type": "array", "prefixItems": [{"enum": ["软件"]}, {"type": "string"}]},
    },
    "patternProperties": {"^备注": {"type": "string"}},
    "required": ["软件名称", "状态", "类型"],
    "additionalProperties": False,
    "$defs": {"级别": {"type": "string", "enum": ["高级", "低级"]}},
}
ANSWER: dict[str, Any] = {
    "软件名称": "这个软件",
    "状态": "进行中",
    "类型": "软件",
    "网址": "https://例子.中国/软件",
    "代码": "软件信息",
    "说明": "信息很完整，见 https://zh.wikipedia.org/wiki/软件 。\n第二行：服务器软件",
    "简称": "软件信息",
    "标签": ["软件", "这个信息"],
    "唯一": ["软件", "軟體"],
    "级别": "高级",
    "详情": {"信息": "服务器信息", "数据类型": "软件", "其他": "这个视频"},
    "元组": ["软件", "这个软件"],
    "备注一": "这个软件的质量",
}
CHANGED = {  # the free-text values, in Taiwan Traditional
    "软件名称": "這個軟體",
    "说明": "資訊很完整，見 https://zh.wikipedia.org/wiki/软件 。\n第二行：伺服器軟體",
    "简称": "軟體資訊",  # maxLength 4: same length, so rewritten
    "标签": ["軟體", "這個資訊"],
    "详情": {"信息": "伺服器資訊", "数据类型": "软件", "其他": "這個影片"},
    "元组": ["软件", "這個軟體"],
    "备注一": "這個軟體的質量",
}


def keys(value: Any) -> list:
    if isinstance(value, dict):
        return [(k, keys(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [keys(v) for v in value]
    return []


@pytest.mark.parametrize("ascii_escapes", [False, True])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_schema_keys_and_fixed_values_never_change_and_it_still_validates(ascii_escapes, indent) -> None:
    jsonschema.validate(ANSWER, SCHEMA)
    text = json.dumps(ANSWER, ensure_ascii=ascii_escapes, indent=indent)
    out = normalize_json(text, JsonFormat(SCHEMA))
    document = json.loads(out)
    jsonschema.validate(document, SCHEMA)
    assert keys(document) == keys(ANSWER)  # every key, in order, byte for byte
    assert document == {**ANSWER, **CHANGED}
    assert ("\\u" in out) == ascii_escapes  # a changed value is written as the model wrote strings
    if not ascii_escapes:  # the text around the changed values is untouched
        assert out.replace("這個軟體", "这个软件", 1).startswith(text[: text.index("这个软件") + 4])


def test_json_object_every_string_value_is_free_text_but_keys_never_change() -> None:
    text = '{"软件": "这个软件", "列表": ["信息", "视频很好"], "数": 1.50, "空": null, "真": true}'
    out = normalize_json(text, JsonFormat())
    assert out == '{"软件": "這個軟體", "列表": ["信息", "影片很好"], "数": 1.50, "空": null, "真": true}'


def test_what_is_not_one_json_document_is_left_as_it_came() -> None:
    for text in ('好的，这是软件：{"a": 1}', '```json\n{"说明": "软件"}\n```', '{"说明": "软件"', ""):
        assert normalize_json(text, JsonFormat(SCHEMA)) == text


@pytest.mark.parametrize("ascii_escapes", [False, True])
def test_a_streamed_json_answer_equals_the_whole_one_wherever_it_is_cut(ascii_escapes) -> None:
    text = json.dumps(ANSWER, ensure_ascii=ascii_escapes, indent=1)
    want = normalize_json(text, JsonFormat(SCHEMA))
    for cut in range(len(text) + 1):
        stream = JsonStreamNormalizer(JsonFormat(SCHEMA))
        assert stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush() == want, cut
    rng = random.Random(5)
    for _ in range(50):
        stream, out, i = JsonStreamNormalizer(JsonFormat(SCHEMA)), [], 0
        while i < len(text):
            size = rng.randint(1, 7)
            out.append(stream.feed(text[i : i + size]))
            i += size
        assert "".join(out) + stream.flush() == want


def test_a_streamed_value_is_released_as_it_comes_not_held_to_its_end() -> None:
    stream = JsonStreamNormalizer(JsonFormat(SCHEMA))
    assert stream.feed('{"状态": "进行') == '{"状态": "进行'  # a key and a fixed value pass at once
    assert stream.feed('中", "说明": "这个软件很好，') == '中", "说明": "這個軟體很好，'
    assert stream.held <= 2
    assert stream.feed("信息") == "" and stream.feed('"}') == '資訊"}'


def test_surrogate_pairs_and_escapes_survive() -> None:
    text = json.dumps({"说明": '软件 😀 "引号" \\ 信息\t'}, ensure_ascii=True)
    out = normalize_json(text, JsonFormat())
    assert json.loads(out) == {"说明": '軟體 😀 "引號" \\ 資訊\t'}
    lone = '{"说明": "软件\\ud800信息"}'  # valid JSON with a lone surrogate: no text to convert
    assert normalize_json(lone, JsonFormat()) in (lone, '{"说明": "軟體\\ud800信息"}')


def test_schema_rules() -> None:
    rules = SchemaRules(SCHEMA)
    assert rules.rule(("软件名称",)) == TEXT and rules.rule(("状态",)) == KEEP and rules.rule(("级别",)) == KEEP
    assert rules.rule(("简称",)) == BOUNDED and rules.rule(("唯一", 0)) == KEEP and rules.rule(("元组", 0)) == KEEP
    assert rules.rule(("元组", 1)) == TEXT and rules.rule(("详情", "数据类型")) == KEEP
    assert rules.rule(("详情", "随便")) == TEXT and rules.rule(("备注二",)) == TEXT
    assert SchemaRules({"properties": {"a": {"$ref": "https://example.com/s.json"}}}).rule(("a",)) == KEEP
    assert SchemaRules({"properties": {"a": {"not": {"const": "x"}}}}).rule(("a",)) == KEEP
    assert SchemaRules({"const": {"a": "软件"}}).rule(("a",)) == KEEP
    assert SchemaRules({"if": {"properties": {"a": {"const": "软件"}}}}).rule(("a",)) == KEEP
    assert SchemaRules(None).rule(("anything", 3)) == TEXT


def test_request_formats() -> None:
    schema = {"type": "object"}
    assert json_format({"response_format": {"type": "json_object"}}) == JsonFormat()
    chat = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    assert json_format(chat) == JsonFormat(schema)
    responses = {"text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}}
    assert json_format(responses) == JsonFormat(schema)
    assert json_format({"response_format": {"type": "text"}}) is None and json_format({}) is None


def pipeline(structured: str = "values") -> GuardPipeline:
    return GuardPipeline(GuardSpec.model_validate({"output": ["zh_tw"], "zh_tw": {"structured": structured}}))


def test_the_pipeline_follows_zh_tw_structured() -> None:
    assert GuardSpec().zh_tw.structured == "values"
    text = json.dumps(ANSWER, ensure_ascii=False)
    result = pipeline().run(text, "output", structure=JsonFormat(SCHEMA))
    assert result.verdict == "mask" and json.loads(result.text) == {**ANSWER, **CHANGED}
    off = pipeline("off").run(text, "output", structure=JsonFormat(SCHEMA))
    assert off.verdict == "allow" and off.text == text
    assert pipeline("off").run("这个软件", "output").text == "這個軟體"  # plain answers as ever
    with pytest.raises(ValueError):
        GuardSpec.model_validate({"zh_tw": {"structured": "keys"}})


@pytest.mark.parametrize("structured", ["values", "off"])
def test_an_output_stream_follows_zh_tw_structured(structured: str) -> None:
    text = json.dumps(ANSWER, ensure_ascii=False)
    stream = OutputStream(pipeline(structured), [], 0, JsonFormat(SCHEMA))
    out = "".join(stream.feed(text[i : i + 3]) for i in range(0, len(text), 3)) + stream.flush()
    jsonschema.validate(json.loads(out), SCHEMA)
    assert out == (normalize_json(text, JsonFormat(SCHEMA)) if structured == "values" else text)
    assert stream.result().verdict == ("mask" if structured == "values" else "allow")


def test_tool_calls_are_never_normalised() -> None:
    """The gateway screens a choice's text only: tool-call names and arguments are left alone,
    while the text beside them is still normalised."""
    from twllm.guard.gateway import _screen_choices

    arguments = json.dumps({"查询": "这个软件的信息", "路径": "/软件/信息"}, ensure_ascii=False)
    call = SimpleNamespace(id="call_1", type="function", function=SimpleNamespace(name="搜索软件", arguments=arguments))
    message = SimpleNamespace(role="assistant", content="我来查询这个软件。", tool_calls=[call])
    only_call = SimpleNamespace(role="assistant", content=None, tool_calls=[call])
    choices = [SimpleNamespace(message=message), SimpleNamespace(message=only_call)]
    result = _screen_choices(pipeline(), choices, [])
    assert message.content == "我來查詢這個軟體。" and only_call.content is None
    assert call.function.name == "搜索软件" and call.function.arguments == arguments
    assert result.verdict == "mask"


def test_a_responses_answer_with_a_json_text_format_and_a_function_call() -> None:
    from twllm.guard import responses as responses_guard
    from twllm.guard.gateway import _combine

    text = json.dumps(ANSWER, ensure_ascii=False)
    call = {"type": "function_call", "name": "搜索软件", "arguments": '{"查询": "这个软件"}'}
    response = {
        "object": "response",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}, dict(call)],
    }
    fmt = json_format({"text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}})
    responses_guard.screen_response(pipeline(), response, [], _combine, fmt)
    assert json.loads(response["output"][0]["content"][0]["text"]) == {**ANSWER, **CHANGED}
    assert response["output"][1] == call
