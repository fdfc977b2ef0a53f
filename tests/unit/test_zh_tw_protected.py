"""zh-TW normalisation never breaks machine-readable text (issue 19): URLs and IRIs, e-mail
addresses, Markdown link and image targets, file paths, code, HTML/XML tags pass byte for byte,
whole and streamed however the stream is cut, while the Simplified prose around them is
normalised; and `twllm guard check --stage output` lists every rewrite and every kept span."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from twllm.zh_tw import StreamNormalizer, normalize
from twllm.zh_tw.normalize import changes, protected_spans
from twllm.zh_tw.spans import PROTECTED_CAP, RUN_CAP, TAG_CAP

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "examples" / "local.yaml"

# (kind, prose before, the protected span, prose after): the text is their concatenation.
CASES = [
    # URLs and IRIs: any scheme, Chinese in host, path, query or fragment, raw or percent-encoded
    ("url", "请看 ", "https://zh.wikipedia.org/wiki/软件", " 了解信息。"),
    ("url", "请看", "https://zh.wikipedia.org/wiki/软件", "，这个软件很好。"),
    ("url", "搜索 ", "https://www.google.com/search?q=软件信息&hl=zh-CN", " 获取结果。"),
    ("url", "跳到 ", "https://例子.中国/文档#历史记录", " 查看历史。"),
    ("url", "网址 ", "http://维基百科.中国/软件", " 很好。"),
    ("url", "链接 ", "https://zh.wikipedia.org/wiki/%E8%BD%AF%E4%BB%B6", " 很长，请复制。"),
    ("url", "参见", "https://zh.wikipedia.org/wiki/软件_(计算机)", "，信息很多。"),
    ("url", "下载 ", "ftp://文件.例子.中国/软件/下载.zip", " 即可。"),
    ("url", "打开 ", "vscode://file/用户/项目/软件.py", " 编辑。"),
    ("url", "写信 ", "mailto:user@例子.中国?subject=软件问题", " 联系我们。"),
    ("url", "访问 ", "www.例子.中国/软件", " 获取信息。"),
    ("url", "详见", "https://example.com/docs", "了解更多信息。"),
    ("url", "链接 <", "https://例子.中国/软件", "> 很好用。"),
    ("url", "见 ", "https://例子.中国/数据/v2数据.csv", " 这个文件。"),
    # e-mail addresses
    ("email", "发邮件到 ", "ops.team@example.com", " 就好。"),
    ("email", "邮件 ", "user@例子.中国", "，软件问题。"),
    ("email", "联系", "support@example.com", "获取信息。"),
    # Markdown link and image targets (the link text and alt text are prose)
    ("link_target", "点击[软件下载", "](https://例子.中国/软件/下载)", "获取信息。"),
    ("link_target", "见[说明", '](./文档/说明.md "软件说明")', "了解。"),
    ("link_target", "图：![软件截图", "](./图片/软件截图.png)", "很清楚。"),
    ("link_target", "跳转到[历史", "](#历史记录)", "一节。"),
    ("link_target", "参考[维基", "](https://zh.wikipedia.org/wiki/软件_(计算机))", "的条目。"),
    # file paths
    ("path", "配置文件位于", "/etc/软件/配置.conf", "，请修改。"),
    ("path", "运行 ", "./脚本/安装软件.sh", " 即可。"),
    ("path", "打开 ", "../文档/软件说明.md", " 阅读。"),
    ("path", "保存到 ", "~/下载/软件.zip", " 里，请检查。"),
    ("path", "路径 ", "C:\\用户\\软件\\信息.txt", " 不变。"),
    ("path", "文件 ", "docs/说明/软件.md", " 很重要，请阅读。"),
    ("path", "共享 ", "\\\\服务器\\软件\\安装包", " 可用，请安装。"),
    # fenced and inline code
    ("inline_code", "用 ", "`print('软件信息')`", " 测试。"),
    ("inline_code", "用 ", "``a `软件` b``", " 测试。"),
    ("code_block", "示例：\n", "```python\n# 这是注释：软件信息\nx = '服务器'\n```\n", "这个软件很好。"),
    ("code_block", "示例：\n", "~~~\n软件 信息\n~~~\n", "这个软件很好。"),
    # HTML/XML tags and attributes (the text between tags is prose)
    ("html_tag", "链接 ", '<a href="https://例子.中国/软件" title="软件信息">', "软件信息</a>"),
    ("html_tag", "软件信息", "</span>", "，这个软件。"),
    ("html_tag", "图片 ", '<img src="./图片/软件.png" alt="软件" />', " 显示。"),
    ("html_tag", "数据：", "<软件名称>", "这个软件</软件名称>"),
    ("html_tag", "样式 ", '<?xml-stylesheet href="样式/软件.xsl"?>', " 开始。"),
    ("html_tag", "按钮 ", "<button data-名称=软件 disabled>", "提交软件</button>"),
    ("html_tag", "这个软件：", "<!DOCTYPE html>", "开始。"),
    ("html_tag", "这个软件：", "<div\n  class=\"软件\"\n  id='信息'>", "内容。"),
]
IDS = [f"{kind}-{i}" for i, (kind, *_) in enumerate(CASES)]


@pytest.mark.parametrize(("kind", "before", "span", "after"), CASES, ids=IDS)
def test_a_protected_span_passes_byte_for_byte_and_the_prose_is_normalised(
    kind: str, before: str, span: str, after: str
) -> None:
    text = before + span + after
    # What the prose becomes around a plain ASCII word in the span's place (a protected cut too).
    prose = normalize(before + "QQQ" + after)
    assert prose != before + "QQQ" + after  # the prose around it is normalised
    assert normalize(text) == prose.replace("QQQ", span)
    assert (len(before), len(before) + len(span), kind) in protected_spans(text), protected_spans(text)


@pytest.mark.parametrize(("kind", "before", "span", "after"), CASES, ids=IDS)
def test_a_stream_cut_anywhere_never_rewrites_the_span(kind: str, before: str, span: str, after: str) -> None:
    """Two chunks, split at every index (so at every position inside the span), then one
    character at a time: the output is the whole text's, so the span is byte-identical and the
    prose normalised; what is held back stays bounded."""
    text = before + span + after
    whole = normalize(text)
    for cut in range(len(text) + 1):
        stream = StreamNormalizer()
        first = stream.feed(text[:cut])
        assert stream.held <= TAG_CAP
        assert first + stream.feed(text[cut:]) + stream.flush() == whole, cut
        assert whole.startswith(first)
    stream = StreamNormalizer()
    assert "".join(stream.feed(c) for c in text) + stream.flush() == whole


SPAN_PARTS = [
    "这个软件",
    "信息",
    "干擾",
    "。",
    "，",
    "\n",
    " ",
    "](",
    "]",
    "[",
    "(",
    ")",
    "<",
    ">",
    "/>",
    "</",
    "<a",
    ' href="',
    '"',
    "'",
    "=",
    "<!",
    "<?",
    "?>",
    "<!DOCTYPE",
    "/",
    "./",
    "../",
    "~/",
    "\\",
    "C:",
    ":",
    "//",
    "://",
    "http",
    "https://",
    "mailto:",
    "www.",
    "user@",
    "@",
    "例子.中国",
    ".",
    "docs",
    "v2",
    "#",
    "?q=",
    "&",
    "`",
    "```\n",
    "软件",
    "后",
    "面包",
    "x" * 30,
    "软" * 70,
]


def test_streams_of_span_fragments_equal_the_whole_text() -> None:
    """Random texts made of the pieces of protected spans and of prose, streamed in random chunks
    and cut in two at every index: always exactly the whole text's normalisation."""
    rng = random.Random(19)
    for _ in range(1500):
        text = "".join(rng.choice(SPAN_PARTS) for _ in range(rng.randint(1, 25)))
        want = normalize(text)
        stream, out, i = StreamNormalizer(), [], 0
        while i < len(text):
            size = rng.randint(1, 6)
            out.append(stream.feed(text[i : i + size]))
            i += size
        assert "".join(out) + stream.flush() == want, text
    for _ in range(250):
        text = "".join(rng.choice(SPAN_PARTS) for _ in range(rng.randint(1, 8)))
        want = normalize(text)
        for cut in range(len(text) + 1):
            stream = StreamNormalizer()
            assert stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush() == want, (text, cut)


NOT_PROTECTED = [
    ("软件/硬件都需要。", "軟體/硬體都需要。"),  # a slash between Chinese words is prose
    ("TCP/IP协议很重要。", "TCP/IP協議很重要。"),  # Chinese glued after a Latin path ends it
    ("如果 a<b 则软件更新。", "如果 a<b 則軟體更新。"),  # not a tag
    ("数组[软件] (信息)很好。", "陣列[軟體] (資訊)很好。"),  # "] (" is not a link target
    ("注释 <!-- 这个软件 --> 结束。", "註釋 <!-- 這個軟體 --> 結束。"),  # comments are for people
    ("邮件 support@example.com获取信息。", "郵件 support@example.com獲取資訊。"),
    ("等等...软件。", "等等...軟體。"),
]


@pytest.mark.parametrize(("text", "expected"), NOT_PROTECTED)
def test_look_alikes_in_prose_are_still_normalised(text: str, expected: str) -> None:
    assert normalize(text) == expected
    for cut in range(len(text) + 1):
        stream = StreamNormalizer()
        assert stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush() == expected


def test_hold_back_is_bounded_while_a_span_may_still_be_open() -> None:
    # A "<" that might open a tag is held at most TAG_CAP characters, then read as prose.
    text = "软件 <b " + "a " * TAG_CAP + "信息。"
    stream = StreamNormalizer()
    held = 0
    for char in text:
        stream.feed(char)
        held = max(held, stream.held)
    assert held <= TAG_CAP + 2 and stream.flush() is not None
    # Chinese glued to a URL's end waits only until its run ends (at most RUN_CAP characters).
    stream = StreamNormalizer()
    assert stream.feed("请看https://example.com/docs") == "請看https://example.com/docs"
    assert stream.feed("了解") == "" and stream.held == 2
    assert stream.feed("，好") + stream.flush() == "瞭解，好"
    # A link target streams out as it comes: nothing waits for its ")".
    stream = StreamNormalizer()
    assert stream.feed("[软件](https://例子.中国/软件") == "[軟體](https://例子.中国/软件"
    assert PROTECTED_CAP >= 2000 and RUN_CAP <= 64


def test_changes_list_every_rewrite_span_by_span() -> None:
    text = "请看 https://zh.wikipedia.org/wiki/软件 了解信息。這個干擾问题"
    found = changes(text)
    assert [(c.before, c.after) for c in found] == [("请", "請"), ("了", "瞭"), ("信息", "資訊"), ("问题", "問題")]
    rebuilt, pos = "", 0
    for c in found:
        assert text[c.start : c.end] == c.before
        rebuilt += text[pos : c.start] + c.after
        pos = c.end
    assert rebuilt + text[pos:] == normalize(text)
    assert changes("台灣的軟體。") == []


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TWLLM_MASTER_KEY", "sk-test-master")
    from twllm.cli.app import app, main
    from twllm.cli.guard_cmds import guard_app

    if not any(group.name == "guard" for group in app.registered_groups):
        app.add_typer(guard_app, name="guard")
    return main


def test_guard_check_shows_what_the_output_stage_changes_span_by_span(main, capsys, tmp_path: Path) -> None:
    text = '请看 https://zh.wikipedia.org/wiki/软件 了解信息。`代码` <a href="/软件">软件</a>'
    assert main(["guard", "check", "-c", str(LOCAL), "--stage", "output", text]) == 0
    out = capsys.readouterr().out
    assert "zh_tw changes: 4" in out and "38-40\t信息 → 資訊" in out
    assert "3-35\turl\thttps://zh.wikipedia.org/wiki/软件" in out and 'html_tag\t<a href="/软件">' in out
    assert main(["guard", "check", "-c", str(LOCAL), "--stage", "output", "--json", text]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["text"] == normalize(text)
    assert {"start": 38, "end": 40, "before": "信息", "after": "資訊"} in document["zh_tw"]["changes"]
    assert [s["kind"] for s in document["zh_tw"]["protected"]] == ["url", "inline_code", "html_tag", "html_tag"]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"properties": {"状态": {"enum": ["进行中", "已完成"]}}}), encoding="utf-8")
    answer = '{"状态": "进行中", "说明": "软件信息"}'
    args = ["guard", "check", "-c", str(LOCAL), "--stage", "output", "--json", "--response-format", str(schema)]
    assert main([*args, answer]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["text"] == '{"状态": "进行中", "说明": "軟體資訊"}'
    assert document["zh_tw"]["changes"] == [{"start": 21, "end": 25, "before": "软件信息", "after": "軟體資訊"}]
    kept = [(s["kind"], s["text"]) for s in document["zh_tw"]["protected"]]
    assert kept == [("json_key", '"状态"'), ("json_fixed_value", '"进行中"'), ("json_key", '"说明"')]
