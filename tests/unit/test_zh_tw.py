"""twllm.zh_tw: Simplified → Taiwan Traditional conversion, Traditional left alone, streaming equality."""

from __future__ import annotations

import random
from importlib import resources

import opencc
import pytest
import yaml

from twllm.zh_tw import SEGMENT_CAP, StreamNormalizer, build_charsets, is_simplified, mainland_terms, normalize, phrases
from twllm.zh_tw.charsets import TRADITIONAL_ONLY
from twllm.zh_tw.normalize import BOUNDARIES, _Cutter, _tables, convert_prose, to_simplified
from twllm.zh_tw.terms import EXTRA_TERMS, MAINLAND_WORDS

SIMPLIFIED_TO_TAIWAN = [
    ("这个软件很好用。", "這個軟體很好用。"),
    ("请把信息发到我的邮箱。", "請把資訊發到我的信箱。"),
    ("我在网上看了一个视频。", "我在網上看了一個影片。"),
    ("服务器的内存不够了。", "伺服器的記憶體不夠了。"),
    ("打印机没有连上网络。", "印表機沒有連上網路。"),
    ("他是一名程序员，每天写代码。", "他是一名程式設計師，每天寫程式碼。"),
    ("我的硬盘坏了，数据库也打不开。", "我的硬碟壞了，資料庫也打不開。"),
    ("头发剪短以后，我发现后面有点翘。", "頭髮剪短以後，我發現後面有點翹。"),
    ("干扰很严重，信号不稳定。", "干擾很嚴重，訊號不穩定。"),
    ("我每天坐公交车上班。", "我每天坐公車上班。"),
    ("这款手机的产品质量很高。", "這款手機的產品品質很高。"),
    ("请先登录账号，再充值。", "請先登入帳號，再儲值。"),
    ("出租车司机很热情。", "計程車司機很熱情。"),
    ("我们的面试安排在下周。", "我們的面試安排在下週。"),
    ("身份证号码请填写完整。", "身分證號碼請填寫完整。"),
]

TAIWAN_SENTENCES = [
    "干擾訊號讓收音機一直有雜音。",
    "請到後面的櫃台排隊。",
    "面試安排在下週三上午十點。",
    "她剛剪了頭髮，看起來很有精神。",
    "我發現這個問題已經存在很久了。",
    "房間裡的冷氣好像壞掉了。",
    "台灣的夜市小吃非常有名。",
    "臺北市政府今天發布新的防疫規定。",
    "這款軟體支援多種語言。",
    "請把檔案存到隨身碟裡。",
    "週末我們一起去爬山好嗎？",
    "醫師說我需要多喝水、多休息。",
    "健保卡遺失可以線上申請補發。",
    "這家店的麵包每天早上現烤。",
    "天氣乾燥，記得多擦乳液。",
    "他把衣服曬在陽台上。",
    "梅雨季衣櫃容易發霉。",
    "我們下午三點在捷運站見面。",
    "這台電腦的記憶體只有八GB。",
    "颱風來了，學校停課一天。",
    "請問郵局幾點開門？",
    "外送平台的費用越來越貴了。",
    "我的機車駕照明年到期。",
    "老師在黑板上寫了一個很大的「後」字。",
    "這件事情裡面還有很多細節要確認。",
    "他一邊吃早餐一邊看新聞。",
    "皇后在故事裡是個重要的角色。",
    "這份報告的數據需要再核對一次。",
    "我們公司的伺服器放在新竹的機房。",
    "他幹勁十足，每天都第一個到辦公室。",
    "物體的質量不會因為位置改變。",
    "請用計算機算一下總共多少錢。",
    "門口的鞋櫃已經放滿了。",
    "中午要不要一起去吃牛肉麵？",
]


@pytest.mark.parametrize(("simplified", "taiwan"), SIMPLIFIED_TO_TAIWAN)
def test_simplified_becomes_taiwan_traditional_with_taiwan_phrasing(simplified: str, taiwan: str) -> None:
    assert is_simplified(simplified)
    assert normalize(simplified) == taiwan
    assert not is_simplified(taiwan)


@pytest.mark.parametrize("sentence", TAIWAN_SENTENCES)
def test_taiwan_traditional_passes_byte_identical(sentence: str) -> None:
    assert not is_simplified(sentence)
    assert normalize(sentence).encode() == sentence.encode()
    stream = StreamNormalizer()
    assert "".join(stream.feed(c) for c in sentence) + stream.flush() == sentence


def test_whole_taiwan_paragraph_is_untouched_even_where_s2twp_would_change_it() -> None:
    paragraph = "\n".join(TAIWAN_SENTENCES)
    assert opencc.OpenCC("s2twp").convert(paragraph) != paragraph  # the trap: 干擾 → 幹擾, 台 → 臺
    assert normalize(paragraph) == paragraph


def test_mixed_scripts_convert_only_the_simplified_segments() -> None:
    text = "干擾已經排除。这个软件的信息很完整！台灣的朋友都在用。"
    assert normalize(text) == "干擾已經排除。這個軟體的資訊很完整！台灣的朋友都在用。"
    lines = "第一行是台灣用語，後面沒問題\n第二行用了简体软件\n第三行又是繁體"
    assert normalize(lines) == "第一行是台灣用語，後面沒問題\n第二行用了簡體軟體\n第三行又是繁體"


def test_a_stray_simplified_character_in_a_traditional_sentence_is_fixed_alone() -> None:
    # Traditional-dominant segment: only the Simplified-only character changes; 干擾 survives.
    assert normalize("這個干擾問題在軟体更新後解決了。") == "這個干擾問題在軟體更新後解決了。"


def test_a_neutral_segment_follows_the_script_before_it() -> None:
    assert normalize("这是第一句。最后。") == "這是第一句。最後。"
    assert normalize("這是第一句。最后。") == "這是第一句。最后。"
    assert normalize("最后。") == "最后。"  # no script-specific character at all: left alone


def test_code_blocks_inline_code_urls_emails_and_identifiers_are_untouched() -> None:
    text = (
        "请访问 https://zh.wikipedia.org/wiki/软件?lang=zh 获取信息。\n"
        "用 `print('软件信息')` 测试，变量 ruan_jian_v2 不变。\n"
        "```python\n# 这是注释：软件信息\nx = '服务器'\n```\n"
        "发邮件到 ops.team@example.com 就好。"
    )
    assert normalize(text) == (
        "請訪問 https://zh.wikipedia.org/wiki/软件?lang=zh 獲取資訊。\n"
        "用 `print('软件信息')` 測試，變數 ruan_jian_v2 不變。\n"
        "```python\n# 这是注释：软件信息\nx = '服务器'\n```\n"
        "發郵件到 ops.team@example.com 就好。"
    )


def test_a_url_ends_where_chinese_prose_follows_it() -> None:
    assert normalize("详见https://example.com/docs了解更多信息。") == "詳見https://example.com/docs瞭解更多資訊。"


def test_simplified_only_inside_code_does_not_count() -> None:
    assert not is_simplified("看這段程式：\n```\n# 软件\n```\n以及 `信息`。")
    assert is_simplified("看這段程式：`x`，然后这样呢？")


def test_extra_terms_still_survive_s2twp() -> None:
    """Every extra entry must be needed: s2twp leaves its key as it is (else delete the entry)."""
    s2twp, t2s = opencc.OpenCC("s2twp"), opencc.OpenCC("t2s")
    for key, value in EXTRA_TERMS.items():
        assert s2twp.convert(t2s.convert(key)) == key, key
        assert not is_simplified(value) and mainland_terms(value) == [], value


def test_bare_mass_and_calculator_are_kept_collocations_of_quality_are_converted() -> None:
    assert normalize("物体的质量守恒。") == "物體的質量守恆。"
    assert normalize("这台计算机很好用。") == "這臺計算機很好用。"
    assert normalize("服务质量和睡眠质量都很高。") == "服務品質和睡眠品質都很高。"
    assert normalize("硬盘") == "硬碟"  # s2twp handles it: no extra entry needed


def test_mainland_terms_found_in_either_spelling_and_gone_after_normalize() -> None:
    assert mainland_terms("这个软件的视频") == ["软件", "视频"]
    assert mainland_terms("這個軟件的視頻") == ["軟件", "視頻"]
    assert mainland_terms("這個軟體的影片") == []
    assert mainland_terms("我坐公交車，`软件` 不算") == ["公交車"]
    for word in MAINLAND_WORDS:  # in a Simplified sentence (信息 alone is all shared characters)
        assert mainland_terms(normalize("这是" + opencc.OpenCC("t2s").convert(word) + "。")) == [], word


def test_normalize_is_idempotent_on_converted_text() -> None:
    for simplified, _ in SIMPLIFIED_TO_TAIWAN:
        once = normalize(simplified)
        assert normalize(once) == once


def test_an_undecided_segment_without_boundary_is_cut_at_the_cap() -> None:
    # 后 is shared by both scripts and s2twp would change it (後): held until the segment's
    # script is known, at most SEGMENT_CAP characters; with nothing Simplified before, kept.
    text = "后" * (SEGMENT_CAP + 50)
    stream = StreamNormalizer()
    early = stream.feed(text)
    assert early == "后" * SEGMENT_CAP and stream.deciding and stream.held == 50
    assert early + stream.flush() == normalize(text) == text


def test_a_long_simplified_run_is_released_but_its_last_character() -> None:
    text = "软" * (SEGMENT_CAP + 50)
    stream = StreamNormalizer()
    early = stream.feed(text)
    assert early == "軟" * (len(text) - stream.held) and stream.held <= 2  # 软 may start 软件
    assert early + stream.flush() == normalize(text) == "軟" * len(text)


def test_stream_holds_only_what_a_phrase_could_still_extend() -> None:
    stream = StreamNormalizer()
    assert stream.feed("这个软") == "這個"  # 软 waits: 软件 is one phrase
    assert stream.feed("件很好。然后") == "軟體很好。然"  # whole phrase converted, not 軟件
    assert stream.flush() == "後"  # 然 is 然 in every phrase that starts with it: sent early
    stream = StreamNormalizer()
    assert stream.feed("I use ") == "I use "  # Latin text and spaces pass at once
    assert stream.feed("pip_install") == "pip_install"  # so do an identifier's characters
    assert stream.feed("，然后") == "，然"  # 后 (後) waits: 然后 may still grow
    stream = StreamNormalizer()
    assert [stream.feed(c) for c in "服务器"] == ["", "", "伺服器"]  # 服务器 → 伺服器: 服 must wait


def test_a_segment_is_decided_by_its_first_script_specific_character() -> None:
    # Traditional first: only the Simplified-only characters after it are fixed (no phrasing).
    assert normalize("這个软件很好。") == "這個軟件很好。"
    # Simplified first, then a Taiwan word: s2twp up to the last cut before 擾/灣, character
    # fixes from there, so 干擾 and 台灣 survive.
    assert normalize("这个干擾很严重。") == "這個干擾很嚴重。"
    assert normalize("这是台灣的软件。") == "這是台灣的軟件。"
    # 著 is Traditional-only in OpenCC's tables but also written in Simplified (著名): it decides
    # nothing, and the segment is Simplified from 软 on.
    assert normalize("著名的软件很好用。") == "著名的軟體很好用。"


def test_traditional_text_is_released_at_once_once_decided() -> None:
    stream = StreamNormalizer()
    assert stream.feed("干") == ""  # s2twp would change 干: waits for the script
    assert stream.feed("擾") == "干擾"  # 擾 is Traditional-only: decided, released
    assert [stream.feed(c) for c in "已經排除"] == list("已經排除")
    assert stream.flush() == ""


def test_code_fence_state_crosses_chunks() -> None:
    stream = StreamNormalizer()
    out = stream.feed("好的。\n``")
    out += stream.feed("`py\n# 软件\n")
    assert out == "好的。\n```py\n# 软件\n"  # code lines are emitted as they complete
    out += stream.feed("``")
    out += stream.feed("`\n软件。")
    assert out + stream.flush() == "好的。\n```py\n# 软件\n```\n軟體。"


STREAM_PARTS = [
    "这个软件",
    "的信息",
    "。",
    "！",
    "？",
    "\n",
    "干擾",
    "後面",
    "台灣",
    "```",
    "```python\n",
    "`code`",
    "`",
    "``",
    "~~~",
    " ",
    "https://example.com/路径?q=软件",
    "http",
    "https:/",
    "foo.bar@example.com",
    "my_var",
    "abc123",
    "最后",
    "很好",
    "面包",
    "头发",
    "公交车",
    "产品质量",
    "x" * 50,
    "软" * 80,
    "\n```\n",
    "  ```\n",
    "物理的质量",
    "U盘",
    ";",
    "!",
    # phrase fragments, Traditional and shared characters, characters inside dictionary keys
    "著名",
    "软",
    "件",
    "公交",
    "车站",
    "质量",
    "问题",
    "用户",
    "服务器",
    "程序员",
    "打印机",
    "西红柿",
    "·",
    "-",
    "〇",
    "彼得·杰克逊",
    "里姆斯基-科萨科夫",
    "个",
    "這",
    "们",
    "后",
    "干",
    "台",
    "里",
    "计算机病毒",
    "https://x.y/软件/",
    "\uf900",
    "http://",
    "`软件`",
    "e-mail",
    "3.14",
    "ftp:",
    "h",
]


def test_streamed_output_equals_whole_text_for_random_chunkings() -> None:
    rng = random.Random(20240611)
    for _ in range(1500):
        text = "".join(rng.choice(STREAM_PARTS) for _ in range(rng.randint(1, 25)))
        want = normalize(text)
        for _ in range(2):
            stream, out, i = StreamNormalizer(), [], 0
            single = rng.random() < 0.2
            while i < len(text):
                size = 1 if single else rng.randint(1, 8)
                out.append(stream.feed(text[i : i + size]))
                i += size
            assert "".join(out) + stream.flush() == want, text


def test_streamed_output_equals_whole_text_for_every_split_point() -> None:
    rng = random.Random(7)
    for _ in range(300):
        text = "".join(rng.choice(STREAM_PARTS) for _ in range(rng.randint(1, 8)))
        want = normalize(text)
        for i in range(len(text) + 1):
            stream = StreamNormalizer()
            assert stream.feed(text[:i]) + stream.feed(text[i:]) + stream.flush() == want, (text, i)


def _keys() -> tuple[list[str], list[str]]:
    tables = _tables()
    return sorted(tables.segment_keys), sorted(tables.taiwan_keys)


def test_cutting_a_run_never_changes_its_conversion() -> None:
    """_Cutter's pieces, converted one by one, equal the whole run converted: checked on runs
    made of OpenCC phrase keys, their fragments and the extra terms (the hardest case: phrases
    overlapping at every position). 600,000 such runs passed when this was written."""
    segment, taiwan = _keys()
    extra = [to_simplified(key) for key in EXTRA_TERMS]
    rng = random.Random(11)

    def fragment() -> str:
        pick = rng.random()
        key = (
            rng.choice(segment)
            if pick < 0.7
            else to_simplified(rng.choice(taiwan))
            if pick < 0.85
            else rng.choice(extra)
        )
        i = rng.randint(0, len(key))
        return key[i : rng.randint(i, len(key))] if rng.random() < 0.5 else key

    for _ in range(4000):
        run = "".join(fragment() for _ in range(rng.randint(1, 10)))
        cutter, pieces = _Cutter(), []
        for char in run:
            pieces += [piece for piece, _, _ in cutter.push(char)]
        pieces += [piece for piece, _, _ in cutter.end()]
        assert "".join(pieces) == run
        assert "".join(map(convert_prose, pieces)) == convert_prose(run), (run, pieces)


def test_a_simplified_sentence_streams_to_its_whole_conversion() -> None:
    """What a stream sends early (characters every phrase that may follow converts alike) and in
    pieces adds up to `s2twp` + extra terms of the whole sentence."""
    segment, taiwan = _keys()
    rng = random.Random(13)
    checked = 0
    while checked < 1500:
        run = "这" + "".join(rng.choice(segment)[: rng.randint(1, 15)] for _ in range(rng.randint(1, 8)))
        if any(c.isascii() or c in BOUNDARIES or c in TRADITIONAL_ONLY for c in run):
            continue
        stream = StreamNormalizer()
        assert "".join(stream.feed(c) for c in run) + stream.flush() == convert_prose(run), run
        checked += 1


def _held_while_streaming(text: str, sizes) -> tuple[int, int, int]:
    """(most characters held while the segment's script was decided, most held while it was not,
    feeds that released nothing)."""
    stream, out, i, decided, deciding, empty = StreamNormalizer(), [], 0, 0, 0, 0
    while i < len(text):
        n = next(sizes)
        out.append(stream.feed(text[i : i + n]))
        i += n
        empty += not out[-1]
        if stream.deciding:
            deciding = max(deciding, stream.held)
        else:
            decided = max(decided, stream.held)
    assert "".join(out) + stream.flush() == normalize(text)
    return decided, deciding, empty


@pytest.mark.parametrize("chunking", ["char", "token"])
def test_stream_holds_a_few_characters_only(chunking: str) -> None:
    """A long Simplified answer, its Taiwan original and an English one, fed one character or one
    token-sized piece (1–3 characters) at a time: once a segment's script is decided at most a
    few characters wait (a phrase that may still grow); before, only the few characters `s2twp`
    would change; English never waits."""
    rng = random.Random(3)
    sizes = iter(lambda: 1 if chunking == "char" else rng.randint(1, 3), None)
    taiwan = "\n".join(p["prompt"] for p in _prompts())
    english = (
        "The gateway routes each request to a vLLM engine, counts tokens and spend per tenant, "
        "and screens prompts and answers; see https://example.com/docs?id=42 or ops@example.com. "
    ) * 8
    decided, deciding, empty = _held_while_streaming(to_simplified(taiwan), sizes)
    assert decided <= 6 and deciding <= 8, (decided, deciding)
    decided, deciding, empty = _held_while_streaming(taiwan, sizes)
    assert decided == 0 and deciding <= 8 and empty <= len(taiwan) * 0.02
    # English waits only inside "https://" (":/" may or may not start a URL) and at a "/" after
    # a word (a path may follow: "example.com/docs").
    assert _held_while_streaming(english, sizes)[:2] == (2, 0)
    assert _held_while_streaming(english.replace("https://", "at ").replace("/", " "), sizes) == (0, 0, 0)


def _prompts() -> list[dict]:
    return yaml.safe_load(resources.files("twllm.zh_tw").joinpath("prompts.yaml").read_text(encoding="utf-8"))[
        "prompts"
    ]


def test_builtin_prompts_are_many_taiwan_traditional_and_cover_five_categories() -> None:
    prompts = _prompts()
    assert len(prompts) >= 100
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert {p["category"] for p in prompts} == {
        "customer_service",
        "medical_documentation",
        "ecommerce",
        "public_services",
        "daily_life",
    }
    for prompt in prompts:
        assert set(prompt) == {"id", "category", "prompt"}
        assert not is_simplified(prompt["prompt"]), prompt["id"]
        assert normalize(prompt["prompt"]) == prompt["prompt"], prompt["id"]
        assert mainland_terms(prompt["prompt"]) == [], prompt["id"]


def test_shipped_charsets_match_the_installed_opencc_dictionaries() -> None:
    assert build_charsets.TARGET.read_text(encoding="utf-8") == build_charsets.render()


def test_shipped_phrase_keys_match_the_installed_opencc_dictionaries() -> None:
    assert build_charsets.shipped_phrase_data() == build_charsets.phrase_data()
    tables = _tables()
    assert len(tables.segment_keys) == phrases.SEGMENTATION_KEY_COUNT
    assert max(map(len, tables.segment_keys)) == phrases.MAX_SEGMENTATION_KEY == 15
