"""Report helpers: progress lines, medians over runs, Markdown tables, machine facts."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path


def progress(message: str) -> None:
    """Print one progress line, flushed so it shows while the step runs."""
    print(f"[bench] {message}", flush=True)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """Format the median of `values` with the min and max of the runs after it."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    low, high = min(values), max(values)
    return f"{fmt.format(median(values))} ({fmt.format(low)}–{fmt.format(high)})"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render a Markdown table."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    with open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    return 0.0


def _filesystem(path: Path) -> str:
    """Describe the device, type and mount options of the filesystem under `path`."""
    best = ("", "unknown")
    target = str(path.resolve())
    with open("/proc/mounts", encoding="utf-8") as handle:
        for line in handle:
            device, mount_point, fs_type, options, *_ = line.split()
            is_prefix = target == mount_point or target.startswith(
                mount_point.rstrip("/") + "/"
            )
            if is_prefix and len(mount_point) > len(best[0]):
                best = (mount_point, f"{device} ({fs_type}, {options})")
    usage = shutil.disk_usage(path)
    return f"{best[1]}, {usage.total / 1024**3:,.0f} GiB"


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _command_version(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (done.stdout or done.stderr).strip().splitlines()[0]


def machine_facts(data_path: Path) -> dict[str, str]:
    """Return the facts a reader needs to compare these numbers with others."""
    return {
        "cores (nproc)": str(os.cpu_count()),
        "CPU": _cpu_model(),
        "memory": f"{_memory_gib():.1f} GiB",
        "disk under the temp dirs": _filesystem(data_path),
        "kernel": platform.release(),
        "Python": sys.version.split()[0],
        "py-lmdb (LMDB)": _lmdb_versions(),
        "aiohttp": _package_version("aiohttp"),
        "asyncpg": _package_version("asyncpg"),
        "wrk": _command_version(["wrk", "--version"]),
    }


def _lmdb_versions() -> str:
    import lmdb

    return f"{lmdb.__version__} ({'.'.join(map(str, lmdb.version()))})"
