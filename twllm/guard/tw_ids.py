"""Checksums of Taiwan identifiers: national ID and resident numbers, 統一編號, Luhn.

Pure functions on already-extracted strings (ASCII, no separators); finding the strings in text
is `twllm.guard.pii`'s job. Each function's docstring states the rule it checks.
"""

from __future__ import annotations

from typing import Literal

IdKind = Literal["citizen", "resident_new", "resident_old"]

# Letter values of the first character (and of an old resident number's second character).
LETTER_VALUES: dict[str, int] = {
    "A": 10,
    "B": 11,
    "C": 12,
    "D": 13,
    "E": 14,
    "F": 15,
    "G": 16,
    "H": 17,
    "I": 34,
    "J": 18,
    "K": 19,
    "L": 20,
    "M": 21,
    "N": 22,
    "O": 35,
    "P": 23,
    "Q": 24,
    "R": 25,
    "S": 26,
    "T": 27,
    "U": 28,
    "V": 29,
    "W": 32,
    "X": 30,
    "Y": 31,
    "Z": 33,
}
_ID_WEIGHTS = (1, 9, 8, 7, 6, 5, 4, 3, 2, 1, 1)
_BUSINESS_WEIGHTS = (1, 2, 1, 2, 1, 2, 4, 1)
_DIGITS = frozenset("0123456789")


def id_kind(value: str) -> IdKind | None:
    """What a 10-character ID is, or None if its format or checksum is wrong.

    `[A-Z][12]\\d{8}` is a citizen's national ID; `[A-Z][89]\\d{8}` a resident certificate number
    in the format issued since 2021; `[A-Z][A-D]\\d{8}` one in the old format (valid until 2031),
    whose second letter counts as its letter value mod 10. Lower-case letters are accepted.
    Checksum: the first letter's two-digit value (LETTER_VALUES), the second character and the
    eight digits, weighted 1,9,8,7,6,5,4,3,2,1,1; valid when the sum is divisible by 10.
    """
    if len(value) != 10:
        return None
    value = value.upper()
    first, second, rest = value[0], value[1], value[2:]
    if first not in LETTER_VALUES or not _DIGITS.issuperset(rest):
        return None
    if second in "12":
        kind: IdKind = "citizen"
        second_value = int(second)
    elif second in "89":
        kind, second_value = "resident_new", int(second)
    elif second in "ABCD":
        kind, second_value = "resident_old", LETTER_VALUES[second] % 10
    else:
        return None
    letter = LETTER_VALUES[first]
    numbers = (letter // 10, letter % 10, second_value, *(int(c) for c in rest))
    total = sum(w * n for w, n in zip(_ID_WEIGHTS, numbers))
    return kind if total % 10 == 0 else None


def business_id_ok(value: str) -> bool:
    """Whether an 8-digit unified business number (統一編號) has a valid checksum.

    Each digit times its weight (1,2,1,2,1,2,4,1); the two digits of each product are added
    (7×4 = 28 counts as 10) and the results summed. Valid when the sum is divisible by 5 (the
    rule since 2023-04-01; divisible by 10 before, so every old number still passes) or, when the
    7th digit is 7, when sum + 1 is (the 10 from 28 may count as 1 or as 0).
    """
    if len(value) != 8 or not _DIGITS.issuperset(value):
        return False
    total = 0
    for weight, char in zip(_BUSINESS_WEIGHTS, value):
        product = weight * int(char)
        total += product // 10 + product % 10
    return total % 5 == 0 or (value[6] == "7" and (total + 1) % 5 == 0)


def luhn_ok(digits: str) -> bool:
    """Whether a string of digits passes the Luhn check (payment card numbers)."""
    if not digits or not _DIGITS.issuperset(digits):
        return False
    total = 0
    for i, char in enumerate(reversed(digits)):
        n = int(char)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0
