"""Regenerates charsets.py and phrases.py from the dictionaries inside the installed `opencc` wheel.

    python -m twllm.zh_tw.build_charsets          # rewrite charsets.py and phrases.py
    python -m twllm.zh_tw.build_charsets --check  # exit 1 when either is stale

The character sets are derived, not hand-written: a Simplified-only character is a key of
OpenCC's STCharacters whose Traditional candidates do not include itself and which is not a
Traditional form anywhere in OpenCC (干 is a candidate of itself, 后 a candidate of 后, 台 of
台: all three are shared; 发 maps only to 發/髮: Simplified-only). The wheel ships its
dictionaries as binary .ocd2 files, so they are dumped to text with the wheel's own
`opencc_dict` tool; that needs the tool at build time only, never at import time.

phrases.py holds what a stream needs to know to cut Simplified text where no OpenCC phrase can
span the cut (normalize.py, `_Cutter`): the keys of the dictionaries `s2twp` segments and
converts with (STPhrases and STPhrases_GeneratedFromRegionalPhrases, 49,792 keys of 2–15
characters, stored xz-compressed), the keys of its Taiwan phrase dictionaries (TWPhrases,
TWVariantsPhrases), the CJK compatibility ideographs it normalises first, and the
Traditional-only characters that also occur in Simplified phrase keys (著 in 著名).
"""

from __future__ import annotations

import base64
import lzma
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TypedDict

import opencc

TARGET = Path(__file__).with_name("charsets.py")
PHRASES_TARGET = Path(__file__).with_name("phrases.py")
DICTIONARIES = ("STCharacters", "TSCharacters", "TWVariants")
SEGMENTATION = ("STPhrases", "STPhrases_GeneratedFromRegionalPhrases")
"""What `s2twp` segments with, and converts with before its characters (s2twp.json)."""
TAIWAN_PHRASES = ("TWPhrases", "TWVariantsPhrases")
"""`s2twp`'s second step, run inside each segment on the converted text (TWVariants is one
character per key, so it never spans a cut)."""
TAIWAN_STANDARD = frozenset("霉")
"""Characters OpenCC maps away (霉 → 黴) that are the Ministry of Education's standard form in
Taiwan (發霉): found by checking the Simplified-only characters that Big5 can encode."""


def _clib() -> Path:
    return Path(opencc.__file__).parent / "clib"


def read_dictionary(name: str) -> dict[str, list[str]]:
    """One OpenCC dictionary as {key: candidates}, dumped from the wheel's .ocd2 file."""
    clib = _clib()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.txt"
        subprocess.run(
            [
                str(clib / "bin" / "opencc_dict"),
                "-i",
                str(clib / "share" / "opencc" / f"{name}.ocd2"),
                "-o",
                str(out),
                "-f",
                "ocd2",
                "-t",
                "text",
            ],
            check=True,
            capture_output=True,
        )
        entries: dict[str, list[str]] = {}
        for line in out.read_text(encoding="utf-8").splitlines():
            key, _, values = line.partition("\t")
            entries[key] = values.split(" ")
    return entries


def derive(st: dict[str, list[str]], ts: dict[str, list[str]], tw: dict[str, list[str]]) -> tuple[str, str]:
    """(Simplified-only characters, Traditional-only characters), each sorted."""
    traditional_forms = (
        {c for values in st.values() for c in values}
        | set(ts)
        | {c for values in tw.values() for c in values}
        | set(tw)
    )
    simplified_only = {
        k for k, values in st.items() if len(k) == 1 and k not in values and k not in traditional_forms
    } - TAIWAN_STANDARD
    simplified_forms = set(st) | {c for values in ts.values() for c in values}
    traditional_only = {k for k, values in ts.items() if len(k) == 1 and k not in values and k not in simplified_forms}
    traditional_only |= {c for values in tw.values() for c in values if c not in simplified_forms}
    return "".join(sorted(simplified_only)), "".join(sorted(traditional_only))


def render() -> str:
    simplified_only, traditional_only = derive(*(read_dictionary(name) for name in DICTIONARIES))
    wrap = lambda s: "\n".join(f'    "{s[i : i + 64]}"' for i in range(0, len(s), 64))  # noqa: E731
    return (
        '"""Simplified-only and Traditional-only characters, generated from OpenCC '
        f"{opencc.__version__}: do not edit.\n\n"
        "Regenerate with `python -m twllm.zh_tw.build_charsets` after changing the opencc pin.\n"
        '"""\n\n'
        f"OPENCC_VERSION = {opencc.__version__!r}\n\n"
        f"SIMPLIFIED_ONLY = frozenset(\n{wrap(simplified_only)}\n)\n\n"
        f"TRADITIONAL_ONLY = frozenset(\n{wrap(traditional_only)}\n)\n"
    )


def _wrap(text: str, width: int = 64) -> str:
    return "\n".join(f'    "{text[i : i + width]}"' for i in range(0, len(text), width))


class PhraseData(TypedDict):
    """What phrases.py holds, unpacked."""

    opencc: str
    segmentation: list[str]
    taiwan: list[str]
    pairs: str
    shared: str


def phrase_data() -> PhraseData:
    """What phrases.py must hold, read from the installed wheel's dictionaries."""
    segmentation = sorted({key for name in SEGMENTATION for key in read_dictionary(name)})
    taiwan = sorted({key for name in TAIWAN_PHRASES for key in read_dictionary(name) if len(key) > 1})
    compat = read_dictionary("CJK_Compatibility_Ideographs")
    pairs = "".join(k + v[0] for k, v in sorted(compat.items()) if len(k) == 1 and len(v[0]) == 1 and k != v[0])
    _, traditional_only = derive(*(read_dictionary(name) for name in DICTIONARIES))
    shared = "".join(sorted(set(traditional_only) & {c for key in segmentation for c in key}))
    assert all(" " not in key and "\n" not in key for key in segmentation + taiwan)
    return {
        "opencc": opencc.__version__,
        "segmentation": segmentation,
        "taiwan": taiwan,
        "pairs": pairs,
        "shared": shared,
    }


def shipped_phrase_data() -> PhraseData:
    """The same, as phrases.py holds it (compressed bytes may differ between xz builds; the
    content may not)."""
    from twllm.zh_tw import phrases

    packed = base64.b85decode("".join(phrases.SEGMENTATION_KEYS_XZ_B85))
    return {
        "opencc": phrases.OPENCC_VERSION,
        "segmentation": lzma.decompress(packed).decode("utf-8").split("\n"),
        "taiwan": phrases.TAIWAN_PHRASE_KEYS.split(" "),
        "pairs": phrases.COMPATIBILITY_PAIRS,
        "shared": phrases.SHARED_TRADITIONAL,
    }


def render_phrases(data: PhraseData | None = None) -> str:
    data = data or phrase_data()
    segmentation, taiwan = data["segmentation"], data["taiwan"]
    packed = base64.b85encode(lzma.compress("\n".join(segmentation).encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    return (
        '"""OpenCC phrase keys for cutting a stream (see build_charsets.py), generated from OpenCC '
        f"{data['opencc']}: do not edit.\n\n"
        "Regenerate with `python -m twllm.zh_tw.build_charsets` after changing the opencc pin.\n"
        '"""\n\n'
        f"OPENCC_VERSION = {data['opencc']!r}\n\n"
        f"SEGMENTATION_KEY_COUNT = {len(segmentation)}\n"
        f"MAX_SEGMENTATION_KEY = {max(map(len, segmentation))}\n"
        "SEGMENTATION_KEYS_XZ_B85 = (\n"
        + "\n".join(f'    "{packed[i : i + 88].decode("ascii")}"' for i in range(0, len(packed), 88))
        + "\n)\n"
        '"""STPhrases and STPhrases_GeneratedFromRegionalPhrases keys, sorted, one per line: xz, base85."""\n\n'
        f"TAIWAN_PHRASE_KEYS = (\n{_wrap(' '.join(taiwan))}\n)\n"
        '"""TWPhrases and TWVariantsPhrases keys of two characters or more, space-separated."""\n\n'
        f"COMPATIBILITY_PAIRS = (\n{_wrap(data['pairs'])}\n)\n"
        '"""CJK compatibility ideograph, then the unified ideograph OpenCC normalises it to."""\n\n'
        f"SHARED_TRADITIONAL = {data['shared']!r}\n"
        '"""Traditional-only characters that also occur in Simplified phrase keys (著名)."""\n'
    )


def main(argv: list[str]) -> int:
    charsets, phrase_content = render(), phrase_data()
    if "--check" in argv:
        stale = []
        if (TARGET.read_text(encoding="utf-8") if TARGET.exists() else "") != charsets:
            stale.append(TARGET)
        if not PHRASES_TARGET.exists() or shipped_phrase_data() != phrase_content:
            stale.append(PHRASES_TARGET)
        for target in stale:
            print(f"{target} is stale: run python -m twllm.zh_tw.build_charsets", file=sys.stderr)
        return 1 if stale else 0
    TARGET.write_text(charsets, encoding="utf-8")
    PHRASES_TARGET.write_text(render_phrases(phrase_content), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
