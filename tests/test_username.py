"""Tests for the username canonical form in cmdlog.apps.username."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmdlog.apps import username
from cmdlog.apps.username import (
    DEFAULT_IGNORABLE_RANGES,
    USERNAME_CHARS_MAX,
    canonical_username,
    fold_username,
)
from cmdlog.errors import ValidationError

UNICODE_DATA_DIR = Path("/usr/share/unicode")
INSTALL_HINT = (
    "is missing. Install the Unicode Character Database with "
    "`apt-get install unicode-data` (the Debian package that provides "
    f"{UNICODE_DATA_DIR})"
)

# Characters that change under the fold or interact with their neighbours.
TRICKY_CHARS = (
    "AahjiIİıßẞﬁ\u212aΩ\u1fb3\u1e96"  # full case folding and compatibility forms
    "\u0345\u0301\u0307\u0331\u030c\u0323\u3099\uff9e"  # combining marks
    "\u034f\u200d\u00ad\ufe0f\U000e0041\U000e0100\u115f\u1160"  # ignorables
    "\u1100\u1161\u11a8가かｶＡ\ufdfa"  # Hangul jamo, kana, wide and long forms
    "\u0600._- \ud800"  # a format character, punctuation, a lone surrogate
)

any_text = st.text(
    st.one_of(
        st.characters(exclude_categories=()),  # every category, surrogates too
        st.characters(categories=("L", "M", "Nd")),  # mostly valid usernames
        st.sampled_from(TRICKY_CHARS),
    )
)


def rejection_rule(text: str) -> str:
    """Return the rule that canonical_username reports for `text`."""
    with pytest.raises(ValidationError) as excinfo:
        canonical_username(text)
    return excinfo.value.rule


def outcome(text: str) -> tuple[str, str]:
    """Return ("ok", canonical form) or ("rejected", rule and message)."""
    try:
        return ("ok", canonical_username(text))
    except ValidationError as error:
        return ("rejected", f"{error.rule}: {error.message}")


def read_code_point_field(path: Path, property_name: str) -> dict[int, str]:
    """Parse the lines of a UCD file whose second field is `property_name`.

    Returns each listed code point with its third field decoded as a string
    of code points ("" when the field is absent or empty).
    """
    values: dict[int, str] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            fields = [part.strip() for part in line.split("#", 1)[0].split(";")]
            if len(fields) < 2 or fields[1] != property_name:
                continue
            first, _, last = fields[0].partition("..")
            value = fields[2] if len(fields) > 2 else ""
            mapped = "".join(chr(int(code, 16)) for code in value.split())
            for code_point in range(int(first, 16), int(last or first, 16) + 1):
                values[code_point] = mapped
    return values


def require_ucd_file(name: str) -> Path:
    """Return the path of a UCD file, failing the test if it is not installed."""
    path = UNICODE_DATA_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} {INSTALL_HINT}")
    return path


# Properties over arbitrary text.


@settings(max_examples=500)
@given(any_text)
def test_fold_idempotent(text: str) -> None:
    """Folding a folded string leaves it unchanged."""
    folded = fold_username(text)
    assert fold_username(folded) == folded


@settings(max_examples=500)
@given(any_text)
def test_canonical_idempotent(text: str) -> None:
    """The canonical form of an accepted username is its own canonical form."""
    try:
        canonical = canonical_username(text)
    except ValidationError:
        return
    assert canonical_username(canonical) == canonical


@settings(max_examples=500)
@given(any_text)
def test_canonical_is_fold(text: str) -> None:
    """An accepted username's canonical form equals its fold."""
    try:
        canonical = canonical_username(text)
    except ValidationError:
        return
    assert canonical == fold_username(text)


@settings(max_examples=500)
@given(any_text)
def test_outcome_same_for_fold(text: str) -> None:
    """A string and its fold get the same acceptance or the same rejection."""
    assert outcome(text) == outcome(fold_username(text))


# Folding examples.


def test_case_variants_agree() -> None:
    """Usernames that differ only in case have one canonical form."""
    assert canonical_username("Alice") == "alice"
    assert canonical_username("ALICE") == "alice"
    assert canonical_username("alice") == "alice"


def test_fullwidth_folds() -> None:
    """Fullwidth letters fold to their ASCII forms."""
    assert canonical_username("Ａｌｉｃｅ") == "alice"


def test_ligature_folds() -> None:
    """The ligature U+FB01 folds to the two letters f and i."""
    assert canonical_username("ﬁle") == "file"


def test_sharp_s_folds() -> None:
    """Both sharp s letters fold to "ss"."""
    assert canonical_username("Straße") == "strasse"
    assert canonical_username("STRAẞE") == "strasse"


def test_kelvin_sign_folds() -> None:
    """The Kelvin sign U+212A folds to the letter k."""
    assert canonical_username("\u212aelvin") == "kelvin"


def test_zero_width_joiner_removed() -> None:
    """A zero width joiner is a default ignorable and is removed."""
    assert canonical_username("al\u200dice") == "alice"


def test_soft_hyphen_removed() -> None:
    """A soft hyphen is a default ignorable and is removed."""
    assert canonical_username("al\u00adice") == "alice"


def test_combining_sequence_composes() -> None:
    """A letter followed by a combining accent composes to one code point."""
    assert canonical_username("Cafe\u0301") == "caf\u00e9"


def test_ignorable_inside_sequence_removed() -> None:
    """Removing a grapheme joiner lets the letter and accent compose."""
    assert canonical_username("cafe\u034f\u0301") == "caf\u00e9"


def test_dotted_capital_i_folds() -> None:
    """U+0130 folds to i with a combining dot, not to a Turkic dotless form."""
    assert canonical_username("\u0130stanbul") == "i\u0307stanbul"


def test_max_length_accepted() -> None:
    """A canonical form of exactly USERNAME_CHARS_MAX code points is accepted."""
    text = "a" * USERNAME_CHARS_MAX
    assert canonical_username(text) == text


def test_length_counts_canonical_form() -> None:
    """Default ignorables do not count toward the length limit."""
    text = "a" * USERNAME_CHARS_MAX + "\u200b" * 10
    assert canonical_username(text) == "a" * USERNAME_CHARS_MAX


def test_unassigned_folds_to_itself() -> None:
    """fold_username leaves an unassigned code point and a lone surrogate as is."""
    assert fold_username("\u0378") == "\u0378"
    assert fold_username("\ud800") == "\ud800"


# Rejections.


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("\u200b\u00ad\ufe0f", "empty", id="only-ignorables"),
        pytest.param("   ", "disallowed_character", id="whitespace-only"),
        pytest.param("a" * (USERNAME_CHARS_MAX + 1), "too_long", id="too-long"),
        pytest.param("ﬁ" * 33, "too_long", id="too-long-after-fold"),
        pytest.param("alice\U0001f600", "disallowed_character", id="emoji"),
        pytest.param("a+b", "disallowed_character", id="math-symbol"),
        pytest.param("a@b", "disallowed_character", id="at-sign"),
        pytest.param("al\x00ice", "disallowed_character", id="nul"),
        pytest.param("alice\n", "disallowed_character", id="newline"),
        pytest.param("al ice", "disallowed_character", id="space-inside"),
        pytest.param("al\u00a0ice", "disallowed_character", id="no-break-space"),
        pytest.param("\u0301a", "disallowed_character", id="leading-mark"),
        pytest.param("a.\u0301", "disallowed_character", id="mark-after-dot"),
        pytest.param("a\ud800", "disallowed_character", id="surrogate"),
        pytest.param("a\ue000", "disallowed_character", id="private-use"),
        pytest.param("a\u0378", "disallowed_character", id="unassigned"),
        pytest.param("a\u0600", "disallowed_character", id="format-char"),
        pytest.param("\u00bd", "disallowed_character", id="vulgar-fraction"),
        pytest.param("\u2cfd", "disallowed_character", id="other-number"),
    ],
)
def test_rejection_rule(text: str, rule: str) -> None:
    """Each invalid username is rejected with the expected rule."""
    assert rejection_rule(text) == rule


def test_rejection_message_names_character() -> None:
    """A disallowed-character message names the field, code point and rule."""
    with pytest.raises(ValidationError) as excinfo:
        canonical_username("al ice", field="owner")
    assert excinfo.value.field == "owner"
    assert "owner" in excinfo.value.message
    assert "U+0020" in excinfo.value.message
    assert "disallowed_character" in excinfo.value.message


def test_rejection_message_names_length() -> None:
    """A too-long message gives the found length and the maximum."""
    with pytest.raises(ValidationError) as excinfo:
        canonical_username("a" * 70)
    assert "70" in excinfo.value.message
    assert str(USERNAME_CHARS_MAX) in excinfo.value.message


def test_unstable_fold_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold that needs more than FOLD_ROUNDS_MAX rounds is rejected."""
    monkeypatch.setattr(username, "FOLD_ROUNDS_MAX", 1)
    assert rejection_rule("A") == "unstable_fold"


def test_unstable_fold_maps_to_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """fold_username maps a string whose fold does not settle to ""."""
    monkeypatch.setattr(username, "FOLD_ROUNDS_MAX", 1)
    assert fold_username("A") == ""
    assert fold_username("") == ""


# Agreement with the Unicode Character Database files.

# Code points where fold_username (Unicode 14.0.0 in Python 3.11) deliberately
# differs from the NFKC_CF mapping in DerivedNormalizationProps.txt (Unicode
# 15.0.0 in Debian's unicode-data), with the reason. No code point assigned in
# Unicode 14.0.0 changed its NFKC_CF mapping in 15.0.0, so the dict is empty.
NFKC_CF_DIFFERENCES: dict[int, str] = {}


def test_fold_matches_nfkc_cf() -> None:
    """fold_username maps each assigned code point as NFKC_CF in the UCD does."""
    path = require_ucd_file("DerivedNormalizationProps.txt")
    expected = read_code_point_field(path, "NFKC_CF")
    assert expected, f"{path} lists no NFKC_CF mappings"

    differing: dict[int, tuple[str, str]] = {}
    for code_point in range(0x110000):
        char = chr(code_point)
        if unicodedata.category(char) in ("Cn", "Cs"):
            continue
        folded = fold_username(char)
        mapped = expected.get(code_point, char)
        if folded != mapped:
            differing[code_point] = (folded, mapped)

    unexpected = {
        f"U+{code_point:04X}": found
        for code_point, found in differing.items()
        if code_point not in NFKC_CF_DIFFERENCES
    }
    assert unexpected == {}, "fold_username and NFKC_CF disagree (found, expected)"
    assert set(differing) == set(NFKC_CF_DIFFERENCES)


def test_ignorable_table_matches_ucd() -> None:
    """DEFAULT_IGNORABLE_RANGES lists exactly the UCD's default ignorables."""
    path = require_ucd_file("DerivedCoreProperties.txt")
    expected = set(read_code_point_field(path, "Default_Ignorable_Code_Point"))
    table = {
        code_point
        for first, last in DEFAULT_IGNORABLE_RANGES
        for code_point in range(first, last + 1)
    }
    assert table == expected
