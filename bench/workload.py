"""The ledger workload every in-process benchmark writes.

1,000 accounts are opened first. Then each batch of 1,000 commands mixes
deposits and charges on random accounts under random UUID4 keys. Charges
carry no `reference`, so each command's ID is its key. A seeded generator
makes every run of one round write the same commands.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.engine import Submission, prepare_submission

ACCOUNTS = 1_000
BATCH_COMMANDS = 1_000
DEPOSIT_SHARE = 0.5
DEPOSIT_AMOUNT = 1_000
CHARGE_AMOUNT_MAX = 500


@dataclass(frozen=True, slots=True)
class LoadScale:
    """Rounds and timing of a load benchmark that measures for a fixed time."""

    rounds: int
    duration_s: int
    warmup_s: int


FULL_LOAD = LoadScale(rounds=3, duration_s=10, warmup_s=2)
QUICK_LOAD = LoadScale(rounds=1, duration_s=3, warmup_s=1)

RawCommand = tuple[str, str, dict[str, Any]]
"""A command as a client sends it: `(idempotency key, type, payload)`."""


def ledger_app() -> App:
    return App([ledger])


def account_name(index: int) -> str:
    return f"acct-{index}"


def account_opens(app: App) -> list[Submission]:
    """Return the `ledger.open` submissions for every benchmark account."""
    return [
        prepare_submission(
            app,
            f"open-{index}",
            "ledger.open",
            {"account": account_name(index), "currency": "EUR"},
        )
        for index in range(ACCOUNTS)
    ]


def generate_batch(rng: random.Random, size: int) -> list[RawCommand]:
    """Return `size` deposits and charges on random accounts under new keys."""
    batch: list[RawCommand] = []
    for _ in range(size):
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        account = account_name(rng.randrange(ACCOUNTS))
        if rng.random() < DEPOSIT_SHARE:
            payload = {"account": account, "amount": DEPOSIT_AMOUNT}
            batch.append((key, "ledger.deposit", payload))
        else:
            amount = rng.randint(1, CHARGE_AMOUNT_MAX)
            batch.append((key, "ledger.charge", {"account": account, "amount": amount}))
    return batch
