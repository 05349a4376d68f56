"""Payload field checks for command validators.

Each check reads one field, raises `ValidationError` naming the field, the
rule and the fix, and returns the value to store. Apps build their
validators from these so every type reports bad input the same way.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from cmdlog.errors import ValidationError

SAFE_INTEGER_MAX = 2**53 - 1
"""The largest integer every JSON client keeps exactly."""

_NAME_PATTERN = re.compile(r"[A-Za-z0-9._:@-]+")


def only(payload: Mapping[str, Any], allowed: Collection[str]) -> None:
    """Reject fields that the type does not define."""
    for name in payload:
        if name not in allowed:
            raise ValidationError(
                name,
                "unexpected",
                f"unexpected field {name!r}; this type takes only "
                f"{', '.join(sorted(allowed))}",
            )


def required(payload: Mapping[str, Any], name: str) -> Any:
    if name not in payload or payload[name] is None:
        raise ValidationError(name, "required", f"field {name!r} is required")
    return payload[name]


def name(payload: Mapping[str, Any], field: str, *, chars_max: int = 128) -> str:
    """Return an identifier field: 1 to `chars_max` of A-Z a-z 0-9 . _ : @ -."""
    value = required(payload, field)
    if type(value) is not str:
        raise ValidationError(
            field,
            "type",
            f"field {field!r} must be a string, found {type(value).__name__}",
        )
    if not 1 <= len(value) <= chars_max:
        raise ValidationError(
            field,
            "length",
            f"field {field!r} has {len(value)} characters; send 1 to {chars_max}",
        )
    if not _NAME_PATTERN.fullmatch(value):
        raise ValidationError(
            field,
            "characters",
            f"field {field!r} is {value!r}; use only letters A-Z and a-z, digits "
            "and . _ : @ -",
        )
    return value


def text(payload: Mapping[str, Any], field: str, *, chars_max: int = 256) -> str:
    """Return a free-text field: 1 to `chars_max` characters, no control characters."""
    value = required(payload, field)
    if type(value) is not str:
        raise ValidationError(
            field,
            "type",
            f"field {field!r} must be a string, found {type(value).__name__}",
        )
    if not 1 <= len(value) <= chars_max or not value.strip():
        raise ValidationError(
            field,
            "length",
            f"field {field!r} must have 1 to {chars_max} characters and not be blank",
        )
    for char in value:
        if ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0:
            raise ValidationError(
                field,
                "characters",
                f"field {field!r} contains control character U+{ord(char):04X}; "
                "remove it",
            )
    return value


def amount(payload: Mapping[str, Any], field: str) -> int:
    """Return a positive integer amount in minor units, at most 2**53 - 1."""
    value = required(payload, field)
    if type(value) is not int:
        raise ValidationError(
            field,
            "type",
            f"field {field!r} must be an integer number of minor units (cents), "
            f"found {type(value).__name__} {value!r}",
        )
    if not 1 <= value <= SAFE_INTEGER_MAX:
        raise ValidationError(
            field,
            "range",
            f"field {field!r} is {value}; send an integer from 1 to {SAFE_INTEGER_MAX}",
        )
    return value


def one_of(payload: Mapping[str, Any], field: str, choices: Collection[str]) -> str:
    value = required(payload, field)
    if value not in choices:
        raise ValidationError(
            field,
            "choice",
            f"field {field!r} is {value!r}, which is not a valid value",
        )
    return str(value)
