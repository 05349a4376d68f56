"""The example app, one release later: behaviour added by accretion only.

This app serves everything `cmdlog.apps.example:app` serves, unchanged, and
adds two types:

- `ledger.refund` credits back part or all of an applied charge. It reads
  the record every successful `ledger.charge` has stored since the first
  release, so the charge handler itself never had to change.
- `users.register.v2` is the second version of `users.register`: it also
  stores an email address. The first version stays registered next to it,
  so commands already in the log fold exactly as before, and clients move
  to the new type at their own pace.

Serve it with `cmdlog serve --app cmdlog.apps.upgraded:app`. Nodes can be
upgraded one at a time: an older node stores the new types it receives
from peers as pending and folds them once it runs this app.
"""

from __future__ import annotations

import re
from typing import Any

from cmdlog import fields
from cmdlog.app import App, Rejected, State
from cmdlog.apps.ledger import account_key, charge_key, ledger
from cmdlog.apps.users import register, users, validate_register
from cmdlog.errors import ValidationError
from cmdlog.model import Command

ledger_with_refunds = ledger.extended()
users_with_email = users.extended()

_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")
_COMMAND_ID = re.compile(r"[\x21-\x7e]{1,319}")


def validate_refund(payload: dict[str, Any]) -> dict[str, Any]:
    fields.only(payload, ("charge", "amount"))
    charge = fields.required(payload, "charge")
    if type(charge) is not str or not _COMMAND_ID.fullmatch(charge):
        raise ValidationError(
            "charge",
            "command_id",
            "field 'charge' must be the command ID of a ledger.charge, as its "
            "command view shows it",
        )
    return {"charge": charge, "amount": fields.amount(payload, "amount")}


@ledger_with_refunds.command("ledger.refund", validate=validate_refund)
def refund(state: State, command: Command) -> dict[str, Any]:
    charge_id = command.payload["charge"]
    amount = command.payload["amount"]
    charge = state.get(charge_key(charge_id))
    if charge is None:
        raise Rejected("no_such_charge", {"charge": charge_id})
    if charge["refunded"] + amount > charge["amount"]:
        raise Rejected(
            "refund_exceeds_charge",
            {"charged": charge["amount"], "refunded": charge["refunded"]},
        )
    account = state.get(account_key(charge["account"]))
    if account is None:
        raise Rejected("no_such_account", {"account": charge["account"]})
    account["balance"] += amount
    charge["refunded"] += amount
    state.put(account_key(charge["account"]), account)
    state.put(charge_key(charge_id), charge)
    return {
        "account": charge["account"],
        "balance": account["balance"],
        "refunded": charge["refunded"],
    }


def validate_register_v2(payload: dict[str, Any]) -> dict[str, Any]:
    email = fields.required(payload, "email")
    if type(email) is not str or not _EMAIL.fullmatch(email):
        raise ValidationError(
            "email", "format", "field 'email' must look like name@example.com"
        )
    valid = validate_register({k: v for k, v in payload.items() if k != "email"})
    return {**valid, "email": email}


@users_with_email.command("users.register.v2", validate=validate_register_v2)
def register_v2(state: State, command: Command) -> dict[str, Any]:
    record: dict[str, Any] = register(state, command)
    record["email"] = command.payload["email"]
    state.put(f"user/{command.payload['canonical']}", record)
    return record


app = App([ledger_with_refunds, users_with_email])
