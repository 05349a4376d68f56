"""The example `users` domain: usernames unique by their canonical form.

The accepting node canonicalizes the username in validation and stores the
result in the payload as `canonical`, so the fold only compares stored
strings and nodes built on different Unicode versions still converge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cmdlog import fields
from cmdlog.app import Domain, Rejected, State, StateReader
from cmdlog.apps.username import canonical_username
from cmdlog.errors import InvalidArgument, NotFound, ValidationError
from cmdlog.model import Command

users = Domain("users")


def user_key(canonical: str) -> str:
    return f"user/{canonical}"


def validate_register(payload: dict[str, Any]) -> dict[str, Any]:
    fields.only(payload, ("username", "display_name"))
    username = fields.required(payload, "username")
    if type(username) is not str:
        raise ValidationError(
            "username",
            "type",
            f"field 'username' must be a string, found {type(username).__name__}",
        )
    return {
        "username": username,
        "display_name": fields.text(payload, "display_name", chars_max=128),
        "canonical": canonical_username(username),
    }


@users.command("users.register", validate=validate_register)
def register(state: State, command: Command) -> dict[str, Any]:
    canonical = command.payload["canonical"]
    holder = state.get(user_key(canonical))
    if holder is not None:
        raise Rejected("username_taken", {"username": canonical})
    record = {
        "username": canonical,
        "display_name": command.payload["display_name"],
        "registered_by": command.id,
    }
    state.put(user_key(canonical), record)
    return record


@users.query("users.lookup")
def lookup(state: StateReader, args: Mapping[str, str]) -> dict[str, Any]:
    username = args.get("username")
    if not username:
        raise InvalidArgument(
            "query users.lookup needs ?username=NAME; the username argument is missing"
        )
    try:
        canonical = canonical_username(username)
    except ValidationError as exc:
        raise InvalidArgument(f"query argument {exc.message}") from exc
    record: dict[str, Any] | None = state.get(user_key(canonical))
    if record is None:
        raise NotFound(f"no user registered as {canonical!r}")
    return record
