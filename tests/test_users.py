"""Tests for the example users domain in cmdlog.apps.users."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmdlog import codec
from cmdlog.apps import users
from cmdlog.apps.example import app as example_app
from cmdlog.engine import prepare_submission
from cmdlog.errors import ClientError, InvalidArgument, NotFound, ValidationError
from cmdlog.fold import StateOverlay, apply_command
from cmdlog.model import APPLIED, REJECTED, Command, Outcome

Change = tuple[str, bytes, bytes | None, bytes | None]


class FakeNode:
    """Domain state in a dict, with each command folded through a fresh overlay."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, bytes], bytes] = {}
        self.stamp = 0

    def apply(
        self, payload: dict[str, Any], *, validate: bool = True
    ) -> tuple[Outcome, list[Change]]:
        """Validate and fold one users.register; return its outcome and changes."""
        if validate:
            payload = users.validate_register(payload)
        self.stamp += 1
        command = Command(
            f"cmd-{self.stamp}", "users.register", payload, self.stamp, "node-a"
        )
        overlay = StateOverlay(lambda domain, key: self.data.get((domain, key)))
        outcome, undo = apply_command(example_app, overlay, command)
        changes = list(overlay.changes())
        if outcome.status == REJECTED:
            assert undo == []
        for domain, key, _, value in changes:
            assert value is not None
            self.data[(domain, key)] = value
        return outcome, changes

    def get(self, key: str) -> Any:
        """Read one key of the users domain, as a query's state reader does."""
        data = self.data.get(("users", key.encode()))
        return None if data is None else codec.unpack(data)


def register(username: str, display_name: str = "Someone") -> dict[str, Any]:
    return {"username": username, "display_name": display_name}


def validation_error(payload: dict[str, Any]) -> ValidationError:
    """Return the ValidationError that validate_register raises for `payload`."""
    with pytest.raises(ValidationError) as excinfo:
        users.validate_register(payload)
    return excinfo.value


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


# Validation.


def test_register_stores_canonical() -> None:
    """Validation keeps the username as sent and adds its canonical form."""
    valid = users.validate_register(register("Alice", "Alice A."))
    assert valid == {
        "username": "Alice",
        "display_name": "Alice A.",
        "canonical": "alice",
    }


@pytest.mark.parametrize("username", ["ALICE", "alice", "Ａｌｉｃｅ", "al\u200bice"])
def test_register_canonical_forms(username: str) -> None:
    """Case, width and ignorable variants of one name share a canonical form."""
    assert users.validate_register(register(username))["canonical"] == "alice"


@pytest.mark.parametrize(
    ("username", "rule"),
    [
        ("", "empty"),
        ("\u200b", "empty"),
        ("a b", "disallowed_character"),
        ("bob!", "disallowed_character"),
        ("x" * 65, "too_long"),
        (5, "type"),
        (None, "required"),
    ],
)
def test_register_bad_username(username: Any, rule: str) -> None:
    """An invalid username is rejected naming the username field."""
    error = validation_error({"username": username, "display_name": "X"})
    assert error.field == "username"
    assert error.rule == rule


def test_register_missing_username() -> None:
    """A registration without a username names the username field."""
    error = validation_error({"display_name": "X"})
    assert error.field == "username"
    assert error.rule == "required"


@pytest.mark.parametrize(
    ("display_name", "rule"),
    [
        (None, "required"),
        ("", "length"),
        ("   ", "length"),
        ("x" * 129, "length"),
        ("a\nb", "characters"),
        ("a\x85b", "characters"),
        (7, "type"),
    ],
)
def test_register_bad_display_name(display_name: Any, rule: str) -> None:
    """A missing, blank, overlong or control-laden display name is rejected."""
    error = validation_error(register("alice", display_name))
    assert error.field == "display_name"
    assert error.rule == rule


def test_register_display_name_max() -> None:
    """A display name of 128 characters, with spaces and non-ASCII, is accepted."""
    display_name = "Zoë " + "x" * 124
    valid = users.validate_register(register("zoe", display_name))
    assert valid["display_name"] == display_name


def test_register_extra_field_rejected() -> None:
    """A field users.register does not define is rejected by name."""
    error = validation_error({**register("alice"), "canonical": "mallory"})
    assert error.field == "canonical"
    assert error.rule == "unexpected"


# Handler.


def test_register_applied(node: FakeNode) -> None:
    """A registration stores and returns the canonical name and its command ID."""
    outcome, changes = node.apply(register("Alice", "Alice A."))
    record = {
        "username": "alice",
        "display_name": "Alice A.",
        "registered_by": "cmd-1",
    }
    assert outcome == Outcome(APPLIED, record)
    assert len(changes) == 1
    assert node.get(users.user_key("alice")) == record


def test_register_case_collision(node: FakeNode) -> None:
    """ "ALICE" after "Alice" is rejected username_taken and writes nothing."""
    first, _ = node.apply(register("Alice", "First"))
    assert first.status == APPLIED
    second, changes = node.apply(register("ALICE", "Second"))
    assert second.status == REJECTED
    assert second.reason == "username_taken"
    assert second.result == {"username": "alice"}
    assert changes == []
    assert node.get(users.user_key("alice"))["display_name"] == "First"


def test_register_distinct_names(node: FakeNode) -> None:
    """Two names with different canonical forms are both applied."""
    first, _ = node.apply(register("alice"))
    second, _ = node.apply(register("alicia"))
    assert first.status == APPLIED
    assert second.status == APPLIED


def test_register_uses_stored_canonical(node: FakeNode) -> None:
    """The handler keys the record by the stored canonical form, never refolding."""
    payload = {"username": "Bob", "display_name": "B", "canonical": "robert"}
    outcome, _ = node.apply(payload, validate=False)
    assert outcome.status == APPLIED
    assert node.get(users.user_key("robert")) is not None
    assert node.get(users.user_key("bob")) is None


# Query.


def test_lookup_by_variant(node: FakeNode) -> None:
    """users.lookup finds a registration by any spelling with its canonical form."""
    node.apply(register("Alice", "Alice A."))
    for spelling in ("alice", "ALICE", "Ａｌｉｃｅ"):
        record = users.lookup(node, {"username": spelling})
        assert record["username"] == "alice"
        assert record["display_name"] == "Alice A."


def test_lookup_unknown(node: FakeNode) -> None:
    """users.lookup of a name never registered raises NotFound naming it."""
    with pytest.raises(NotFound) as excinfo:
        users.lookup(node, {"username": "Ghost"})
    assert "'ghost'" in excinfo.value.message


@pytest.mark.parametrize("args", [{}, {"username": ""}], ids=["absent", "empty"])
def test_lookup_needs_username(node: FakeNode, args: dict[str, str]) -> None:
    """users.lookup without a username raises InvalidArgument."""
    with pytest.raises(InvalidArgument):
        users.lookup(node, args)


def test_lookup_invalid_username(node: FakeNode) -> None:
    """users.lookup of a name that cannot be a username raises a client error."""
    with pytest.raises(ClientError) as excinfo:
        users.lookup(node, {"username": "a b"})
    assert 400 <= excinfo.value.status < 500
    assert "username" in excinfo.value.message


# Submission through the example app.


def test_submission_adds_canonical() -> None:
    """prepare_submission stores the canonical form and fingerprints it."""
    submission = prepare_submission(
        example_app, "key-1", "users.register", register("Alice")
    )
    assert submission.id == "key-1"
    assert submission.payload["canonical"] == "alice"
    assert submission.fingerprint == codec.fingerprint(
        "users.register", submission.payload
    )


def test_submission_rejects_username() -> None:
    """prepare_submission raises ValidationError for an invalid username."""
    with pytest.raises(ValidationError) as excinfo:
        prepare_submission(example_app, "key-1", "users.register", register("a b"))
    assert excinfo.value.field == "username"


# Uniqueness over random registrations.

FULLWIDTH_OFFSET = ord("Ａ") - ord("A")  # U+FF21 FULLWIDTH LATIN CAPITAL LETTER A


def spell(name: str, *, upper: bool, wide: bool) -> tuple[str, str]:
    """Return `name` and a spelling of it in capitals, fullwidth letters or both."""
    spelling = name.upper() if upper else name
    if wide:
        spelling = "".join(chr(ord(char) + FULLWIDTH_OFFSET) for char in spelling)
    return name, spelling


spellings = st.builds(
    spell,
    st.sampled_from(["alice", "bob", "carol", "al", "a"]),
    upper=st.booleans(),
    wide=st.booleans(),
)


@given(st.lists(spellings, max_size=20))
def test_one_registration_per_canonical(
    registrations: list[tuple[str, str]],
) -> None:
    """Exactly the first spelling of each name is applied; later ones are taken."""
    node = FakeNode()
    holders: dict[str, str] = {}
    for name, spelling in registrations:
        outcome, changes = node.apply(register(spelling, spelling))
        if name in holders:
            assert outcome.status == REJECTED
            assert outcome.reason == "username_taken"
            assert changes == []
        else:
            assert outcome.status == APPLIED
            assert outcome.result["username"] == name
            holders[name] = spelling
    for name, spelling in holders.items():
        assert node.get(users.user_key(name))["display_name"] == spelling
