"""A child process for crash tests: appends commands through the writer thread
and prints each command ID once its group commit has returned."""

from __future__ import annotations

import asyncio
import sys
import uuid

from cmdlog.app import App
from cmdlog.apps.ledger import ledger
from cmdlog.database import Database
from cmdlog.engine import prepare_submission
from cmdlog.logs import configure_logging
from cmdlog.writer import Writer

APP = App([ledger])
CONCURRENCY = 32


async def client(writer: Writer, worker: int) -> None:
    account = f"acct-{worker}"
    opened = prepare_submission(
        APP, f"open-{worker}", "ledger.open", {"account": account, "currency": "EUR"}
    )
    await writer.run(lambda txn: writer.database.engine.submit(txn, [opened]))
    print(opened.id, flush=True)
    while True:
        key = str(uuid.uuid4())
        kind = "ledger.deposit" if uuid.uuid4().int % 3 else "ledger.charge"
        submission = prepare_submission(
            APP, key, kind, {"account": account, "amount": 1 + uuid.uuid4().int % 50}
        )
        await writer.run(
            lambda txn, s=submission: writer.database.engine.submit(txn, [s])
        )
        print(submission.id, flush=True)


async def main(path: str) -> None:
    configure_logging("warning")
    writer = Writer(Database(path, APP))
    writer.start()
    print("ready", flush=True)
    await asyncio.gather(*(client(writer, i) for i in range(CONCURRENCY)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
