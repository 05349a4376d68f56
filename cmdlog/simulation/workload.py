"""The simulated clients' workload: ledger requests, retries and reused keys."""

from __future__ import annotations

import random
from typing import Any

from cmdlog.simulation.settings import ACCOUNTS, BATCH_ITEMS_MAX, HOT_ACCOUNT

Item = tuple[str, str, dict[str, Any]]
"""A client request: Idempotency-Key, command type and payload."""


class Workload:
    """Client requests: new commands, retries and reused keys."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sent: list[Item] = []
        self.referenced: list[dict[str, Any]] = []
        self.unopened = list(ACCOUNTS)
        self.keys = 0

    def next_batch(self) -> list[Item]:
        return [self._next_item() for _ in range(self.rng.randint(1, BATCH_ITEMS_MAX))]

    def _new_key(self) -> str:
        self.keys += 1
        return f"key-{self.keys}"

    def _next_item(self) -> Item:
        rng = self.rng
        roll = rng.random()
        if self.unopened:
            account = self.unopened.pop(0)
            opening = {"account": account, "currency": ACCOUNTS[account]}
            item: Item = (self._new_key(), "ledger.open", opening)
        elif roll < 0.12 and self.sent:
            return rng.choice(self.sent)
        elif roll < 0.17 and self.sent:
            key, type_name, payload = rng.choice(self.sent)
            return key, type_name, self._altered(type_name, payload)
        elif roll < 0.25 and self.referenced:
            # The natural key names the charge, so a new key is still a retry,
            # unless the amount differs, which reuses the charge's ID.
            payload = dict(rng.choice(self.referenced))
            if rng.random() < 0.3:
                payload["amount"] += 1
            return self._new_key(), "ledger.charge", payload
        else:
            item = (self._new_key(), *self._fresh())
        self.sent.append(item)
        return item

    def _fresh(self) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        accounts = list(ACCOUNTS)
        roll = rng.random()
        if roll < 0.35:
            return "ledger.deposit", {
                "account": rng.choice(accounts),
                "amount": rng.randint(1, 100),
            }
        if roll < 0.6:
            return "ledger.charge", {
                "account": rng.choice(accounts),
                "amount": rng.randint(1, 150),
            }
        if roll < 0.7:
            # Large charges on one account: together they would overdraw it.
            return "ledger.charge", {
                "account": HOT_ACCOUNT,
                "amount": rng.randint(100, 400),
            }
        if roll < 0.82:
            payload = {
                "account": rng.choice(accounts),
                "amount": rng.randint(1, 80),
                "reference": f"ref-{len(self.referenced) + 1}",
            }
            self.referenced.append(payload)
            return "ledger.charge", payload
        source, target = rng.sample(accounts, 2)
        return "ledger.transfer", {
            "from": source,
            "to": target,
            "amount": rng.randint(1, 120),
        }

    def _altered(self, type_name: str, payload: dict[str, Any]) -> dict[str, Any]:
        if type_name == "ledger.open":
            return {**payload, "currency": "GBP"}
        return {**payload, "amount": payload["amount"] + self.rng.randint(1, 9)}
