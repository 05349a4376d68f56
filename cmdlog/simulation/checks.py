"""The simulation's checks of every promise on the settled cluster, with a
plain model of the ledger's rules."""

from __future__ import annotations

from collections import Counter
from typing import Any

from cmdlog import codec, fold
from cmdlog.engine import Status, command_at
from cmdlog.errors import NotFound
from cmdlog.model import APPLIED, Command, split_order_key
from cmdlog.replay import replay
from cmdlog.simulation.records import Node, Snapshot, Violations
from cmdlog.simulation.settings import ACCOUNTS, APP


def read_snapshot(node: Node) -> Snapshot:
    db = node.database()
    status = db.status()
    with db.store.read() as txn:
        copies = [
            Command.from_record(codec.unpack(record))
            for _seq, record in txn.log_iter(0)
        ]
        kept_keys: dict[str, bytes] = {}
        for command in copies:
            seq = txn.id_get(command.id)
            if seq is not None and command.id not in kept_keys:
                kept_keys[command.id] = command_at(txn, seq, command.id).order_key
        folded = [
            (key, fold.unpack_outcome(packed), Command.from_record(txn.log_get(seq)))
            for key, seq, packed in txn.folded_from(b"")
        ]
    balances: dict[str, Any] = {}
    for account in ACCOUNTS:
        try:
            balances[account] = db.query("ledger.balance", {"account": account})
        except NotFound:
            balances[account] = None
    return Snapshot(node.index, status, copies, kept_keys, folded, balances)


def status_summary(status: Status) -> tuple[int, int, str, str]:
    return status.commands, status.applied, status.state_digest, status.log_digest


def check_node(
    snapshot: Snapshot, acknowledged: dict[str, int], violations: Violations
) -> None:
    """Check one node: each ID folded once, every acknowledged ID stored,
    each copy logged once, and nothing left pending."""
    where = f"node {snapshot.node}"
    folded_ids = Counter(command.id for _key, _outcome, command in snapshot.folded)
    for command_id, count in folded_ids.items():
        if count > 1:
            violations.add(
                "at_most_once", f"{where} folds command {command_id} {count} times"
            )
    for key, _outcome, command in snapshot.folded:
        if snapshot.kept_keys.get(command.id) != key:
            violations.add(
                "at_most_once",
                f"{where} folds a copy of {command.id} its index does not name",
            )
    for command_id in snapshot.kept_keys:
        if command_id not in folded_ids:
            violations.add(
                "at_most_once", f"{where} stores {command_id} but never folds it"
            )
    for command_id, first_node in acknowledged.items():
        if command_id not in snapshot.kept_keys:
            violations.add(
                "durability",
                f"{where} lacks command {command_id}, acknowledged by node "
                f"{first_node}",
            )
    for key, count in Counter(c.order_key for c in snapshot.copies).items():
        if count > 1:
            _stamp, origin, command_id = split_order_key(key)
            violations.add(
                "log",
                f"{where} appended the copy of {command_id} from {origin} "
                f"{count} times",
            )
    status = snapshot.status
    if status.commands != len(snapshot.kept_keys) or status.pending:
        violations.add(
            "at_most_once",
            f"{where} status counts {status.commands} commands and "
            f"{status.pending} pending, but its log contains "
            f"{len(snapshot.kept_keys)} IDs",
        )


def check_convergence(snapshots: list[Snapshot], violations: Violations) -> None:
    first = status_summary(snapshots[0].status)
    for snapshot in snapshots[1:]:
        summary = status_summary(snapshot.status)
        if summary != first:
            violations.add(
                "convergence",
                f"node {snapshot.node} has (commands, applied, state, log) "
                f"{summary}, node {snapshots[0].node} has {first}",
            )


def check_canonical_copies(snapshots: list[Snapshot], violations: Violations) -> None:
    """Check that every node keeps the copy of each ID that sorts first."""
    first_copy: dict[str, bytes] = {}
    for snapshot in snapshots:
        for command in snapshot.copies:
            key = command.order_key
            if command.id not in first_copy or key < first_copy[command.id]:
                first_copy[command.id] = key
    for snapshot in snapshots:
        for command_id, key in snapshot.kept_keys.items():
            if first_copy[command_id] != key:
                stamp, origin, _id = split_order_key(key)
                violations.add(
                    "canonical_order",
                    f"node {snapshot.node} keeps the copy of {command_id} stamped "
                    f"{stamp} by {origin}, not the first in canonical order",
                )


def check_ledger(snapshot: Snapshot, violations: Violations) -> None:
    """Fold the node's commands again with a plain model of the ledger rules
    and compare outcomes and balances."""
    where = f"node {snapshot.node}"
    accounts: dict[str, dict[str, Any]] = {}
    charged: Counter[tuple[str, str]] = Counter()
    for _key, outcome, command in snapshot.folded:
        status, reason = _model_apply(accounts, command)
        if (outcome.status, outcome.reason) != (status, reason):
            violations.add(
                "ledger",
                f"{where} has {command.id} {outcome.status} ({outcome.reason}), "
                f"the model {status} ({reason})",
            )
        elif status == APPLIED and outcome.result != _model_result(accounts, command):
            violations.add(
                "ledger",
                f"{where} has {command.id} with result {outcome.result}, the model "
                f"{_model_result(accounts, command)}",
            )
        reference = command.payload.get("reference")
        if command.type == "ledger.charge" and reference and status == APPLIED:
            charged[(command.payload["account"], reference)] += 1
    for (account, reference), count in charged.items():
        if count > 1:
            violations.add(
                "ledger", f"{where} charged {account} {count} times for {reference}"
            )
    for name, balance in snapshot.balances.items():
        model = accounts.get(name)
        expected = None if model is None else {"account": name, **model}
        if balance != expected:
            violations.add(
                "ledger", f"{where} has {name} as {balance}, the model {expected}"
            )
        if balance is not None and balance["balance"] < 0:
            violations.add("ledger", f"{where} has a negative balance on {name}")


def _model_apply(
    accounts: dict[str, dict[str, Any]], command: Command
) -> tuple[str, str | None]:
    """Apply one command to the model and return its status and reason."""
    payload = command.payload
    if command.type == "ledger.open":
        if payload["account"] in accounts:
            return "rejected", "account_exists"
        accounts[payload["account"]] = {"currency": payload["currency"], "balance": 0}
        return APPLIED, None
    names = (
        [payload["from"], payload["to"]]
        if command.type == "ledger.transfer"
        else [payload["account"]]
    )
    if any(name not in accounts for name in names):
        return "rejected", "no_such_account"
    amount = payload["amount"]
    if command.type == "ledger.deposit":
        accounts[names[0]]["balance"] += amount
        return APPLIED, None
    source = accounts[names[0]]
    target = accounts[names[-1]]
    if command.type == "ledger.transfer" and source["currency"] != target["currency"]:
        return "rejected", "currency_mismatch"
    if source["balance"] < amount:
        return "rejected", "insufficient_funds"
    source["balance"] -= amount
    if command.type == "ledger.transfer":
        target["balance"] += amount
    return APPLIED, None


def _model_result(accounts: dict[str, dict[str, Any]], command: Command) -> Any:
    """Return the result the ledger handler gives for an applied command,
    from the model's balances just after it."""
    payload = command.payload
    if command.type == "ledger.transfer":
        return {
            side: {
                "account": payload[side],
                "balance": accounts[payload[side]]["balance"],
            }
            for side in ("from", "to")
        }
    account = accounts[payload["account"]]
    if command.type == "ledger.open":
        return {"account": payload["account"], **account}
    return {"account": payload["account"], "balance": account["balance"]}


def check_replay(node: Node, snapshot: Snapshot, violations: Violations) -> None:
    replayed = replay(node.path, APP)
    status = snapshot.status
    if not replayed.matches or replayed.state_digest != status.state_digest:
        violations.add(
            "replay",
            f"node {node.index} replays to state {replayed.state_digest[:16]} and "
            f"log {replayed.log_digest[:16]}, live state {status.state_digest[:16]} "
            f"and log {status.log_digest[:16]}",
        )
