"""Finding mainland usage in a text, in Simplified or Traditional spelling (what the eval counts)."""

from __future__ import annotations

import re
from functools import cache

from twllm.zh_tw.normalize import prose_runs, to_simplified
from twllm.zh_tw.terms import EXTRA_TERMS, MAINLAND_WORDS


@cache
def _mainland_pattern() -> re.Pattern[str]:
    words = set(MAINLAND_WORDS) | set(EXTRA_TERMS)
    words |= {to_simplified(w) for w in words}
    return re.compile("|".join(map(re.escape, sorted(words, key=len, reverse=True))))


def mainland_terms(text: str) -> list[str]:
    """The mainland terms in the prose of ``text`` (not in code or URLs), in order of
    appearance, in Simplified or Traditional spelling."""
    pattern = _mainland_pattern()
    return [term for run in prose_runs(text) for term in pattern.findall(run)]
