"""CPU time accounting from /proc: per process tree, per thread, machine-wide."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass


def _stat_fields(path: str) -> list[str]:
    """Return the fields of a /proc stat file after the command name."""
    with open(path, encoding="ascii") as handle:
        return handle.read().rpartition(")")[2].split()


def _ticks_to_seconds(ticks: int) -> float:
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root_pid: int) -> float:
    """Return the CPU seconds used so far by a process and its live descendants.

    This follows the process tree, not the process group: PostgreSQL
    backends call setsid(), so they leave the postmaster's group but stay
    its children.
    """
    parents: dict[int, int] = {}
    cpu_ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(f"/proc/{entry.name}/stat")
        except OSError:
            continue
        # After the command name come state, ppid, ... utime (the 12th), stime.
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu_ticks[pid] = int(fields[11]) + int(fields[12])
    total = 0
    for pid, ticks in cpu_ticks.items():
        ancestor = pid
        while ancestor > 1 and ancestor != root_pid:
            ancestor = parents.get(ancestor, 0)
        if ancestor == root_pid:
            total += ticks
    return _ticks_to_seconds(total)


def thread_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """Return the CPU seconds of a process (all threads) or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = _stat_fields(path)
    return _ticks_to_seconds(int(fields[11]) + int(fields[12]))


def children_cpu_seconds() -> float:
    """Return the CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """Return the user and system CPU seconds of all processes since boot.

    Interrupt time and time stolen by the hypervisor are left out, because
    no process's own CPU time includes them.
    """
    with open("/proc/stat", encoding="ascii") as handle:
        fields = handle.readline().split()
    # The first line is: cpu user nice system idle iowait irq softirq steal ...
    user, nice, system = map(int, fields[1:4])
    return _ticks_to_seconds(user + nice + system)


@dataclass(frozen=True, slots=True)
class CpuReading:
    """CPU seconds so far of a system under test, at three scopes."""

    tree_s: float
    """The service process, its descendants and its database's processes."""
    process_s: float
    """The service process alone, all threads."""
    main_thread_s: float
    """The service's main thread, which runs its event loop."""
