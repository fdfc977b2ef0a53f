"""Regenerates twllm/zh_tw/charsets.py from the dictionaries inside the installed `opencc` wheel.

    python -m twllm.zh_tw.build_charsets          # rewrite charsets.py
    python -m twllm.zh_tw.build_charsets --check  # exit 1 when charsets.py is stale

The character sets are derived, not hand-written: a Simplified-only character is a key of
OpenCC's STCharacters whose Traditional candidates do not include itself and which is not a
Traditional form anywhere in OpenCC (干 is a candidate of itself, 后 a candidate of 后, 台 of
台: all three are shared; 发 maps only to 發/髮: Simplified-only). The wheel ships its
dictionaries as binary .ocd2 files, so they are dumped to text with the wheel's own
`opencc_dict` tool; that needs the tool at build time only, never at import time.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import opencc

TARGET = Path(__file__).with_name("charsets.py")
DICTIONARIES = ("STCharacters", "TSCharacters", "TWVariants")
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
        subprocess.run([str(clib / "bin" / "opencc_dict"), "-i", str(clib / "share" / "opencc" / f"{name}.ocd2"),
                        "-o", str(out), "-f", "ocd2", "-t", "text"], check=True, capture_output=True)
        entries: dict[str, list[str]] = {}
        for line in out.read_text(encoding="utf-8").splitlines():
            key, _, values = line.partition("\t")
            entries[key] = values.split(" ")
    return entries


def derive(st: dict[str, list[str]], ts: dict[str, list[str]], tw: dict[str, list[str]]) -> tuple[str, str]:
    """(Simplified-only characters, Traditional-only characters), each sorted."""
    traditional_forms = {c for values in st.values() for c in values} | set(ts) | {
        c for values in tw.values() for c in values} | set(tw)
    simplified_only = {k for k, values in st.items()
                       if len(k) == 1 and k not in values and k not in traditional_forms} - TAIWAN_STANDARD
    simplified_forms = set(st) | {c for values in ts.values() for c in values}
    traditional_only = {k for k, values in ts.items() if len(k) == 1 and k not in values and k not in simplified_forms}
    traditional_only |= {c for values in tw.values() for c in values if c not in simplified_forms}
    return "".join(sorted(simplified_only)), "".join(sorted(traditional_only))


def render() -> str:
    simplified_only, traditional_only = derive(*(read_dictionary(name) for name in DICTIONARIES))
    wrap = lambda s: "\n".join(f'    "{s[i:i + 64]}"' for i in range(0, len(s), 64))  # noqa: E731
    return (
        '"""Simplified-only and Traditional-only characters, generated from OpenCC '
        f'{opencc.__version__}: do not edit.\n\n'
        "Regenerate with `python -m twllm.zh_tw.build_charsets` after changing the opencc pin.\n"
        '"""\n\n'
        f"OPENCC_VERSION = {opencc.__version__!r}\n\n"
        f"SIMPLIFIED_ONLY = frozenset(\n{wrap(simplified_only)}\n)\n\n"
        f"TRADITIONAL_ONLY = frozenset(\n{wrap(traditional_only)}\n)\n"
    )


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is stale: run python -m twllm.zh_tw.build_charsets", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
