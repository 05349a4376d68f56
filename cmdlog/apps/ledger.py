"""The example `ledger` domain: accounts, deposits, charges and transfers.

Amounts are integers in minor units (cents), from 1 to 2**53 - 1, and a
balance never goes below zero or above 2**53 - 1. Every successful charge is
recorded under its command ID, so a later command type (a refund, say) can
look it up without this handler ever changing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cmdlog import fields
from cmdlog.app import Domain, Rejected, State, StateReader
from cmdlog.apps.currencies import CURRENCY_CODES
from cmdlog.errors import InvalidArgument, NotFound, ValidationError
from cmdlog.model import Command

ledger = Domain("ledger")


def account_key(account: str) -> str:
    return f"account/{account}"


def charge_key(command_id: str) -> str:
    return f"charge/{command_id}"


def _currency(payload: Mapping[str, Any]) -> str:
    code = fields.required(payload, "currency")
    if type(code) is not str or code not in CURRENCY_CODES:
        raise ValidationError(
            "currency",
            "iso_4217",
            f"field 'currency' is {code!r}; send an ISO 4217 code in capitals, "
            "for example 'EUR' or 'USD'",
        )
    return code


def validate_open(payload: dict[str, Any]) -> dict[str, Any]:
    fields.only(payload, ("account", "currency"))
    return {
        "account": fields.name(payload, "account"),
        "currency": _currency(payload),
    }


def validate_deposit(payload: dict[str, Any]) -> dict[str, Any]:
    fields.only(payload, ("account", "amount"))
    return {
        "account": fields.name(payload, "account"),
        "amount": fields.amount(payload, "amount"),
    }


def validate_charge(payload: dict[str, Any]) -> dict[str, Any]:
    fields.only(payload, ("account", "amount", "reference"))
    valid = {
        "account": fields.name(payload, "account"),
        "amount": fields.amount(payload, "amount"),
    }
    if payload.get("reference") is not None:
        valid["reference"] = fields.name(payload, "reference")
    return valid


def validate_transfer(payload: dict[str, Any]) -> dict[str, Any]:
    fields.only(payload, ("from", "to", "amount"))
    valid = {
        "from": fields.name(payload, "from"),
        "to": fields.name(payload, "to"),
        "amount": fields.amount(payload, "amount"),
    }
    if valid["from"] == valid["to"]:
        raise ValidationError(
            "to",
            "distinct",
            "fields 'from' and 'to' name the same account; a transfer needs two",
        )
    return valid


def _account(state: State, name: str) -> dict[str, Any]:
    account: dict[str, Any] | None = state.get(account_key(name))
    if account is None:
        raise Rejected("no_such_account", {"account": name})
    return account


def _credit(account: dict[str, Any], name: str, amount: int) -> None:
    balance = account["balance"] + amount
    if balance > fields.SAFE_INTEGER_MAX:
        raise Rejected("balance_limit", {"account": name})
    account["balance"] = balance


def _debit(account: dict[str, Any], name: str, amount: int) -> None:
    if account["balance"] < amount:
        raise Rejected(
            "insufficient_funds",
            {"account": name, "balance": account["balance"], "amount": amount},
        )
    account["balance"] -= amount


@ledger.command("ledger.open", validate=validate_open)
def open_account(state: State, command: Command) -> dict[str, Any]:
    name = command.payload["account"]
    if state.get(account_key(name)) is not None:
        raise Rejected("account_exists", {"account": name})
    account = {"currency": command.payload["currency"], "balance": 0}
    state.put(account_key(name), account)
    return {"account": name, **account}


@ledger.command("ledger.deposit", validate=validate_deposit)
def deposit(state: State, command: Command) -> dict[str, Any]:
    name = command.payload["account"]
    account = _account(state, name)
    _credit(account, name, command.payload["amount"])
    state.put(account_key(name), account)
    return {"account": name, "balance": account["balance"]}


@ledger.command(
    "ledger.charge", validate=validate_charge, natural_key=("account", "reference")
)
def charge(state: State, command: Command) -> dict[str, Any]:
    name = command.payload["account"]
    amount = command.payload["amount"]
    account = _account(state, name)
    _debit(account, name, amount)
    state.put(account_key(name), account)
    state.put(
        charge_key(command.id), {"account": name, "amount": amount, "refunded": 0}
    )
    return {"account": name, "balance": account["balance"]}


@ledger.command("ledger.transfer", validate=validate_transfer)
def transfer(state: State, command: Command) -> dict[str, Any]:
    source_name = command.payload["from"]
    target_name = command.payload["to"]
    amount = command.payload["amount"]
    if source_name == target_name:
        raise Rejected("same_account", {"account": source_name})
    source = _account(state, source_name)
    target = _account(state, target_name)
    if source["currency"] != target["currency"]:
        raise Rejected(
            "currency_mismatch",
            {"from": source["currency"], "to": target["currency"]},
        )
    _debit(source, source_name, amount)
    _credit(target, target_name, amount)
    state.put(account_key(source_name), source)
    state.put(account_key(target_name), target)
    return {
        "from": {"account": source_name, "balance": source["balance"]},
        "to": {"account": target_name, "balance": target["balance"]},
    }


@ledger.query("ledger.balance")
def balance(state: StateReader, args: Mapping[str, str]) -> dict[str, Any]:
    name = args.get("account")
    if not name:
        raise InvalidArgument(
            "query ledger.balance needs ?account=NAME; the account argument is missing"
        )
    account = state.get(account_key(name))
    if account is None:
        raise NotFound(f"no account named {name!r}; open it with ledger.open first")
    return {
        "account": name,
        "currency": account["currency"],
        "balance": account["balance"],
    }
