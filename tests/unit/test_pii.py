"""Taiwan PII: checksums, formats, keywords, full-width folding, boundaries, masking, policies
and streaming (twllm.guard.pii, twllm.guard.tw_ids)."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from twllm.guard import pii
from twllm.guard.pii import (
    CONTEXT,
    ENTITIES,
    MAX_READ,
    PLACEHOLDERS,
    PLACEHOLDERS_ZH,
    Finding,
    PiiPolicy,
    StreamMasker,
    detect,
    fold,
    mask,
)
from twllm.guard.tw_ids import business_id_ok, id_kind, luhn_ok

# --- independent reference implementations, to compute valid examples -------------------------
# Letter values in their usual listing order: A=10 … H=17, J=18 … V=29, X=30, Y=31, W=32, Z=33,
# I=34, O=35.
ID_LETTER_ORDER = "ABCDEFGHJKLMNPQRSTUVXYWZIO"


def id_check_digit(prefix9: str) -> str:
    """The 10th character that makes letter + second char + 7 digits a valid ID."""
    value = 10 + ID_LETTER_ORDER.index(prefix9[0])
    second = prefix9[1]
    second_value = int(second) if second.isdigit() else (10 + ID_LETTER_ORDER.index(second)) % 10
    numbers = [value // 10, value % 10, second_value] + [int(c) for c in prefix9[2:]]
    total = sum(w * n for w, n in zip((1, 9, 8, 7, 6, 5, 4, 3, 2, 1), numbers))
    return str((10 - total % 10) % 10)


def make_id(prefix9: str) -> str:
    return prefix9 + id_check_digit(prefix9)


def business_sum(number: str) -> int:
    products = [int(d) * w for d, w in zip(number, (1, 2, 1, 2, 1, 2, 4, 1))]
    return sum(sum(int(c) for c in str(p)) for p in products)


def luhn_complete(body: str) -> str:
    """body + the Luhn check digit."""
    for d in "0123456789":
        digits = [int(c) for c in body + d][::-1]
        total = sum(n if i % 2 == 0 else sum(divmod(n * 2, 10)) for i, n in enumerate(digits))
        if total % 10 == 0:
            return body + d
    raise AssertionError


def spans(text: str, entities=pii.ALL) -> list[tuple[str, str]]:
    return [(f.entity, text[f.start : f.end]) for f in detect(text, entities)]


# --- national ID and resident numbers ---------------------------------------------------------
def test_known_public_example_is_a_valid_national_id() -> None:
    assert id_kind("A123456789") == "citizen"
    assert spans("身分證字號A123456789") == [("tw_national_id", "A123456789")]


@pytest.mark.parametrize("letter", list(ID_LETTER_ORDER))
@pytest.mark.parametrize("sex", ["1", "2"])
def test_national_id_checksum_every_letter(letter: str, sex: str) -> None:
    valid = make_id(letter + sex + "2345678")
    assert id_kind(valid) == "citizen"
    assert id_kind(valid.lower()) == "citizen"
    for wrong in set("0123456789") - {valid[-1]}:
        assert id_kind(valid[:-1] + wrong) is None


@pytest.mark.parametrize("second", ["8", "9"])
def test_new_resident_number(second: str) -> None:
    valid = make_id("F" + second + "0123456")
    assert id_kind(valid) == "resident_new"
    assert spans(f"居留證號碼{valid}。") == [("tw_resident_id", valid)]
    assert spans(f"居留證號碼{valid[:-1]}{(int(valid[-1]) + 1) % 10}。") == []
    assert id_kind("A800000014") == "resident_new"  # worked by hand: 1+64+1+4 = 70


@pytest.mark.parametrize("second", ["A", "B", "C", "D"])
def test_old_resident_number(second: str) -> None:
    valid = make_id("T" + second + "1234567")
    assert id_kind(valid) == "resident_old"
    assert spans(f"ARC: {valid}") == [("tw_resident_id", valid)]
    broken = valid[:-1] + str((int(valid[-1]) + 5) % 10)
    assert id_kind(broken) is None and spans(f"ARC: {broken}") == []


@pytest.mark.parametrize("value", ["A323456789", "AE12345678", "1A23456789", "A12345678", "A1234567890"])
def test_id_wrong_shapes(value: str) -> None:
    assert id_kind(value) is None


def test_citizen_and_resident_entities_are_separate() -> None:
    resident = make_id("A8" + "1234567")
    text = f"A123456789 與 {resident}"
    assert spans(text, ["tw_national_id"]) == [("tw_national_id", "A123456789")]
    assert spans(text, ["tw_resident_id"]) == [("tw_resident_id", resident)]


# --- 統一編號 ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("number", "valid"),
    [
        ("04595257", True),  # sum 40: valid under the old and the new rule
        ("04595252", True),  # sum 35: valid only since the divisible-by-5 rule
        ("04595253", False),  # sum 36
        ("10458575", True),  # 7th digit 7, sum 30
        ("10458574", True),  # 7th digit 7, sum 29: valid because sum + 1 = 30
        ("10458573", False),  # 7th digit 7, sum 28: neither 28 nor 29
        ("04595251", False),  # sum 34: sum + 1 would do, but the 7th digit is not 7
        ("0459525", False),
        ("0459525a", False),
    ],
)
def test_business_id_rules(number: str, valid: bool) -> None:
    if number.isdigit() and len(number) == 8:
        total = business_sum(number)
        expected = total % 5 == 0 or (number[6] == "7" and (total + 1) % 5 == 0)
        assert expected is valid  # the table agrees with the reference computation
    assert business_id_ok(number) is valid


def test_business_id_in_text() -> None:
    assert spans("公司統編：04595257，謝謝") == [("tw_business_id", "04595257")]
    assert spans("統編 04595253") == []
    assert spans("訂單 104595257") == []  # 9 digits: not an 8-digit number


def test_business_id_agrees_with_reference_on_random_numbers() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        n = "".join(rng.choice("0123456789") for _ in range(8))
        total = business_sum(n)
        assert business_id_ok(n) is (total % 5 == 0 or (n[6] == "7" and (total + 1) % 5 == 0))


# --- payment cards ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "378282246310005",
        "3782 822463 10005",
        "5555555555554444",
        "3530111333300000",
        "6011000990139424",
    ],
)
def test_valid_cards(card: str) -> None:
    digits = card.replace(" ", "").replace("-", "")
    assert luhn_ok(digits)
    assert spans(f"卡號{card}。") == [("credit_card", card)]


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111112",
        "4111 1111 1111 1112",
        "378282246310006",
        "1111111111111117",  # Luhn-valid, but no card network starts with 1
        "4111 1111 1111 1111 1111 1111",  # 24 digits in groups
        "41111111111111110000",
    ],  # 20 digits
)
def test_invalid_cards(card: str) -> None:
    assert "credit_card" not in [e for e, _ in spans(f"卡號 {card} 。")]


def test_luhn_one_digit_off_is_refused_for_every_position() -> None:
    valid = luhn_complete("453201511283036")
    assert luhn_ok(valid)
    for i in range(len(valid)):
        changed = valid[:i] + str((int(valid[i]) + 1) % 10) + valid[i + 1 :]
        assert not luhn_ok(changed)
        assert spans(changed, ["credit_card"]) == []


# --- phones -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "phone",
    [
        "0912345678",
        "0912-345-678",
        "0912 345 678",
        "0912-345678",
        "+886912345678",
        "+886 912 345 678",
        "+886-912-345-678",
        "+886 (0)912 345 678",
        "00886912345678",
        "(02)2345-6789",
        "(02) 2345 6789",
        "02-2345-6789",
        "0223456789",
        "+886-2-2345-6789",
        "+886 (2) 2345 6789",
        "04-2345-6789",
        "04-723-4567",
        "037-323456",
        "049-234-5678",
        "082-312345",
        "0836-22345",
        "089-323456",
        "07-345-6789",
        "06-2345678",
        "0800-123-456",
        "0809 123 456",
        "0800123456",
    ],
)
def test_phone_formats(phone: str) -> None:
    assert spans(f"請撥{phone}聯絡", ["tw_phone"]) == [("tw_phone", phone)]
    assert spans(f"call {phone}, thanks", ["tw_phone"]) == [("tw_phone", phone)]


@pytest.mark.parametrize(
    "text",
    [
        "0912-345-67",
        "091234567890",
        "02-1234-5678",
        "02-2345-678",
        "0812345678",
        "1234-5678",
        "(02 2345 6789x",
        "+886 812 345 678",
    ],
)
def test_not_phones(text: str) -> None:
    assert spans(f"號碼 {text} 。", ["tw_phone"]) == []


# --- e-mail -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "email"),
    [
        ("寄到 john.doe@example.com 即可", "john.doe@example.com"),
        ("a_b+tag@sub.example.com.tw。", "a_b+tag@sub.example.com.tw"),
        ("Mail me at x%y@mail-server.org.", "x%y@mail-server.org"),
        ("聯絡信箱service@gov.taipei謝謝", "service@gov.taipei"),
    ],
)
def test_emails(text: str, email: str) -> None:
    assert spans(text) == [("email", email)]


@pytest.mark.parametrize(
    "text",
    ["john@localhost", "a..b@x.com", "a@-x.com", "@x.com", "a@x.c", "a.@x.com", "a@x..com", "user@123.456"],
)
def test_not_emails(text: str) -> None:
    assert spans(text, ["email"]) == []


# --- keyword-gated numbers --------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "健保卡號：000012345678",
        "健保卡 0000 1234 5678",
        "NHI card no. 000012345678",
        "全民健康保險卡號碼為000012345678",
    ],
)
def test_nhi_card_near_keyword(text: str) -> None:
    found = detect(text, ["tw_nhi_card"])
    assert [(f.entity, f.rule) for f in found] == [("tw_nhi_card", "keyword")]
    assert text[found[0].start : found[0].end].replace(" ", "") == "000012345678"


@pytest.mark.parametrize(
    "text",
    [
        "訂單編號 000012345678",  # no keyword
        "健保卡已寄出，請於下週簽收並回覆編號000012345678",  # keyword too far away
        "我有健保。000012345678",  # keyword in the previous sentence
        "000012345678 是健保卡號",  # keyword after the number
        "健保卡號：0000123456789",
    ],  # 13 digits
)
def test_nhi_card_needs_a_keyword_right_before(text: str) -> None:
    assert detect(text, ["tw_nhi_card"]) == []


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("匯款帳號：0123456789012", "0123456789012"),
        ("銀行帳戶 012-345678-9012", "012-345678-9012"),
        ("Account no: 1234567890123456", "1234567890123456"),
        ("轉帳至 12345678901", "12345678901"),
    ],
)
def test_bank_account_near_keyword(text: str, number: str) -> None:
    assert spans(text, ["bank_account"]) == [("bank_account", number)]


@pytest.mark.parametrize(
    "text",
    [
        "訂單 0123456789012",
        "帳號 123456789",
        "帳號 12345678901234567",
        "我們的銀行業務在過去的十多年間成長了 1234567890",
    ],
)
def test_bank_account_refused(text: str) -> None:
    assert detect(text, ["bank_account"]) == []


# --- addresses --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address",
    [
        "106台北市大安區羅斯福路四段1號",
        "10617 臺北市大安區羅斯福路四段1號",
        "新北市板橋區中山路一段161號",
        "彰化縣彰化市中山路二段416號",
        "台中市西屯區台灣大道三段99號12樓之3",
        "南投縣信義鄉東埔村1鄰1號",
        "桃園市中壢區中大路300巷5弄12-1號3樓305室",
        "高雄市前鎮區中山二路2號",
        "100臺北市中正區重慶南路一段122號",
    ],
)
def test_addresses(address: str) -> None:
    assert spans(f"地址：{address}，請寄送。", ["tw_address"]) == [("tw_address", address)]


@pytest.mark.parametrize(
    "text",
    ["台北市大安區羅斯福路", "我住在台北市，很好", "大安區羅斯福路四段1號", "東京都新宿區1號"],
)
def test_not_addresses(text: str) -> None:
    assert detect(text, ["tw_address"]) == []


# --- full-width input -------------------------------------------------------------------------
def test_fold_is_one_code_point_for_one() -> None:
    every = "".join(chr(cp) for cp in pii._FOLD)
    assert len(fold(every)) == len(every)
    assert all(len(chr(v)) == 1 for v in pii._FOLD.values())
    assert fold("Ａ１２３４５６７８９ ＋８８６－") == "A123456789 +886-"
    assert fold("中文，標點！") == "中文，標點！"


def test_full_width_findings_point_into_the_original_text() -> None:
    text = "身分證Ａ１２３４５６７８９，手機０９１２－３４５－６７８，信箱ｍｉｎｇ＠ｅｘａｍｐｌｅ．ｃｏｍ。"
    found = detect(text)
    assert [(f.entity, text[f.start : f.end]) for f in found] == [
        ("tw_national_id", "Ａ１２３４５６７８９"),
        ("tw_phone", "０９１２－３４５－６７８"),
        ("email", "ｍｉｎｇ＠ｅｘａｍｐｌｅ．ｃｏｍ"),
    ]
    assert [(f.start, f.end) for f in found] == [(f.start, f.end) for f in detect(fold(text))]
    assert mask(text, found) == "身分證[tw_national_id]，手機[tw_phone]，信箱[email]。"


def test_ideographic_space_and_mixed_width() -> None:
    text = "電話（０２）　２３４５-6789"
    assert spans(text) == [("tw_phone", "（０２）　２３４５-6789")]


# --- boundaries -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "XA123456789",
        "A123456789X",
        "A1234567890",
        "12345678901234567890",
        "order#1-0912345678",
        "v4.04595257",
        "0912345678901",
        "id=A123456789-1",
    ],
)
def test_no_match_inside_longer_runs(text: str) -> None:
    assert detect(text) == []


@pytest.mark.parametrize(
    ("text", "entity"),
    [
        ("A123456789先生您好", "tw_national_id"),
        ("請打0912345678喔", "tw_phone"),
        ("統編04595257號", "tw_business_id"),
        ("(A123456789)", "tw_national_id"),
        ("No.04595257", "tw_business_id"),
    ],
)
def test_cjk_and_punctuation_are_boundaries(text: str, entity: str) -> None:
    assert [f.entity for f in detect(text)] == [entity]


def test_adversarial_inputs_stay_fast() -> None:
    texts = [
        "1 " * 5000,
        "0-" * 5000,
        "a" * 10000 + "@",
        "x@" * 5000,
        "台北市" * 3000,
        "9" * 10000,
        "帳號" + "1 " * 5000,
        "." * 10000 + "@" + "a." * 3000,
    ]
    start = time.perf_counter()
    for text in texts:
        detect(text)
    assert time.perf_counter() - start < 2.0


# --- overlaps, API ----------------------------------------------------------------------------
def test_overlaps_keep_the_longer_then_the_higher_ranked() -> None:
    assert spans("0912345678@example.com") == [("email", "0912345678@example.com")]
    assert spans("帳號 0912345678") == [("bank_account", "0912345678")]  # same span: rank
    card = "4111111111111111"
    assert spans(f"帳號 {card}") == [("credit_card", card)]


def test_findings_are_sorted_and_carry_no_text() -> None:
    text = "A123456789 0912345678 john@example.com"
    found = detect(text)
    assert [f.start for f in found] == sorted(f.start for f in found)
    assert [f.name for f in dataclasses.fields(Finding)] == ["entity", "start", "end", "rule"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        found[0].start = 3  # type: ignore[misc]
    assert {f.rule for f in found} == {"checksum", "format"}


def test_entity_filter_and_unknown_entities() -> None:
    text = "A123456789 john@example.com"
    assert spans(text, ["email"]) == [("email", "john@example.com")]
    assert detect(text, []) == []
    with pytest.raises(ValueError, match="unknown PII entities"):
        detect(text, ["passport"])


def test_every_entity_has_placeholders() -> None:
    assert set(PLACEHOLDERS) == set(PLACEHOLDERS_ZH) == set(ENTITIES)
    assert PLACEHOLDERS["tw_national_id"] == "[tw_national_id]"


def test_mask_styles() -> None:
    text = "身分證A123456789。"
    found = detect(text)
    assert mask(text, found) == "身分證[tw_national_id]。"
    assert mask(text, found, style="zh") == "身分證[身分證字號]。"
    assert mask(text, found, style="stars") == "身分證**********。"
    with pytest.raises(ValueError):
        mask(text, [Finding("email", 0, 5, "format"), Finding("email", 3, 8, "format")])
    with pytest.raises(ValueError):
        mask(text, found, style="emoji")  # type: ignore[arg-type]


def test_entities_match_the_spec_schema() -> None:
    from typing import get_args

    from twllm.spec.schema import PiiEntity, PiiSpec

    assert set(get_args(PiiEntity)) == set(ENTITIES)
    policy = PiiPolicy(**PiiSpec().model_dump())
    assert policy.action == "mask" and set(policy.entities) <= set(ENTITIES)


# --- policies ---------------------------------------------------------------------------------
SAMPLE = "客戶A123456789，手機0912-345-678，信箱ming@example.com。"


def test_policy_masks_by_default() -> None:
    result = PiiPolicy().apply(SAMPLE)
    assert result.text == "客戶[tw_national_id]，手機[tw_phone]，信箱[email]。"
    assert result.masked and not result.blocked
    assert [f.entity for f in result.findings] == ["tw_national_id", "tw_phone", "email"]


def test_policy_blocks_per_entity() -> None:
    policy = PiiPolicy(action="mask", actions={"tw_national_id": "block"})
    result = policy.apply(SAMPLE)
    assert result.blocked and result.masked
    assert "A123456789" not in result.text  # a blocked entity is never passed on either
    assert not policy.apply("手機0912-345-678").blocked


def test_policy_log_only_leaves_the_text() -> None:
    result = PiiPolicy(action="log").apply(SAMPLE)
    assert result.text == SAMPLE and not result.masked and not result.blocked
    assert len(result.findings) == 3


def test_policy_mixed_actions_and_entity_subset() -> None:
    policy = PiiPolicy(action="log", entities=["tw_phone", "email"], actions={"email": "mask"})
    result = policy.apply(SAMPLE)
    assert result.text == "客戶A123456789，手機0912-345-678，信箱[email]。"
    assert [f.entity for f in result.findings] == ["tw_phone", "email"]
    assert policy.action_for("tw_phone") == "log" and policy.action_for("email") == "mask"


def test_policy_action_for_an_unlisted_entity_turns_it_on() -> None:
    policy = PiiPolicy(entities=["email"], actions={"tw_address": "block"})
    assert policy.detected == {"email", "tw_address"}
    assert policy.apply("寄到台北市大安區羅斯福路四段1號").blocked


@pytest.mark.parametrize(
    "kwargs",
    [
        {"action": "drop"},
        {"entities": ["ssn"]},
        {"actions": {"email": "hide"}},
        {"actions": {"ssn": "mask"}},
        {"style": "emoji"},
    ],
)
def test_policy_rejects_unknown_names(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PiiPolicy(**kwargs)


# --- streaming --------------------------------------------------------------------------------
STREAM_TEXTS = [
    SAMPLE,
    "身分證Ａ１２３４５６７８９，手機０９１２－３４５－６７８，信箱ｍｉｎｇ＠ｅｘａｍｐｌｅ．ｃｏｍ。",
    "Card 4111 1111 1111 1111 expires 12/29; office (02) 2345-6789 ext. 12 and +886 912 345 678",
    "公司統編04595257，地址106台北市大安區羅斯福路四段1號5樓，健保卡號 000012345678，匯款帳號 012-345678-9012。",
    "南投縣信義鄉東埔村1鄰1號 和 桃園市中壢區中大路300巷5弄12-1號3樓305室 都是地址" * 2,
    "no pii at all, just words and numbers like 3.14 and 2026-11-25 in a sentence. " * 4,
    "1 2 3 4 5 6 7 8 9 0 " * 30 + "0912345678",  # long run without a stop
    "a" * 300 + "@example.com and b@example.com",  # long local part (invalid) then a valid one
    "x" * 70 + " john.doe@example.com" + "9" * 400 + " A123456789",
    "帳號" + "1234567890" * 3 + " 帳號 0123456789 健保000012345678",
    "台北市" * 50 + "大安區羅斯福路四段1號" + "台北市大安區" * 30,
    "",
]
POLICIES = [
    PiiPolicy(),
    PiiPolicy(entities=["tw_national_id", "tw_resident_id", "tw_phone", "email", "credit_card"]),
    PiiPolicy(action="block", style="zh"),
    PiiPolicy(action="log", actions={"tw_phone": "mask", "tw_address": "mask"}, style="stars"),
]


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 4, 7, 16, 64])
        chunks.append(text[i : i + n])
        i += n
    return chunks


def run_stream(policy: PiiPolicy, chunks: list[str]) -> tuple[str, StreamMasker]:
    masker = StreamMasker(policy)
    out = [masker.feed(c) for c in chunks]
    out.append(masker.flush())
    return "".join(out), masker


@pytest.mark.parametrize("policy_index", range(len(POLICIES)))
def test_stream_equals_whole_text_for_random_chunkings(policy_index: int) -> None:
    policy = POLICIES[policy_index]
    rng = random.Random(1000 + policy_index)
    for text in STREAM_TEXTS:
        expected = policy.apply(text)
        for _ in range(25):
            out, masker = run_stream(policy, random_chunks(text, rng))
            assert out == expected.text, (text, out)
            assert masker.findings == expected.findings
            assert masker.blocked == expected.blocked
        out, _ = run_stream(policy, list(text))  # one character at a time
        assert out == expected.text


def test_stream_holds_back_a_possible_entity_and_never_leaks_it() -> None:
    masker = StreamMasker(PiiPolicy())
    assert masker.feed("我的電話是0912") == "我的電話是"
    assert masker.feed("-345-") == ""
    released = masker.feed("678，謝謝你")
    assert released == "[tw_phone]，謝謝你"  # the text after the number is not held
    assert masker.flush() == ""
    assert [f.entity for f in masker.findings] == ["tw_phone"]
    assert (masker.findings[0].start, masker.findings[0].end) == (5, 17)


def test_stream_waits_one_character_after_a_number_and_for_a_city_name() -> None:
    masker = StreamMasker(PiiPolicy())
    assert masker.feed("第12") == "第"
    assert masker.feed(".") == ""  # 12. could still become 12.5: "." after a digit waits
    assert masker.feed("5版，") == "12.5版，"
    assert masker.feed("我住台") == "我住"  # 台 may begin 台北市
    assert masker.feed("灣") == "台灣"
    assert masker.feed("台北市") == ""  # a city name: an address may follow
    assert masker.feed("很熱鬧") == ""  # 台北市很熱鬧 can still become 台北市很熱鬧區…
    assert masker.feed("。") == "台北市很熱鬧。"  # … but not with 。: released
    assert masker.flush() == ""


def _candidate_tail(text: str, policy: PiiPolicy) -> int:
    """Length of the run at the end of text made of characters some entity may contain."""
    inner = set().union(*(pii._INNER[e] for e in policy.detected))
    n = len(text)
    while n and text[n - 1] in inner:
        n -= 1
    return len(text) - n


@pytest.mark.parametrize("chunking", ["char", "token"])
def test_stream_holds_only_a_candidate_tail(chunking: str) -> None:
    """Through the default policy, a Chinese answer is held at most two characters beyond a
    candidate run (a city name in progress, a digit's next character) and an English one only
    by its current word (a possible e-mail local part); everything else leaves at once."""
    from importlib import resources

    import yaml

    prompts = yaml.safe_load(resources.files("twllm.zh_tw").joinpath("prompts.yaml").read_text(encoding="utf-8"))
    chinese = "\n".join(p["prompt"] for p in prompts["prompts"])
    english = (
        "The gateway routes each request to a vLLM engine, counts tokens and spend per tenant, and "
        "screens prompts and answers. It streams them as they are generated; see the docs. "
    ) * 8
    rng = random.Random(5)
    policy = PiiPolicy()
    for text, extra in ((chinese, 2), (english, 0)):
        masker, out, i, empty = StreamMasker(policy), [], 0, 0
        while i < len(text):
            n = 1 if chunking == "char" else rng.randint(1, 3)
            out.append(masker.feed(text[i : i + n]))
            i += n
            assert masker.held <= _candidate_tail(text[:i], policy) + extra, text[max(0, i - 20) : i]
            empty += not out[-1]
        out.append(masker.flush())
        assert "".join(out) == policy.apply(text).text
        if extra:  # Chinese: nearly every piece releases something
            assert empty <= 0.02 * len(out)


def test_stream_holds_at_most_max_read_characters() -> None:
    masker = StreamMasker(PiiPolicy())
    released = "".join(masker.feed("1" * 10) for _ in range(100))
    assert len(released) >= 1000 - MAX_READ - pii._HOLD_STEP
    assert CONTEXT < MAX_READ


def test_stream_reports_a_block() -> None:
    masker = StreamMasker(PiiPolicy(actions={"credit_card": "block"}))
    masker.feed("請刷卡 4111 1111 1111 1111 ")
    masker.feed("，謝謝。")
    assert masker.blocked
    assert "4111" not in masker.flush()
    with pytest.raises(ValueError, match="after flush"):
        masker.feed("more")


FRAGMENTS = [
    "A123456789",
    "0912-345-678",
    "0912 345 678",
    "(02) 2345-6789",
    "+886 912 345 678",
    "john.doe@example.com",
    "4111 1111 1111 1111",
    "4111111111111111",
    "健保卡號",
    "帳號",
    "account no ",
    "000012345678",
    "012-345678-9012",
    "04595257",
    "106 ",
    "台北市",
    "大安區",
    "羅斯福路四段",
    "1號",
    "5樓",
    "1鄰",
    "東埔村",
    "，",
    "。",
    " ",
    "-",
    ".",
    "@",
    "x",
    "Ｚ",
    "０９１２",
    "－",
    "（",
    "）",
    "\n",
    "中文",
    "12",
    "7",
    "之",
    "+",
    # address parts and city-name prefixes, to exercise the hold after a city name
    "台",
    "北",
    "臺北",
    "北市",
    "市",
    "縣",
    "新竹縣",
    "竹北市",
    "信義區",
    "區",
    "里",
    "村",
    "路",
    "街",
    "大道",
    "三段",
    "段",
    "巷",
    "弄",
    "號",
    "樓",
    "室",
    "5.",
    ".5",
    "1-",
    "-1",
    "5 ",
    "很熱鬧",
    "a@b",
    ".com",
]


@pytest.mark.parametrize("seed", range(4))
def test_stream_equals_whole_text_on_random_fragment_mixes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 80)))
        policy = rng.choice(POLICIES)
        expected = policy.apply(text)
        out, masker = run_stream(policy, random_chunks(text, rng))
        assert out == expected.text, text
        assert masker.findings == expected.findings
