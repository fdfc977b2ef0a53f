"""twllm.zh_tw: Simplified → Taiwan Traditional conversion, Traditional left alone, streaming equality."""

from __future__ import annotations

import random
from importlib import resources

import opencc
import pytest
import yaml

from twllm.zh_tw import SEGMENT_CAP, StreamNormalizer, is_simplified, mainland_terms, normalize
from twllm.zh_tw import build_charsets
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
    text = ("请访问 https://zh.wikipedia.org/wiki/软件?lang=zh 获取信息。\n"
            "用 `print('软件信息')` 测试，变量 ruan_jian_v2 不变。\n"
            "```python\n# 这是注释：软件信息\nx = '服务器'\n```\n"
            "发邮件到 ops.team@example.com 就好。")
    assert normalize(text) == (
        "請訪問 https://zh.wikipedia.org/wiki/软件?lang=zh 獲取資訊。\n"
        "用 `print('软件信息')` 測試，變數 ruan_jian_v2 不變。\n"
        "```python\n# 这是注释：软件信息\nx = '服务器'\n```\n"
        "發郵件到 ops.team@example.com 就好。")


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


def test_a_long_segment_without_boundary_is_cut_at_the_cap() -> None:
    text = "软" * (SEGMENT_CAP + 50)
    stream = StreamNormalizer()
    early = stream.feed(text)
    assert early == "軟" * SEGMENT_CAP  # emitted before any boundary arrived
    assert early + stream.flush() == normalize(text) == "軟" * (SEGMENT_CAP + 50)


def test_stream_holds_text_only_until_the_segment_ends() -> None:
    stream = StreamNormalizer()
    assert stream.feed("这个软") == ""
    assert stream.feed("件很好。然后") == "這個軟體很好。"  # whole phrase converted, not 軟件
    assert stream.feed("呢") == ""
    assert stream.flush() == "然後呢"


def test_code_fence_state_crosses_chunks() -> None:
    stream = StreamNormalizer()
    out = stream.feed("好的。\n``")
    out += stream.feed("`py\n# 软件\n")
    assert out == "好的。\n```py\n# 软件\n"  # code lines are emitted as they complete
    out += stream.feed("``")
    out += stream.feed("`\n软件。")
    assert out + stream.flush() == "好的。\n```py\n# 软件\n```\n軟體。"


STREAM_PARTS = [
    "这个软件", "的信息", "。", "！", "？", "\n", "干擾", "後面", "台灣", "```", "```python\n", "`code`", "`", "``",
    "~~~", " ", "https://example.com/路径?q=软件", "http", "https:/", "foo.bar@example.com", "my_var", "abc123", "最后",
    "很好", "面包", "头发", "公交车", "产品质量", "x" * 50, "软" * 80, "\n```\n", "  ```\n", "物理的质量", "U盘", ";", "!",
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
                out.append(stream.feed(text[i:i + size]))
                i += size
            assert "".join(out) + stream.flush() == want, text


def _prompts() -> list[dict]:
    return yaml.safe_load(resources.files("twllm.zh_tw").joinpath("prompts.yaml").read_text(encoding="utf-8"))["prompts"]


def test_builtin_prompts_are_many_taiwan_traditional_and_cover_five_categories() -> None:
    prompts = _prompts()
    assert len(prompts) >= 100
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert {p["category"] for p in prompts} == {
        "customer_service", "medical_documentation", "ecommerce", "public_services", "daily_life"}
    for prompt in prompts:
        assert set(prompt) == {"id", "category", "prompt"}
        assert not is_simplified(prompt["prompt"]), prompt["id"]
        assert normalize(prompt["prompt"]) == prompt["prompt"], prompt["id"]
        assert mainland_terms(prompt["prompt"]) == [], prompt["id"]


def test_shipped_charsets_match_the_installed_opencc_dictionaries() -> None:
    assert build_charsets.TARGET.read_text(encoding="utf-8") == build_charsets.render()
