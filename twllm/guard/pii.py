"""Taiwan PII: detect, mask or block personal data in text, in one piece or streamed.

Entities (names as in the spec's `PiiEntity`) and the rule that confirms each candidate:

  tw_national_id  [A-Z][12]\\d{8}, checksum                                  rule "checksum"
  tw_resident_id  [A-Z][89]\\d{8} (since 2021) or [A-Z][A-D]\\d{8} (old), checksum
  tw_business_id  統一編號, 8 digits, checksum (divisible by 5, 7th-digit-7 exception)
  credit_card     13–19 digits, first digit 2–6, optional space/dash groups, Luhn
  tw_nhi_card     12 digits within KEYWORD_WINDOW characters after 健保/NHI   rule "keyword"
  bank_account    10–16 digits within KEYWORD_WINDOW characters after 帳號/銀行/account
  tw_phone        mobile 09xx, +886 9xx, landlines by area code, 0800/0809    rule "format"
  email           local@domain.tld (ASCII)
  tw_address      縣/市 + 區/鄉/鎮/市 + road 路/街/大道 (or 鄰) + 號, optional postal code

Invariants:
- Matching runs on `fold(text)`, which maps full-width forms to ASCII one code point to one code
  point, so every offset found there is an offset into the original text.
- A candidate must not sit inside a longer run of ASCII letters/digits: lookarounds check the
  characters just before and after it (not \\b, so CJK neighbours are fine).
- Every candidate reads a bounded window of text: at most CONTEXT characters before its start
  and MAX_READ characters from its start. `StreamMasker` relies on this to cut a stream only
  where the result cannot change, so that streaming output equals `PiiPolicy.apply` on the whole.
- A Finding never holds the matched text, only where it is and why.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from string import ascii_letters, digits
from types import MappingProxyType
from typing import Literal, NamedTuple

from twllm.guard.tw_ids import business_id_ok, id_kind, luhn_ok

Action = Literal["mask", "block", "log"]
MaskStyle = Literal["label", "zh", "stars"]

# Overlapping candidates: the longer wins; at equal length, the earlier entity in this order.
ENTITIES: tuple[str, ...] = (
    "tw_national_id",
    "tw_resident_id",
    "credit_card",
    "tw_nhi_card",
    "bank_account",
    "tw_business_id",
    "tw_phone",
    "email",
    "tw_address",
)
ALL: frozenset[str] = frozenset(ENTITIES)

# style="label": the entity name itself, which reads the same to a model prompted in Chinese or
# English and to a log reader.
PLACEHOLDERS: Mapping[str, str] = MappingProxyType({e: f"[{e}]" for e in ENTITIES})
PLACEHOLDERS_ZH: Mapping[str, str] = MappingProxyType(
    {
        "tw_national_id": "[身分證字號]",
        "tw_resident_id": "[居留證號]",
        "tw_business_id": "[統一編號]",
        "credit_card": "[信用卡號]",
        "tw_nhi_card": "[健保卡號]",
        "bank_account": "[銀行帳號]",
        "tw_phone": "[電話號碼]",
        "email": "[電子郵件]",
        "tw_address": "[地址]",
    }
)

KEYWORD_WINDOW = 12
"""A keyword must end at most this many characters before an NHI card or bank account number."""
CONTEXT = 64
"""Characters before a candidate that detection may read (boundaries, keywords, postal codes)."""
MAX_READ = 150
"""Characters from a candidate's start that detection may read (e-mail: 64 + 1 + 81 + lookahead)."""

# ---------------------------------------------------------------------------------------------
# Folding: full-width digits and letters, the full-width symbols that entities contain
# (＋－（）＠．＿％), the ideographic and no-break spaces and hyphen look-alikes map to ASCII.
# Every value is ONE code point, so len(fold(t)) == len(t) and offsets carry over unchanged.
# Other full-width punctuation (，：！) is left alone: it never sits inside an entity, and
# translating only what matters keeps folding cheap on Chinese text.
_FOLD: dict[int, int] = {
    cp: cp - 0xFEE0 for cp in (*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B))
}
_FOLD.update({ord(c): ord(c) - 0xFEE0 for c in "＋－（）＠．＿％"})
_FOLD.update({0x3000: 0x20, 0x00A0: 0x20, 0xFE62: 0x2B})
_FOLD.update(dict.fromkeys((0x2010, 0x2011, 0x2012, 0x2013, 0x2212, 0xFE63), 0x2D))
_FOLDABLE = re.compile("[" + "".join(re.escape(chr(cp)) for cp in sorted(_FOLD)) + "]+")


def _fold_run(m: re.Match) -> str:
    return m.group().translate(_FOLD)


def fold(text: str) -> str:
    """Full-width digits, letters, symbols and spaces to ASCII, one code point for one."""
    if text.isascii() or not _FOLDABLE.search(text):
        return text
    return _FOLDABLE.sub(_fold_run, text)


# ---------------------------------------------------------------------------------------------
# Boundaries, written into the patterns (no \b: it counts CJK as word characters and would refuse
# "A123456789先生"). They sit AFTER an entity's first character so that each pattern still starts
# with a character class, which lets `re` skip ahead in C to where a match can begin.
_LB = r"(?<![0-9A-Za-z].)(?<![0-9][-.].)"  # not after a letter/digit, nor after "1-" or "1."
_LB_GROUPED = _LB + r"(?<![0-9][ -].)"  # spaced groups: not after "1 " either
_RB = r"(?![0-9A-Za-z])(?![-.][0-9])"  # not before a letter/digit, nor before "-1" or ".1"
_RB_GROUPED = r"(?![0-9A-Za-z])(?![-. ][0-9])"  # spaced groups: nor before " 1"
_DIGITS = frozenset(digits)
_ALNUM = frozenset(ascii_letters + digits)
_ANY_DIGIT = re.compile(r"[0-9]")
_MAYBE_PII = re.compile(r"[0-9@]")  # every entity contains a digit or an @

Candidate = tuple[int, int, str, str]  # start, end, entity, rule
Scanner = Callable[[str, int, frozenset, list], None]

# Every scanner enumerates candidates by start position (searching again from start + 1, never
# from the end of the previous match), so the candidates at positions >= lo do not depend on
# where the scan began: the property `StreamMasker` needs.


# --- national ID / resident certificate -------------------------------------------------------
# Searched from the second character, which is rarer in text than a letter; the lookbehinds then
# require a letter before it and a boundary before that letter.
_ID_RE = re.compile(r"[12ABCDabcd89](?<=[A-Za-z].)(?<![0-9A-Za-z]..)(?<![0-9][-.]..)[0-9]{8}" + _RB, re.ASCII)


def _scan_ids(t: str, lo: int, want: frozenset, out: list) -> None:
    m = _ID_RE.search(t, lo + 1)
    while m:
        s, e = m.start() - 1, m.end()
        kind = id_kind(t[s:e])
        entity = "tw_national_id" if kind == "citizen" else "tw_resident_id"
        if kind and entity in want:
            out.append((s, e, entity, "checksum"))
        m = _ID_RE.search(t, m.start() + 1)


# --- 統一編號 ---------------------------------------------------------------------------------
_BUSINESS_RE = re.compile(r"[0-9]" + _LB + r"[0-9]{7}" + _RB, re.ASCII)


def _scan_business(t: str, lo: int, want: frozenset, out: list) -> None:
    m = _BUSINESS_RE.search(t, lo)
    while m:
        if business_id_ok(m.group()):
            out.append((m.start(), m.end(), "tw_business_id", "checksum"))
        m = _BUSINESS_RE.search(t, m.start() + 1)


# --- phones -----------------------------------------------------------------------------------
# Area code (without the trunk 0) -> digits of the local number. 037 Miaoli, 049 Nantou,
# 082 Kinmen, 0826 Wuqiu, 0836 Matsu, 089 Taitung; 04 is 8 digits in Taichung, 7 in Changhua.
_AREAS: dict[str, tuple[int, ...]] = {
    "826": (5,),
    "836": (5,),
    "37": (6,),
    "49": (7,),
    "82": (6,),
    "89": (6,),
    "2": (8,),
    "3": (7,),
    "4": (8, 7),
    "5": (7,),
    "6": (7,),
    "7": (7,),
    "8": (7,),
}
_LOCAL = {
    8: r"[2-9][0-9]{3}[ -]?[0-9]{4}",
    7: r"[2-9][0-9]{2}[ -]?[0-9]{4}",
    6: r"[2-9][0-9](?:[0-9][ -]?[0-9]{3}|[ -]?[0-9]{4})",
    5: r"[2-9][ -]?[0-9]{4}",
}
_AREA_BODY = "|".join(rf"{area}\)?[ -]?(?:{'|'.join(_LOCAL[n] for n in lengths)})" for area, lengths in _AREAS.items())
_MOBILE = r"9[0-9]{2}[ -]?[0-9]{3}[ -]?[0-9]{3}"
_TOLL_FREE = r"80[09][ -]?[0-9]{3}[ -]?[0-9]{3}"
_AFTER_886 = rf"[ -]?(?:\(0\)[ -]?)?(?:{_MOBILE}|\(?(?:{_AREA_BODY}))"
# Each alternative starts with a literal (0, ( or +) so that `re` can skip ahead quickly.
_PHONE_RE = re.compile(
    rf"(?:0{_LB}(?:{_MOBILE}|{_TOLL_FREE}|{_AREA_BODY}|0886{_AFTER_886})"
    rf"|\(0(?:{_AREA_BODY})|\+886{_AFTER_886}){_RB}",
    re.ASCII,
)


def _scan_phones(t: str, lo: int, want: frozenset, out: list) -> None:
    m = _PHONE_RE.search(t, lo)
    while m:
        text = m.group()
        if text.count("(") == text.count(")"):
            out.append((m.start(), m.end(), "tw_phone", "format"))
        m = _PHONE_RE.search(t, m.start() + 1)


# --- payment cards ----------------------------------------------------------------------------
# 13–19 digits, in one run or in groups (4, then 3–6 each) split by single spaces or dashes.
# First digit 2–6: Mastercard 2/5, Amex/JCB/Diners 3, Visa 4, Discover/UnionPay 6.
_CARD_RE = re.compile(
    rf"[2-6]{_LB}(?:[0-9]{{12,18}}{_RB}"
    rf"|(?<![0-9][ -].)[0-9]{{3}}(?:[ -][0-9]{{3,6}}){{2,4}}{_RB_GROUPED})",
    re.ASCII,
)


def _scan_cards(t: str, lo: int, want: frozenset, out: list) -> None:
    m = _CARD_RE.search(t, lo)
    while m:
        number = m.group().replace(" ", "").replace("-", "")
        if 13 <= len(number) <= 19 and luhn_ok(number):
            out.append((m.start(), m.end(), "credit_card", "checksum"))
        m = _CARD_RE.search(t, m.start() + 1)


# --- numbers confirmed by a keyword (no public checksum) --------------------------------------
def _keywords(*words: str) -> re.Pattern:
    """One pattern for words (ASCII letters case-insensitive) that starts with a character class,
    e.g. [帳Aa](?:(?<=帳)號|(?<=[Aa])(?i:ccount)): `re` searches those quickly, unlike a plain
    alternation with a case-insensitive branch, which it tries at every position."""
    firsts = sorted({c for w in words for c in (w[0].lower(), w[0].upper())})
    alts = "|".join(
        f"(?<=[{re.escape(w[0].lower() + w[0].upper())}])(?i:{re.escape(w[1:])})"
        for w in sorted(words, key=len, reverse=True)
    )
    return re.compile(f"[{''.join(firsts)}](?:{alts})", re.ASCII)


_NHI_KW = _keywords("健保", "全民健康保險", "nhi", "national health insurance")
_BANK_KW = _keywords(
    "帳號", "帳戶", "账号", "账户", "銀行", "银行", "存摺", "匯款", "轉帳", "account", "acct", "bank", "iban"
)
_KW_MAX = 25  # longest keyword ("national health insurance")
_SENTENCE_END = re.compile(r"[。！？!?;；\n]")
_NHI_RE = re.compile(rf"[0-9]{_LB_GROUPED}[0-9]{{3}}[ -]?[0-9]{{4}}[ -]?[0-9]{{4}}{_RB_GROUPED}", re.ASCII)
_BANK_RE = re.compile(rf"[0-9]{_LB_GROUPED}(?:[ -]?[0-9]){{9,15}}{_RB_GROUPED}", re.ASCII)


def _keyword_before(t: str, s: int, keywords: re.Pattern) -> bool:
    """A keyword ends within KEYWORD_WINDOW characters before s, in the same sentence."""
    last = -1
    for m in keywords.finditer(t, max(0, s - KEYWORD_WINDOW - _KW_MAX), s):
        last = m.end()
    return last >= 0 and last >= s - KEYWORD_WINDOW and not _SENTENCE_END.search(t, last, s)


def _keyword_scanner(pattern: re.Pattern, keywords: re.Pattern, entity: str) -> Scanner:
    """Numbers that start within KEYWORD_WINDOW characters after a keyword: keywords first."""

    def scan(t: str, lo: int, want: frozenset, out: list) -> None:
        done = lo  # positions below this were tried already
        for k in keywords.finditer(t, max(0, lo - KEYWORD_WINDOW - _KW_MAX)):
            for s in range(max(done, k.end()), min(k.end() + KEYWORD_WINDOW + 1, len(t))):
                m = pattern.match(t, s) if t[s] in _DIGITS else None
                if m and _keyword_before(t, s, keywords):
                    out.append((s, m.end(), entity, "keyword"))
            done = max(done, k.end() + KEYWORD_WINDOW + 1)

    return scan


# --- e-mail -----------------------------------------------------------------------------------
_LOCAL_CHARS = frozenset(ascii_letters + digits + "._%+-")
_DOMAIN_CHARS = frozenset(ascii_letters + digits + ".-")
_DOMAIN_RE = re.compile(r"[A-Za-z0-9.-]{1,80}", re.ASCII)
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_TLD_RE = re.compile(r"[A-Za-z]{2,24}", re.ASCII)


def _scan_emails(t: str, lo: int, want: frozenset, out: list) -> None:
    at = t.find("@", lo)
    while at >= 0:
        s, limit = at, max(0, at - 65)
        while s > limit and t[s - 1] in _LOCAL_CHARS:
            s -= 1
        while s < at and t[s] == ".":
            s += 1
        local = t[s:at]
        m = _DOMAIN_RE.match(t, at + 1)
        if m and at - s <= 64 and local and not local.endswith(".") and ".." not in local:
            domain = m.group().rstrip(".")
            labels = domain.split(".")
            if (
                not (m.end() < len(t) and t[m.end()] in _DOMAIN_CHARS)  # longer than 80
                and len(labels) >= 2
                and all(_LABEL_RE.fullmatch(label) for label in labels)
                and _TLD_RE.fullmatch(labels[-1])
            ):
                out.append((s, at + 1 + len(domain), "email", "format"))
        at = t.find("@", at + 1)


# --- postal addresses -------------------------------------------------------------------------
# The pattern is built from parts that also give its prefix closure (_ADDRESS_PREFIX matches every
# prefix of an address, and more): a stream holds text after a city name only while it can still
# grow into an address.
class _Rx(NamedTuple):
    full: str
    pre: str
    """Matches (at least) every prefix of what `full` matches, the empty one included."""


def _cls(chars: str, lo: int | None = None, hi: int | None = None, lazy: bool = False) -> _Rx:
    if lo is None:
        return _Rx(f"[{chars}]", f"[{chars}]?")
    return _Rx(f"[{chars}]{{{lo},{hi}}}" + ("?" if lazy else ""), f"[{chars}]{{0,{hi}}}")


def _lit(text: str) -> _Rx:
    return _Rx(text, "(?:" + "|".join(text[:i] for i in range(len(text), 0, -1)) + ")?")


def _alt(*parts: _Rx) -> _Rx:
    return _Rx("(?:" + "|".join(p.full for p in parts) + ")", "(?:" + "|".join(p.pre for p in parts) + ")")


def _opt(part: _Rx) -> _Rx:
    return _Rx(f"(?:{part.full})?", part.pre)


def _seq(*parts: _Rx) -> _Rx:
    pre = parts[-1].pre
    for part in reversed(parts[:-1]):
        pre = f"(?:{part.full}{pre}|{part.pre})"
    return _Rx("".join(p.full for p in parts), pre)


_CJK = "\u4e00-\u9fff"
_NUM_ZH = "一二三四五六七八九十"
_CITY_NAMES = (
    "臺北",
    "台北",
    "新北",
    "桃園",
    "臺中",
    "台中",
    "臺南",
    "台南",
    "高雄",
    "基隆",
    "新竹",
    "嘉義",
    "苗栗",
    "彰化",
    "南投",
    "雲林",
    "屏東",
    "宜蘭",
    "花蓮",
    "臺東",
    "台東",
    "澎湖",
    "金門",
    "連江",
)
_CITY_PARTS = _seq(_alt(*map(_lit, _CITY_NAMES)), _cls("市縣"))
_CITY = _CITY_PARTS.full
_ROAD = _seq(
    _cls(_CJK, 1, 7, lazy=True),
    _alt(_lit("大道"), _lit("路"), _lit("街")),
    _opt(_seq(_cls(_NUM_ZH + "0-9", 1, 2), _lit("段"))),
)
_SUB = _opt(_seq(_lit("之"), _cls("0-9", 1, 3)))  # 之1
_ADDRESS = _seq(
    _CITY_PARTS,
    _cls(_CJK, 1, 3, lazy=True),
    _cls("區鄉鎮市"),  # district
    _opt(_seq(_cls(_CJK, 1, 3, lazy=True), _cls("里村"))),  # village
    _alt(_seq(_alt(_cls("0-9", 1, 3), _cls(_NUM_ZH, 1, 3)), _lit("鄰"), _opt(_ROAD)), _ROAD),  # 鄰 and/or road
    _opt(_seq(_cls("0-9", 1, 4), _SUB, _lit("巷"))),
    _opt(_seq(_cls("0-9", 1, 4), _SUB, _lit("弄"))),
    _cls("0-9", 1, 5),
    _opt(_seq(_cls("-之"), _cls("0-9", 1, 4))),
    _lit("號"),
    _SUB,
    _opt(_seq(_alt(_cls("0-9", 1, 3), _cls(_NUM_ZH, 1, 3)), _lit("樓"), _SUB)),
    _opt(_seq(_cls("0-9", 1, 4), _lit("室"))),
)
_ADDRESS_RE = re.compile(_ADDRESS.full, re.ASCII)
_ADDRESS_PREFIX = re.compile(_ADDRESS.pre, re.ASCII)
# Longest match of _ADDRESS_RE, from its bounded quantifiers: city 3, district 4, village 4,
# 鄰 + road + 段 16, 巷 9, 弄 9, 號 15, 樓 8, 室 5 = 73; a postal code adds up to 7 before it.
_ADDRESS_SPAN = 80
_CITY_RE = re.compile(_CITY)
_CITY_FIRSTS = frozenset(name[0] for name in _CITY_NAMES)
_CITY_STARTS = frozenset(w[:i] for name in _CITY_NAMES for w in (name + "市", name + "縣") for i in (1, 2))
"""Proper prefixes of a city name: a stream waits for the rest before deciding."""


def _scan_addresses(t: str, lo: int, want: frozenset, out: list) -> None:
    m = _ADDRESS_RE.search(t, lo)
    while m:
        a, e = m.span()
        # A 3-, 5- or 6-digit postal code right before the city, maybe with one space.
        j = a - 1 if a > 0 and t[a - 1] == " " else a
        k = j
        while k > 0 and j - k < 7 and t[k - 1] in _DIGITS:
            k -= 1
        s = k if j - k in (3, 5, 6) and (k == 0 or t[k - 1] not in _ALNUM) else a
        out.append((s, e, "tw_address", "format"))
        m = _ADDRESS_RE.search(t, a + 1)


# Scanners, each run when one of its entities is wanted. Only e-mail can match without a digit.
_SCANNERS: tuple[tuple[frozenset, Scanner, bool], ...] = (
    (frozenset({"tw_national_id", "tw_resident_id"}), _scan_ids, True),
    (frozenset({"tw_business_id"}), _scan_business, True),
    (frozenset({"tw_phone"}), _scan_phones, True),
    (frozenset({"credit_card"}), _scan_cards, True),
    (frozenset({"tw_nhi_card"}), _keyword_scanner(_NHI_RE, _NHI_KW, "tw_nhi_card"), True),
    (frozenset({"bank_account"}), _keyword_scanner(_BANK_RE, _BANK_KW, "bank_account"), True),
    (frozenset({"email"}), _scan_emails, False),
    (frozenset({"tw_address"}), _scan_addresses, True),
)
_RANK = {e: i for i, e in enumerate(ENTITIES)}


def _candidates(t: str, want: frozenset, lo: int = 0) -> list[Candidate]:
    """All candidates starting at or after lo in folded text t (they may overlap)."""
    out: list[Candidate] = []
    has_digit = _ANY_DIGIT.search(t, lo) is not None
    for entities, scan, needs_digit in _SCANNERS:
        if (has_digit or not needs_digit) and not want.isdisjoint(entities):
            scan(t, lo, want, out)
    return [c for c in out if c[0] >= lo]


def _resolve(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Non-overlapping subset, longest first, then by entity rank and start; sorted by start."""
    chosen: list[Candidate] = []
    starts: list[int] = []
    for c in sorted(candidates, key=lambda c: (c[0] - c[1], _RANK[c[2]], c[0])):
        i = bisect.bisect_right(starts, c[0])
        if (i and chosen[i - 1][1] > c[0]) or (i < len(chosen) and chosen[i][0] < c[1]):
            continue
        starts.insert(i, c[0])
        chosen.insert(i, c)
    return chosen


def _entity_set(entities: Iterable[str]) -> frozenset:
    want = frozenset([entities] if isinstance(entities, str) else entities)
    unknown = sorted(want - ALL)
    if unknown:
        raise ValueError(f"unknown PII entities {unknown}; known: {', '.join(ENTITIES)}")
    return want


@dataclass(frozen=True, slots=True)
class Finding:
    """Where an entity was found in the original text, and the rule that confirmed it."""

    entity: str
    start: int
    end: int
    rule: str


def detect(text: str, entities: Iterable[str] = ALL) -> list[Finding]:
    """Findings in `text`, sorted by start and non-overlapping (longer / higher-ranked wins)."""
    want = _entity_set(entities)
    if not want or not text:
        return []
    return [Finding(c[2], c[0], c[1], c[3]) for c in _resolve(_candidates(fold(text), want))]


def _placeholder(finding: Finding, style: MaskStyle) -> str:
    if style == "label":
        return PLACEHOLDERS[finding.entity]
    if style == "zh":
        return PLACEHOLDERS_ZH[finding.entity]
    if style == "stars":
        return "*" * (finding.end - finding.start)
    raise ValueError(f"unknown mask style {style!r}: use label, zh or stars")


def mask(text: str, findings: Iterable[Finding], style: MaskStyle = "label") -> str:
    """`text` with each finding's span replaced by its placeholder.

    style: "label" -> [tw_national_id] (PLACEHOLDERS), "zh" -> [身分證字號] (PLACEHOLDERS_ZH),
    "stars" -> as many * as characters (keeps offsets). Findings must not overlap.
    """
    parts: list[str] = []
    at = 0
    for f in sorted(findings, key=lambda f: f.start):
        if f.start < at or f.end > len(text) or f.start > f.end:
            raise ValueError(f"findings overlap or fall outside the text at {f.start}:{f.end}")
        parts += (text[at : f.start], _placeholder(f, style))
        at = f.end
    parts.append(text[at:])
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PiiResult:
    """What a policy did to a text. `text` has every mask- and block-action finding replaced."""

    text: str
    findings: tuple[Finding, ...]
    blocked: bool
    """A finding's entity has the action "block": the caller refuses the request/response."""
    masked: bool
    """A finding's entity has the action "mask", so `text` differs from the input."""


@dataclass(frozen=True)
class PiiPolicy:
    """Which entities to look for and what to do with each: mask, block or log.

    Field names match the spec's `PiiSpec`, so `PiiPolicy(**spec.guard.pii.model_dump())` works.
    An entity named only in `actions` is looked for too.
    """

    action: Action = "mask"
    entities: Iterable[str] = ENTITIES
    actions: Mapping[str, Action] = field(default_factory=dict)
    style: MaskStyle = "label"

    def __post_init__(self) -> None:
        entities = tuple(e for e in ENTITIES if e in _entity_set(self.entities))
        actions = dict(self.actions)
        _entity_set(actions)
        for what in (self.action, *actions.values()):
            if what not in ("mask", "block", "log"):
                raise ValueError(f"unknown PII action {what!r}: use mask, block or log")
        _placeholder(Finding(ENTITIES[0], 0, 0, ""), self.style)
        object.__setattr__(self, "entities", entities)
        object.__setattr__(self, "actions", MappingProxyType(actions))

    @property
    def detected(self) -> frozenset:
        """Entities looked for: `entities` plus any named in `actions`."""
        return frozenset(self.entities) | frozenset(self.actions)

    def action_for(self, entity: str) -> Action:
        return self.actions.get(entity, self.action)

    def apply(self, text: str) -> PiiResult:
        findings = tuple(detect(text, self.detected))
        return self._result(text, findings)

    def _result(self, text: str, findings: tuple[Finding, ...]) -> PiiResult:
        acts = [self.action_for(f.entity) for f in findings]
        hidden = [f for f, a in zip(findings, acts) if a != "log"]
        return PiiResult(
            text=mask(text, hidden, self.style) if hidden else text,
            findings=findings,
            blocked="block" in acts,
            masked="mask" in acts,
        )


# ---------------------------------------------------------------------------------------------
# Characters that can sit inside each entity (besides a space after a digit or ')' and, for
# addresses, CJK ideographs). Any other character is a "stop": no candidate contains it, so a
# stream can be cut right after it.
_INNER: dict[str, str] = {
    "tw_national_id": ascii_letters + digits,
    "tw_resident_id": ascii_letters + digits,
    "tw_business_id": digits,
    "tw_phone": digits + "+()-",
    "email": ascii_letters + digits + "._%+-@",
    "credit_card": digits + "-",
    "tw_nhi_card": digits + "-",
    "bank_account": digits + "-",
    "tw_address": digits + "-",
}
_SPACED = frozenset({"tw_phone", "credit_card", "tw_nhi_card", "bank_account", "tw_address"})
_HOLD_STEP = 32


class StreamMasker:
    """Applies a policy to text that arrives in chunks.

    `feed` returns the text that is safe to send now and holds back only a tail that could still
    be part of an entity: everything up to the last stop character is released at once. A stop is
    a character no entity can contain: punctuation, a space not after a digit, CJK text — unless
    addresses are looked for and it follows a city name (or may begin one: 台 waits for 北市)
    while the text from the city on can still grow into an address (_ADDRESS_PREFIX). What is
    held is therefore a run of characters an entity could be made of — letters and digits (an ID,
    an e-mail's local part: so with e-mail on, the current word), a phone number with its spaces
    and dashes, an address in progress — plus one character after a digit when it is -, . or a
    space, whose meaning the next character decides ("5." then "1"). A keyword (健保, 帳號) is
    not masked and is released; only the number after it is held, as digits. A run without stops
    is cut MAX_READ characters behind its end (outside any candidate), so at most MAX_READ + 32
    characters are held (plus the last chunk); ``held`` says how many. The concatenation of every
    `feed` and the final `flush` is exactly `policy.apply(whole_text).text`, however the text was
    split.
    """

    def __init__(self, policy: PiiPolicy) -> None:
        self.policy = policy
        self._want = policy.detected
        self._inner = frozenset("".join(_INNER[e] for e in self._want))
        self._spaced = not self._want.isdisjoint(_SPACED)
        self._address = "tw_address" in self._want
        self._raw = ""  # original text from self._base on
        self._fold = ""  # fold(self._raw)
        self._base = 0  # offset of self._raw[0] in the whole stream
        self._emitted = 0  # offset up to which text has been released
        self._findings: list[Finding] = []
        self._closed = False
        # Scanning for stops moves forward once over the stream (see _scan_stops).
        self._checked = 0  # positions below this have been classified
        self._stop = -1  # last stop found
        self._anchors: list[int] = []  # starts of city names that may still begin an address
        self._fed = 0

    @property
    def held(self) -> int:
        """Characters fed but not yet released."""
        return self._fed - self._emitted

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Findings in the released text, with offsets into the whole stream."""
        return tuple(self._findings)

    @property
    def blocked(self) -> bool:
        """A block-action entity has been found: the caller should stop the stream."""
        return any(self.policy.action_for(f.entity) == "block" for f in self._findings)

    def feed(self, chunk: str) -> str:
        if self._closed:
            raise ValueError("StreamMasker.feed after flush")
        self._raw += chunk
        self._fold += fold(chunk)
        self._fed += len(chunk)
        return self._release(final=False)

    def flush(self) -> str:
        """Release everything held back; the masker takes no more text."""
        if self._closed:
            return ""
        out = self._release(final=True)
        self._closed = True
        return out

    def _release(self, final: bool) -> str:
        t, lo = self._fold, self._emitted - self._base
        cut = len(t) if final else max(lo, self._scan_stops(t) + 1 - self._base)
        cands: list[Candidate] | None = None
        if not final and len(t) - MAX_READ >= cut + _HOLD_STEP:
            # Long without a stop: cut MAX_READ before the end, outside every candidate (in
            # steps of _HOLD_STEP, so that text without stops is not rescanned at every chunk).
            cands = _candidates(t, self._want, lo)
            hold = len(t) - MAX_READ
            while any(s < hold < e for s, e, _, _ in cands):
                hold = min(s for s, e, _, _ in cands if s < hold < e)
            cut = max(cut, hold)
        if cut <= lo:
            return ""
        if cands is None and self._want and _MAYBE_PII.search(t, lo, cut):
            cands = _candidates(t, self._want, lo)
        # Candidates starting before the cut end before it: the cut is never inside one.
        found = tuple(Finding(c[2], c[0] - lo, c[1] - lo, c[3]) for c in _resolve(c for c in cands or () if c[0] < cut))
        out = self._raw[lo:cut]
        if found:
            out = self.policy._result(out, found).text
            at = self._emitted
            self._findings += (Finding(f.entity, f.start + at, f.end + at, f.rule) for f in found)
        self._emitted = self._base + cut
        keep = max(0, cut - CONTEXT)
        self._raw, self._fold, self._base = self._raw[keep:], self._fold[keep:], self._base + keep
        if self._anchors and self._anchors[0] < self._base:
            self._anchors = [a for a in self._anchors if a >= self._base]
        return out

    def _scan_stops(self, t: str) -> int:
        """Classify the new positions of t, each as soon as the text decides it, and return the
        last stop, as an offset into the whole stream (-1 if none yet)."""
        base, n, inner = self._base, len(t), self._inner
        h = self._checked - base
        while h < n:
            c = t[h]
            if c in inner:
                h += 1
                continue
            if c == " " and self._spaced and h > 0 and t[h - 1] in "0123456789)":
                h += 1
                continue  # may be inside a spaced number
            if c in "-. " and h > 0 and t[h - 1] in _DIGITS and h + 1 == n:
                break  # a number ending before c reads the character after it: (?![-. ][0-9])
            if self._address and "\u4e00" <= c <= "\u9fff":
                if n - h < 3 and t[h:] in _CITY_STARTS:
                    break  # may begin a city name: wait for the rest
                if c in _CITY_FIRSTS and _CITY_RE.match(t, h):
                    self._anchors.append(base + h)
                    h += 1
                    continue
                if self._anchors:
                    self._anchors = [a for a in self._anchors if _ADDRESS_PREFIX.fullmatch(t, a - base, h + 1)]
                    if self._anchors:
                        h += 1
                        continue  # could be inside an address
            self._stop = base + h
            h += 1
        self._checked = base + h
        return self._stop
