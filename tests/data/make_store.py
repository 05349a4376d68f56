"""Make the stores of older formats in tests/test_store_upgrade.py and record
what each holds.

It ran once on the last release to write each format, commit 5b02264 for
format 1 and commit 64a66f4 for format 2 (N below):

    git worktree add /tmp/vN COMMIT
    cd /tmp/vN && python /path/to/make_store.py OUT > OUT/out.txt
    tar czf store-vN.tar.gz -C OUT/store data.mdb

The JSON after the log lines of out.txt is store-vN.json: the view of each
ID and the status, as that release read them back.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

from cmdlog.apps.example import app
from cmdlog.config import StoreConfig
from cmdlog.database import Database
from cmdlog.engine import prepare_submission
from cmdlog.model import Command

PEER = "feedfacefeedface"
STAMP = 1 << 20


def main(out: Path) -> None:
    data = out / "store"
    shutil.rmtree(data, ignore_errors=True)
    db = Database(data, app, store_config=StoreConfig(map_bytes_initial=1 << 20))

    charge = {"account": "a", "amount": 120, "reference": "inv-1"}
    submissions = [
        ("k-open-a", "ledger.open", {"account": "a", "currency": "EUR"}),
        ("k-open-b", "ledger.open", {"account": "b", "currency": "EUR"}),
        ("k-dep-a", "ledger.deposit", {"account": "a", "amount": 500}),
        ("k-charge-1", "ledger.charge", charge),
        ("k-charge-2", "ledger.charge", {"account": "a", "amount": 9000}),
        ("k-transfer", "ledger.transfer", {"from": "a", "to": "b", "amount": 80}),
        ("k-user", "users.register", {"username": "Ａlice", "display_name": "Alice"}),
    ]
    db.submit([prepare_submission(app, *item) for item in submissions])

    deposit, other = {"account": "b", "amount": 7}, {"account": "b", "amount": 8}
    # The second copy sorts first and replaces the first; the third conflicts.
    db.ingest(
        [
            Command("p-dep-b", "ledger.deposit", deposit, STAMP, PEER),
            Command("p-dep-b", "ledger.deposit", deposit, STAMP - 1, "0" * 15 + "1"),
            Command("p-dep-b", "ledger.deposit", other, STAMP + 5, "0" * 15 + "2"),
            Command("p-future", "ledger.audit", {"note": "unknown"}, STAMP + 9, PEER),
        ]
    )

    ids = [item[0] for item in submissions if item[0] != "k-charge-1"]
    ids += [app.types["ledger.charge"].natural_id(charge), "p-dep-b", "p-future"]
    views: dict[str, object] = {"missing": None}
    for command_id in ids:
        found = db.view(command_id)
        assert found is not None, command_id
        views[command_id] = {"command": list(found[0]), "outcome": list(found[1])}
    status = dataclasses.asdict(db.status())
    db.close()
    print()
    print(json.dumps({"views": views, "status": status}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
