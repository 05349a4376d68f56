"""A node on a full disk answers 507, stores nothing half-way, and recovers."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import post_batch, status
from tests.nodes import NodeProcess

Factory = Callable[..., NodeProcess]
DISK_BYTES = 24 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs mounted for this test (the suite runs as root)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount_point)],
        check=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def deposits(batch: int) -> list[dict[str, object]]:
    return [
        {"id": f"d{batch}-{i}", "type": "ledger.deposit",
         "payload": {"account": "a", "amount": 1}}
        for i in range(500)
    ]  # fmt: skip


@pytest.mark.slow
async def test_full_disk_gives_507_then_recovers(
    node_factory: Factory, small_disk: Path
) -> None:
    """Writes on a full disk get 507 with Retry-After and nothing is stored;
    once space is freed the same writes succeed."""
    node = NodeProcess(small_disk / "node")
    node.log_path = small_disk.parent / "node.log"
    node.start()
    filler = small_disk / "filler"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                node.url + "/commands",
                json={
                    "type": "ledger.open",
                    "payload": {"account": "a", "currency": "EUR"},
                },
                headers={"Idempotency-Key": "open"},
            ) as response:
                assert response.status == 201  # fmt: skip
            free = subprocess.run(
                ["df", "--output=avail", "-B1", str(small_disk)],
                capture_output=True, text=True, check=True,
            ).stdout.split()[-1]  # fmt: skip
            with open(filler, "wb") as handle:
                handle.truncate(0)
                handle.write(b"\0" * max(0, int(free) - (512 << 10)))

            refused = None
            acknowledged = 0
            for batch in range(40):
                async with session.post(
                    node.url + "/commands/batch", json=deposits(batch)
                ) as response:
                    if response.status == 507:
                        refused = (response.headers.get("Retry-After"),
                                   await response.json())  # fmt: skip
                        break
                    assert response.status == 200
                    acknowledged += 500
            assert refused is not None
            before = await status(session, node.url)
            async with session.get(node.url + "/healthz") as response:
                healthy = response.status

            filler.unlink()
            results = await post_batch(session, node.url, deposits(999))
            after = await status(session, node.url)
            async with session.get(
                node.url + "/queries/ledger.balance?account=a"
            ) as response:
                balance = (await response.json())["result"]["balance"]
    finally:
        node.kill()

    retry_after, body = refused
    assert retry_after is not None
    assert body["error"]["code"] == "storage_full"
    assert "free space" in body["error"]["message"]
    assert before["commands"] == 1 + acknowledged
    assert healthy == 200
    assert all(result["status"] == 201 for result in results)
    assert after["commands"] == before["commands"] + 500
    assert balance == acknowledged + 500
