"""The username canonical form: how two spellings of one username compare equal.

Usernames are compared by the NFKC_Casefold (NFKC_CF) mapping that the Unicode
Character Database lists in DerivedNormalizationProps.txt, so "Alice", "ALICE"
and the fullwidth "Ａｌｉｃｅ" are one name. One round of the fold applies NFKC,
full case folding (`str.casefold`, which has no Turkic special case) and
removal of Default_Ignorable_Code_Point characters, then NFKC again to compose
what the removal brought together. Rounds repeat
until the string stops changing, which makes the fold idempotent: the result is
a string that one more round leaves unchanged.

The mapping uses the Unicode version of the running Python's `unicodedata`
(14.0.0 on Python 3.11), so another Python version can fold a few strings
differently. For that reason a registration keeps the canonical form that the
accepting node computed instead of folding again.

`canonical_username` then accepts only letters, decimal digits, ".", "_", "-"
and combining marks that follow a letter or digit, so spaces, symbols,
controls, format characters, surrogates, private-use and unassigned code
points are rejected.
"""

from __future__ import annotations

import re
import unicodedata

from cmdlog.errors import ValidationError

USERNAME_CHARS_MAX = 64
"""Maximum length of the canonical form, in code points."""

FOLD_ROUNDS_MAX = 4
"""Rounds of the fold tried before a string counts as unstable.

NOTE: That every string settles within this bound is an observation, not a
proof. With Python 3.11's Unicode 14.0 data, each assigned code point, about
2.4 million pairs and 1.4 million triples of composing characters, marks and
ignorables reached their fixed point after one changing round."""

USERNAME_PUNCTUATION = "._-"

# Default_Ignorable_Code_Point ranges, inclusive, copied from
# DerivedCoreProperties-15.0.0.txt. Deriving the property from the Unicode
# 14.0.0 general categories in Python 3.11's `unicodedata` gives the same code
# points. The ranges include unassigned code points that the standard reserves
# as ignorable.
DEFAULT_IGNORABLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),  # SOFT HYPHEN
    (0x034F, 0x034F),  # COMBINING GRAPHEME JOINER
    (0x061C, 0x061C),  # ARABIC LETTER MARK
    (0x115F, 0x1160),  # HANGUL CHOSEONG FILLER..HANGUL JUNGSEONG FILLER
    (0x17B4, 0x17B5),  # KHMER VOWEL INHERENT AQ..KHMER VOWEL INHERENT AA
    (0x180B, 0x180F),  # MONGOLIAN FREE VARIATION SELECTOR ONE..FOUR, VOWEL SEPARATOR
    (0x200B, 0x200F),  # ZERO WIDTH SPACE..RIGHT-TO-LEFT MARK
    (0x202A, 0x202E),  # LEFT-TO-RIGHT EMBEDDING..RIGHT-TO-LEFT OVERRIDE
    (0x2060, 0x206F),  # WORD JOINER..NOMINAL DIGIT SHAPES, with reserved 2065
    (0x3164, 0x3164),  # HANGUL FILLER
    (0xFE00, 0xFE0F),  # VARIATION SELECTOR-1..VARIATION SELECTOR-16
    (0xFEFF, 0xFEFF),  # ZERO WIDTH NO-BREAK SPACE
    (0xFFA0, 0xFFA0),  # HALFWIDTH HANGUL FILLER
    (0xFFF0, 0xFFF8),  # reserved
    (0x1BCA0, 0x1BCA3),  # SHORTHAND FORMAT LETTER OVERLAP..UP STEP
    (0x1D173, 0x1D17A),  # MUSICAL SYMBOL BEGIN BEAM..END PHRASE
    (0xE0000, 0xE0FFF),  # tags, VARIATION SELECTOR-17..256, and reserved
)


def _compile_ranges(ranges: tuple[tuple[int, int], ...]) -> re.Pattern[str]:
    parts = [
        f"{re.escape(chr(first))}-{re.escape(chr(last))}" for first, last in ranges
    ]
    return re.compile(f"[{''.join(parts)}]")


_DEFAULT_IGNORABLE = _compile_ranges(DEFAULT_IGNORABLE_RANGES)


def _fold_round(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = _DEFAULT_IGNORABLE.sub("", folded)
    return unicodedata.normalize("NFKC", folded)


def _fold_to_fixed_point(text: str) -> str | None:
    """Fold `text` until a round leaves it unchanged, or return None if
    FOLD_ROUNDS_MAX rounds are not enough."""
    current = text
    for _ in range(FOLD_ROUNDS_MAX):
        folded = _fold_round(current)
        if folded == current:
            return current
        current = folded
    return None


def fold_username(text: str) -> str:
    """Map `text` by NFKC_Casefold, repeated until the result is stable.

    The function is idempotent for every `str`, including lone surrogates and
    unassigned code points: its result is a string that it maps to itself. A
    string that is still changing after FOLD_ROUNDS_MAX rounds maps to "",
    which is also a fixed point. No such string is known, and
    `canonical_username` rejects them instead of returning "".
    """
    folded = _fold_to_fixed_point(text)
    if folded is None:
        return ""
    return folded


def canonical_username(text: str, *, field: str = "username") -> str:
    """Return the canonical form of the username `text`.

    The canonical form is `fold_username(text)`, and it is its own canonical
    form. Raises `ValidationError` naming `field`, with one of these rules:

    - "unstable_fold": the fold does not settle within FOLD_ROUNDS_MAX rounds.
    - "empty": nothing is left after folding.
    - "disallowed_character": the folded text contains a character other than
      a letter, a decimal digit, one of "._-", or a combining mark that
      follows a letter or digit.
    - "too_long": the canonical form has more than USERNAME_CHARS_MAX code
      points.
    """
    folded = _fold_to_fixed_point(text)
    if folded is None:
        raise ValidationError(
            field,
            "unstable_fold",
            f"{field} is invalid (unstable_fold): it still changes after "
            f"{FOLD_ROUNDS_MAX} rounds of Unicode folding. Use a username made "
            f"of letters, decimal digits and {USERNAME_PUNCTUATION!r}",
        )

    if not folded:
        raise ValidationError(
            field,
            "empty",
            f"{field} is invalid (empty): nothing is left after NFKC, case "
            "folding and removal of default ignorable code points. Give at "
            "least one letter or digit",
        )

    _check_characters(folded, field)

    if len(folded) > USERNAME_CHARS_MAX:
        raise ValidationError(
            field,
            "too_long",
            f"{field} is invalid (too_long): the folded username has "
            f"{len(folded)} code points and the maximum is "
            f"{USERNAME_CHARS_MAX}. Use a shorter username",
        )
    return folded


def _check_characters(folded: str, field: str) -> None:
    """Raise `ValidationError` at the first character of `folded` that a
    username may not contain."""
    follows_base = False
    for index, char in enumerate(folded):
        category = unicodedata.category(char)
        if category[0] == "L" or category == "Nd":
            follows_base = True
            continue
        if category[0] == "M":
            if follows_base:
                continue
            requirement = "a combining mark must follow a letter or digit"
        elif char in USERNAME_PUNCTUATION:
            follows_base = False
            continue
        else:
            requirement = (
                "a username may contain only letters, decimal digits, "
                f"combining marks and {USERNAME_PUNCTUATION!r}"
            )
        raise ValidationError(
            field,
            "disallowed_character",
            f"{field} is invalid (disallowed_character): the folded username "
            f"has {_describe(char)} at index {index}, but {requirement}. "
            "Remove or replace that character",
        )


def _describe(char: str) -> str:
    name = unicodedata.name(char, "")
    code = f"U+{ord(char):04X}"
    if name:
        return f"{code} {name}"
    return f"{code} (category {unicodedata.category(char)})"
