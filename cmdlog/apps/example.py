"""The example app: the `ledger` and `users` domains, served by default."""

from __future__ import annotations

from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.apps.users import users

app = App([ledger, users])
