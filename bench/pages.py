"""What one LMDB commit writes: pages it copied, pages it added, device bytes.

LMDB never writes a page in place. A transaction that changes a page
copies it to a free page and frees the old one, and at commit it records
the freed page numbers in the free list under its transaction ID. So the
pages a commit rewrote are the pages its free-list record names, which
`mdb_stat -ff` (Debian's `lmdb-utils`) prints per transaction. Pages it
added (by a split or a new tree level) show as growth of the trees' page
counts. Together they are the pages the commit dirtied.

Bytes that reach the disk come from the device's sectors written in
/proc/diskstats, which include other processes' writes. On the machine
measured for RESULTS.md (Linux 6.18, ext4), a store opened with
`writemap=True` wrote several times more bytes to the device than the
pages it dirtied, and one opened with `writemap=False` did not. Whole
large folios being dirtied and written back for each 4 KiB page written
through the map would explain that, but the cause is not verified.
`write_bytes` in /proc/self/io counted tens of MB per commit in both
modes, several times the dirtied pages, so it is no measure of pages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from bench.tools import apt_install

TAIL_COMMITS = 10
"""Commits at the end of a run whose pages are counted, trees at full size."""
SECTOR_BYTES = 512
MDB_STAT_TIMEOUT_S = 30.0
_FREED = re.compile(r"Transaction (\d+), (\d+) pages")


def ensure_mdb_stat() -> str | None:
    """Return the mdb_stat path, installing Debian's lmdb-utils when missing."""
    found = shutil.which("mdb_stat")
    if found is not None or shutil.which("apt-get") is None:
        return found
    apt_install("lmdb-utils")
    return shutil.which("mdb_stat")


def freed_by_last_commit(mdb_stat: str, path: Path) -> int | None:
    """Return how many pages the newest free-list record of a store names."""
    done = subprocess.run(
        [mdb_stat, "-ff", str(path)],
        capture_output=True,
        text=True,
        timeout=MDB_STAT_TIMEOUT_S,
        check=False,
    )
    records = [(int(txn), int(pages)) for txn, pages in _FREED.findall(done.stdout)]
    return max(records)[1] if records else None


def _device_name(path: Path) -> str | None:
    """Return the /proc/diskstats name of the block device under `path`."""
    target = str(path.resolve())
    best = ("", "")
    with open("/proc/mounts", encoding="utf-8") as handle:
        for line in handle:
            device, mount_point, *_ = line.split()
            inside = target == mount_point or target.startswith(
                mount_point.rstrip("/") + "/"
            )
            if inside and len(mount_point) > len(best[0]):
                best = (mount_point, device)
    device = best[1]
    return os.path.basename(device) if device.startswith("/dev/") else None


def device_write_bytes(device: str | None) -> int:
    """Return the bytes written to `device` since boot, or 0 when it is unknown."""
    if device is None:
        return 0
    with open("/proc/diskstats", encoding="ascii") as handle:
        for line in handle:
            fields = line.split()
            if fields[2] == device:
                return int(fields[9]) * SECTOR_BYTES
    return 0


def live_pages(env: lmdb.Environment, dbs: Iterable[Any]) -> int:
    """Return the branch, leaf and overflow pages of the main and named trees."""
    with env.begin() as txn:
        stats = [env.stat(), *(txn.stat(db) for db in dbs)]
    return sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)


@dataclass(slots=True)
class CommitPages:
    """Pages and bytes written by the commits of one run."""

    commits: int = 0
    device_bytes: int = 0
    last_pgno_growth: int = 0
    tail_dirtied: list[int] = field(default_factory=list)
    """Pages each of the last `TAIL_COMMITS` commits copied or added."""

    @property
    def device_mb_per_commit(self) -> float:
        return self.device_bytes / self.commits / 1e6

    @property
    def last_pgno_growth_per_commit(self) -> float:
        return self.last_pgno_growth / self.commits


class PageMeter:
    """A meter of the pages and device bytes of each commit of a run.

    Call `before` and `after` around every commit and outside any timed
    section, because `after` runs mdb_stat in a child process for the last
    commits.
    """

    def __init__(
        self,
        path: Path,
        env: lmdb.Environment,
        dbs: Iterable[Any],
        *,
        commits_total: int,
        mdb_stat: str | None,
    ) -> None:
        self.path = path
        self.env = env
        self.dbs = list(dbs)
        self.commits_total = commits_total
        self.mdb_stat = mdb_stat
        self.device = _device_name(path)
        self.result = CommitPages()
        self._device_before = 0
        self._pgno_before = 0
        self._live_before = 0

    def _in_tail(self) -> bool:
        return self.result.commits >= self.commits_total - TAIL_COMMITS

    def before(self) -> None:
        self._device_before = device_write_bytes(self.device)
        self._pgno_before = self.env.info()["last_pgno"]
        if self._in_tail():
            self._live_before = live_pages(self.env, self.dbs)

    def after(self) -> None:
        result = self.result
        result.device_bytes += device_write_bytes(self.device) - self._device_before
        result.last_pgno_growth += self.env.info()["last_pgno"] - self._pgno_before
        if self._in_tail() and self.mdb_stat is not None:
            freed = freed_by_last_commit(self.mdb_stat, self.path)
            added = max(live_pages(self.env, self.dbs) - self._live_before, 0)
            if freed is not None:
                result.tail_dirtied.append(freed + added)
        result.commits += 1
