"""Tests for the example ledger domain in cmdlog.apps.ledger: validation and fold."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmdlog import codec
from cmdlog.app import App
from cmdlog.apps import ledger
from cmdlog.apps.example import app as example_app
from cmdlog.engine import prepare_submission
from cmdlog.errors import (
    InvalidArgument,
    MalformedBody,
    NotFound,
    UnknownCommandType,
    ValidationError,
)
from cmdlog.fields import SAFE_INTEGER_MAX
from cmdlog.fold import StateOverlay, apply_command
from cmdlog.model import APPLIED, REJECTED, Command, Outcome

Change = tuple[str, bytes, bytes | None, bytes | None]
Validator = Callable[[dict[str, Any]], dict[str, Any]]


class FakeNode:
    """Domain state in a dict, with each command folded through a fresh overlay.

    The overlay's changes are written back to the dict after each command, so
    a test can check exactly what one command wrote.
    """

    def __init__(self, app: App = example_app) -> None:
        self.app = app
        self.data: dict[tuple[str, bytes], bytes] = {}
        self.stamp = 0

    def apply(
        self,
        type_name: str,
        payload: dict[str, Any],
        *,
        command_id: str | None = None,
        validate: bool = True,
    ) -> tuple[Outcome, list[Change]]:
        """Validate and fold one command; return its outcome and its changes."""
        if validate:
            payload = self.app.types[type_name].validate(payload)
        self.stamp += 1
        command = Command(
            command_id or f"cmd-{self.stamp}", type_name, payload, self.stamp, "node-a"
        )
        overlay = StateOverlay(lambda domain, key: self.data.get((domain, key)))
        outcome, undo = apply_command(self.app, overlay, command)
        changes = list(overlay.changes())
        if outcome.status == REJECTED:
            assert undo == []
        for domain, key, _, value in changes:
            if value is None:
                self.data.pop((domain, key), None)
            else:
                self.data[(domain, key)] = value
        return outcome, changes

    def read(self, domain: str, key: str) -> Any:
        data = self.data.get((domain, key.encode()))
        return None if data is None else codec.unpack(data)

    def account(self, name: str) -> Any:
        return self.read("ledger", ledger.account_key(name))

    def balance(self, name: str) -> int:
        return int(self.account(name)["balance"])


class DictReader:
    """A query's read-only view of one domain in a FakeNode."""

    def __init__(self, node: FakeNode, domain: str) -> None:
        self.node = node
        self.domain = domain

    def get(self, key: str) -> Any:
        return self.node.read(self.domain, key)


def open_accounts(node: FakeNode, *accounts: tuple[str, str, int]) -> None:
    """Open each (name, currency, balance) account and deposit its balance."""
    for name, currency, amount in accounts:
        outcome, _ = node.apply("ledger.open", {"account": name, "currency": currency})
        assert outcome.status == APPLIED
        if amount:
            outcome, _ = node.apply(
                "ledger.deposit", {"account": name, "amount": amount}
            )
            assert outcome.status == APPLIED


def validation_error(validate: Validator, payload: dict[str, Any]) -> ValidationError:
    """Return the ValidationError that `validate` raises for `payload`."""
    with pytest.raises(ValidationError) as excinfo:
        validate(payload)
    return excinfo.value


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


AMOUNT_VALIDATORS: list[tuple[Validator, dict[str, Any]]] = [
    (ledger.validate_deposit, {"account": "a"}),
    (ledger.validate_charge, {"account": "a"}),
    (ledger.validate_transfer, {"from": "a", "to": "b"}),
]
AMOUNT_IDS = ["deposit", "charge", "transfer"]


# Validation.


def test_open_valid() -> None:
    """A valid open payload is returned with the same fields."""
    payload = {"account": "acct-1", "currency": "EUR"}
    assert ledger.validate_open(payload) == payload


@pytest.mark.parametrize("currency", ["EUR1", "eur", "XYZ", "", 978, "E U R"])
def test_open_bad_currency(currency: Any) -> None:
    """A currency that is not an ISO 4217 code in capitals is rejected."""
    error = validation_error(
        ledger.validate_open, {"account": "a", "currency": currency}
    )
    assert error.field == "currency"
    assert error.rule == "iso_4217"
    assert repr(currency) in error.message


def test_open_missing_currency() -> None:
    """An open without a currency is rejected as missing the currency field."""
    error = validation_error(ledger.validate_open, {"account": "a"})
    assert error.field == "currency"
    assert error.rule == "required"


@pytest.mark.parametrize(
    ("account", "rule"),
    [("", "length"), ("a b", "characters"), ("x" * 129, "length"), (7, "type")],
)
def test_open_bad_account(account: Any, rule: str) -> None:
    """An empty, overlong, non-string or spaced account name is rejected."""
    error = validation_error(
        ledger.validate_open, {"account": account, "currency": "EUR"}
    )
    assert error.field == "account"
    assert error.rule == rule


@pytest.mark.parametrize(
    ("amount", "rule"),
    [
        (0, "range"),
        (-1, "range"),
        (2**53, "range"),
        (1.5, "type"),
        (1.0, "type"),
        (True, "type"),
        ("5", "type"),
        (None, "required"),
    ],
)
@pytest.mark.parametrize(("validate", "base"), AMOUNT_VALIDATORS, ids=AMOUNT_IDS)
def test_bad_amount_rejected(
    validate: Validator, base: dict[str, Any], amount: Any, rule: str
) -> None:
    """An amount that is not an integer from 1 to 2**53 - 1 is rejected."""
    error = validation_error(validate, {**base, "amount": amount})
    assert error.field == "amount"
    assert error.rule == rule


@pytest.mark.parametrize("amount", [1, SAFE_INTEGER_MAX])
@pytest.mark.parametrize(("validate", "base"), AMOUNT_VALIDATORS, ids=AMOUNT_IDS)
def test_amount_bounds_accepted(
    validate: Validator, base: dict[str, Any], amount: int
) -> None:
    """Amounts 1 and 2**53 - 1 are accepted unchanged."""
    valid = validate({**base, "amount": amount})
    assert valid["amount"] == amount
    assert type(valid["amount"]) is int


def test_missing_amount_rejected() -> None:
    """A deposit without an amount names the amount field."""
    error = validation_error(ledger.validate_deposit, {"account": "a"})
    assert error.field == "amount"
    assert error.rule == "required"


@pytest.mark.parametrize(
    ("validate", "payload"),
    [
        (ledger.validate_open, {"account": "a", "currency": "EUR"}),
        (ledger.validate_deposit, {"account": "a", "amount": 1}),
        (ledger.validate_charge, {"account": "a", "amount": 1}),
        (ledger.validate_transfer, {"from": "a", "to": "b", "amount": 1}),
    ],
    ids=["open", "deposit", "charge", "transfer"],
)
def test_extra_field_rejected(validate: Validator, payload: dict[str, Any]) -> None:
    """A field the type does not define is rejected by name."""
    error = validation_error(validate, {**payload, "memo": "x"})
    assert error.field == "memo"
    assert error.rule == "unexpected"
    assert "'memo'" in error.message


def test_transfer_same_account_rejected() -> None:
    """A transfer from an account to itself fails validation."""
    error = validation_error(
        ledger.validate_transfer, {"from": "a", "to": "a", "amount": 1}
    )
    assert error.field == "to"
    assert error.rule == "distinct"


def test_charge_reference_optional() -> None:
    """A charge without a reference, or with a null one, stores no reference."""
    assert ledger.validate_charge({"account": "a", "amount": 3}) == {
        "account": "a",
        "amount": 3,
    }
    valid = ledger.validate_charge({"account": "a", "amount": 3, "reference": None})
    assert "reference" not in valid


def test_charge_reference_checked() -> None:
    """A charge reference must be a valid identifier."""
    for reference, rule in [("", "length"), ("a b", "characters"), (5, "type")]:
        error = validation_error(
            ledger.validate_charge,
            {"account": "a", "amount": 1, "reference": reference},
        )
        assert error.field == "reference"
        assert error.rule == rule


# Handlers.


def test_open_creates_account(node: FakeNode) -> None:
    """Opening an account stores it with balance 0 and returns it."""
    outcome, changes = node.apply("ledger.open", {"account": "a", "currency": "EUR"})
    assert outcome == Outcome(
        APPLIED, {"account": "a", "currency": "EUR", "balance": 0}
    )
    assert len(changes) == 1
    assert node.account("a") == {"currency": "EUR", "balance": 0}


def test_open_twice_rejected(node: FakeNode) -> None:
    """Opening an existing account is rejected account_exists and writes nothing."""
    open_accounts(node, ("a", "EUR", 10))
    outcome, changes = node.apply("ledger.open", {"account": "a", "currency": "USD"})
    assert outcome.status == REJECTED
    assert outcome.reason == "account_exists"
    assert changes == []
    assert node.account("a") == {"currency": "EUR", "balance": 10}


def test_deposit_adds(node: FakeNode) -> None:
    """A deposit adds to the balance and returns the new balance."""
    open_accounts(node, ("a", "EUR", 0))
    node.apply("ledger.deposit", {"account": "a", "amount": 70})
    outcome, _ = node.apply("ledger.deposit", {"account": "a", "amount": 5})
    assert outcome == Outcome(APPLIED, {"account": "a", "balance": 75})
    assert node.balance("a") == 75


def test_deposit_unknown_rejected(node: FakeNode) -> None:
    """A deposit to an account never opened is rejected no_such_account."""
    outcome, changes = node.apply("ledger.deposit", {"account": "a", "amount": 5})
    assert outcome.status == REJECTED
    assert outcome.reason == "no_such_account"
    assert changes == []
    assert node.data == {}


def test_deposit_over_limit_rejected(node: FakeNode) -> None:
    """A deposit that would lift a balance above 2**53 - 1 is rejected."""
    open_accounts(node, ("a", "EUR", SAFE_INTEGER_MAX))
    outcome, changes = node.apply("ledger.deposit", {"account": "a", "amount": 1})
    assert outcome.status == REJECTED
    assert outcome.reason == "balance_limit"
    assert changes == []
    assert node.balance("a") == SAFE_INTEGER_MAX


def test_charge_subtracts(node: FakeNode) -> None:
    """A charge subtracts from the balance and records the charge under its ID."""
    open_accounts(node, ("a", "EUR", 100))
    outcome, _ = node.apply(
        "ledger.charge", {"account": "a", "amount": 30}, command_id="c-1"
    )
    assert outcome == Outcome(APPLIED, {"account": "a", "balance": 70})
    assert node.balance("a") == 70
    record = node.read("ledger", ledger.charge_key("c-1"))
    assert record == {"account": "a", "amount": 30, "refunded": 0}


def test_charge_whole_balance(node: FakeNode) -> None:
    """A charge of exactly the balance is applied and leaves zero."""
    open_accounts(node, ("a", "EUR", 100))
    outcome, _ = node.apply("ledger.charge", {"account": "a", "amount": 100})
    assert outcome.status == APPLIED
    assert node.balance("a") == 0


def test_charge_insufficient_rejected(node: FakeNode) -> None:
    """A charge above the balance is rejected insufficient_funds and writes nothing."""
    open_accounts(node, ("a", "EUR", 100))
    outcome, changes = node.apply(
        "ledger.charge", {"account": "a", "amount": 101}, command_id="c-1"
    )
    assert outcome.status == REJECTED
    assert outcome.reason == "insufficient_funds"
    assert outcome.result == {"account": "a", "balance": 100, "amount": 101}
    assert changes == []
    assert node.balance("a") == 100
    assert node.read("ledger", ledger.charge_key("c-1")) is None


def test_charge_unknown_rejected(node: FakeNode) -> None:
    """A charge to an account never opened is rejected no_such_account."""
    outcome, changes = node.apply("ledger.charge", {"account": "a", "amount": 1})
    assert outcome.status == REJECTED
    assert outcome.reason == "no_such_account"
    assert changes == []


def test_transfer_moves_funds(node: FakeNode) -> None:
    """A transfer debits one account, credits the other and returns both."""
    open_accounts(node, ("a", "EUR", 100), ("b", "EUR", 5))
    outcome, changes = node.apply(
        "ledger.transfer", {"from": "a", "to": "b", "amount": 40}
    )
    assert outcome == Outcome(
        APPLIED,
        {
            "from": {"account": "a", "balance": 60},
            "to": {"account": "b", "balance": 45},
        },
    )
    assert len(changes) == 2
    assert node.balance("a") == 60
    assert node.balance("b") == 45


def test_transfer_insufficient_rejected(node: FakeNode) -> None:
    """A transfer above the source balance is rejected and moves nothing."""
    open_accounts(node, ("a", "EUR", 10), ("b", "EUR", 0))
    outcome, changes = node.apply(
        "ledger.transfer", {"from": "a", "to": "b", "amount": 11}
    )
    assert outcome.status == REJECTED
    assert outcome.reason == "insufficient_funds"
    assert changes == []
    assert node.balance("a") == 10
    assert node.balance("b") == 0


@pytest.mark.parametrize(("source", "target"), [("a", "ghost"), ("ghost", "a")])
def test_transfer_unknown_rejected(node: FakeNode, source: str, target: str) -> None:
    """A transfer from or to an account never opened is rejected no_such_account."""
    open_accounts(node, ("a", "EUR", 10))
    outcome, changes = node.apply(
        "ledger.transfer", {"from": source, "to": target, "amount": 5}
    )
    assert outcome.status == REJECTED
    assert outcome.reason == "no_such_account"
    assert outcome.result == {"account": "ghost"}
    assert changes == []
    assert node.balance("a") == 10


def test_transfer_currency_mismatch_rejected(node: FakeNode) -> None:
    """A transfer between accounts of two currencies is rejected currency_mismatch."""
    open_accounts(node, ("a", "EUR", 10), ("b", "USD", 0))
    outcome, changes = node.apply(
        "ledger.transfer", {"from": "a", "to": "b", "amount": 5}
    )
    assert outcome.status == REJECTED
    assert outcome.reason == "currency_mismatch"
    assert outcome.result == {"from": "EUR", "to": "USD"}
    assert changes == []
    assert node.balance("a") == 10


def test_transfer_same_account_handler(node: FakeNode) -> None:
    """A transfer to itself that skipped validation is rejected same_account."""
    open_accounts(node, ("a", "EUR", 10))
    outcome, changes = node.apply(
        "ledger.transfer",
        {"from": "a", "to": "a", "amount": 5},
        validate=False,
    )
    assert outcome.status == REJECTED
    assert outcome.reason == "same_account"
    assert changes == []
    assert node.balance("a") == 10


def test_transfer_over_limit_rejected(node: FakeNode) -> None:
    """A transfer that would lift the target above 2**53 - 1 leaves both unchanged."""
    open_accounts(node, ("a", "EUR", 10), ("b", "EUR", SAFE_INTEGER_MAX))
    outcome, changes = node.apply(
        "ledger.transfer", {"from": "a", "to": "b", "amount": 1}
    )
    assert outcome.status == REJECTED
    assert outcome.reason == "balance_limit"
    assert changes == []
    assert node.balance("a") == 10


# Submissions and natural keys.


def test_charge_reference_names_command() -> None:
    """Two keys for one account and reference give one derived command ID."""
    payload = {"account": "a", "amount": 5, "reference": "order-17"}
    first = prepare_submission(example_app, "key-1", "ledger.charge", payload)
    second = prepare_submission(example_app, "key-2", "ledger.charge", dict(payload))
    assert first.id == second.id
    assert first.id not in ("key-1", "key-2")
    assert first.id.startswith("ledger.charge")
    assert first.fingerprint == second.fingerprint


def test_charge_reference_ignores_key_order() -> None:
    """The derived ID and fingerprint do not depend on payload key order."""
    first = prepare_submission(
        example_app,
        "key-1",
        "ledger.charge",
        {"account": "a", "amount": 5, "reference": "r"},
    )
    second = prepare_submission(
        example_app,
        "key-2",
        "ledger.charge",
        {"reference": "r", "amount": 5, "account": "a"},
    )
    assert first.id == second.id
    assert first.fingerprint == second.fingerprint


def test_charge_reference_other_amount() -> None:
    """Same account and reference with another amount: same ID, new fingerprint."""
    first = prepare_submission(
        example_app,
        "key-1",
        "ledger.charge",
        {"account": "a", "amount": 5, "reference": "r"},
    )
    second = prepare_submission(
        example_app,
        "key-2",
        "ledger.charge",
        {"account": "a", "amount": 6, "reference": "r"},
    )
    assert first.id == second.id
    assert first.fingerprint != second.fingerprint


def test_charge_reference_per_account() -> None:
    """One reference on two accounts names two commands."""
    first = prepare_submission(
        example_app,
        "key-1",
        "ledger.charge",
        {"account": "a", "amount": 5, "reference": "r"},
    )
    second = prepare_submission(
        example_app,
        "key-1",
        "ledger.charge",
        {"account": "b", "amount": 5, "reference": "r"},
    )
    assert first.id != second.id


@pytest.mark.parametrize(
    "payload",
    [{"account": "a", "amount": 5}, {"account": "a", "amount": 5, "reference": None}],
    ids=["absent", "null"],
)
def test_charge_without_reference_uses_key(payload: dict[str, Any]) -> None:
    """A charge without a reference is named by its Idempotency-Key."""
    submission = prepare_submission(example_app, "key-1", "ledger.charge", payload)
    assert submission.id == "key-1"
    assert submission.payload == {"account": "a", "amount": 5}


def test_deposit_uses_key() -> None:
    """A type without a natural key is named by its Idempotency-Key."""
    submission = prepare_submission(
        example_app, "key-9", "ledger.deposit", {"account": "a", "amount": 5}
    )
    assert submission.id == "key-9"
    assert submission.fingerprint == codec.fingerprint(
        "ledger.deposit", {"account": "a", "amount": 5}
    )


def test_submission_unknown_type() -> None:
    """An unregistered type raises UnknownCommandType listing the known ones."""
    with pytest.raises(UnknownCommandType) as excinfo:
        prepare_submission(example_app, "k", "ledger.refund", {"account": "a"})
    assert "ledger.charge" in excinfo.value.known
    assert "ledger.refund" in excinfo.value.message


@pytest.mark.parametrize(
    ("type_name", "payload"),
    [
        ("", {}),
        (None, {}),
        (5, {}),
        ("ledger.deposit", []),
        ("ledger.deposit", None),
        ("ledger.deposit", {"account": "a", "amount": float("nan")}),
        ("ledger.deposit", {"account": "a", "amount": 1, 1: 2}),
    ],
    ids=["empty-type", "null-type", "int-type", "list", "null", "nan", "int-key"],
)
def test_submission_malformed(type_name: Any, payload: Any) -> None:
    """A bad type or a payload outside the JSON model raises MalformedBody."""
    with pytest.raises(MalformedBody):
        prepare_submission(example_app, "k", type_name, payload)


def test_submission_validates_payload() -> None:
    """prepare_submission runs the type's validation."""
    with pytest.raises(ValidationError) as excinfo:
        prepare_submission(
            example_app, "k", "ledger.deposit", {"account": "a", "amount": 1.5}
        )
    assert excinfo.value.field == "amount"


# The balance query.


def test_balance_query(node: FakeNode) -> None:
    """ledger.balance returns the account, its currency and its balance."""
    open_accounts(node, ("a", "GBP", 42))
    result = ledger.balance(DictReader(node, "ledger"), {"account": "a"})
    assert result == {"account": "a", "currency": "GBP", "balance": 42}


@pytest.mark.parametrize("args", [{}, {"account": ""}], ids=["absent", "empty"])
def test_balance_needs_account(node: FakeNode, args: dict[str, str]) -> None:
    """ledger.balance without an account raises InvalidArgument."""
    with pytest.raises(InvalidArgument):
        ledger.balance(DictReader(node, "ledger"), args)


def test_balance_unknown_account(node: FakeNode) -> None:
    """ledger.balance of an account never opened raises NotFound naming it."""
    with pytest.raises(NotFound) as excinfo:
        ledger.balance(DictReader(node, "ledger"), {"account": "ghost"})
    assert "'ghost'" in excinfo.value.message


def test_balance_query_registered() -> None:
    """The example app serves ledger.balance from the ledger domain."""
    query = example_app.query("ledger.balance")
    assert query.domain == "ledger"
    assert query.run is ledger.balance


# Conservation over random command sequences.

CURRENCY_BY_ACCOUNT = {"a": "EUR", "b": "EUR", "c": "EUR", "d": "EUR", "e": "USD"}
ACCOUNT_NAMES = sorted(CURRENCY_BY_ACCOUNT)
account_names = st.sampled_from(ACCOUNT_NAMES)
amounts = st.one_of(
    st.integers(1, 100), st.integers(1, SAFE_INTEGER_MAX), st.just(SAFE_INTEGER_MAX)
)


def ledger_command(
    kind: str, name: str, target_offset: int, amount: int
) -> tuple[str, dict[str, Any]]:
    """Build one valid ledger command; a transfer goes to another account."""
    if kind == "open":
        return kind, {"account": name, "currency": CURRENCY_BY_ACCOUNT[name]}
    if kind == "transfer":
        index = (ACCOUNT_NAMES.index(name) + target_offset) % len(ACCOUNT_NAMES)
        return kind, {"from": name, "to": ACCOUNT_NAMES[index], "amount": amount}
    return kind, {"account": name, "amount": amount}


# Repeated kinds weight the draw toward commands that move money.
ledger_commands = st.builds(
    ledger_command,
    st.sampled_from(["open", "deposit", "deposit", "charge", "transfer", "transfer"]),
    account_names,
    st.integers(1, len(ACCOUNT_NAMES) - 1),
    amounts,
).map(lambda command: (f"ledger.{command[0]}", command[1]))


@given(
    st.lists(account_names, unique=True, min_size=3),
    st.lists(ledger_commands, min_size=5, max_size=40),
)
def test_balances_conserved(
    opened_first: list[str], commands: list[tuple[str, dict[str, Any]]]
) -> None:
    """Per currency, balances sum to applied deposits minus applied charges."""
    # Opening accounts up front lets transfers and charges succeed often; the
    # random commands still open, reopen and miss accounts.
    opens = [
        ("ledger.open", {"account": name, "currency": CURRENCY_BY_ACCOUNT[name]})
        for name in opened_first
    ]
    node = FakeNode()
    expected = {"EUR": 0, "USD": 0}
    opened: set[str] = set()
    for type_name, payload in opens + commands:
        outcome, changes = node.apply(type_name, payload)
        if outcome.status == REJECTED:
            assert changes == []
            continue
        assert outcome.status == APPLIED
        if type_name == "ledger.open":
            opened.add(payload["account"])
        elif type_name == "ledger.deposit":
            expected[CURRENCY_BY_ACCOUNT[payload["account"]]] += payload["amount"]
        elif type_name == "ledger.charge":
            expected[CURRENCY_BY_ACCOUNT[payload["account"]]] -= payload["amount"]
        else:
            source, target = payload["from"], payload["to"]
            assert CURRENCY_BY_ACCOUNT[source] == CURRENCY_BY_ACCOUNT[target]

        totals = {"EUR": 0, "USD": 0}
        for name in CURRENCY_BY_ACCOUNT:
            account = node.account(name)
            if name not in opened:
                assert account is None
                continue
            assert account["currency"] == CURRENCY_BY_ACCOUNT[name]
            assert 0 <= account["balance"] <= SAFE_INTEGER_MAX
            totals[account["currency"]] += account["balance"]
        assert totals == expected
