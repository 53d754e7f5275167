"""Readers of Linux /proc, one parser per file instead of one per test or benchmark.

`pid` is a process id or "self". A process that has exited holds no memory: the memory readers
return 0 (or None, or {}) for it, so a sum over children that come and go needs no guard; the
counters, parent_pid and cmdline raise OSError, as opening its files does.
"""

from __future__ import annotations

import os
from pathlib import Path

Pid = int | str


def _read(pid: Pid, name: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


def status_kb(pid: Pid, field: str) -> int | None:
    """One `Field:  N kB` line of /proc/PID/status (None if absent or the process is gone)."""
    for line in (_read(pid, "status") or "").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def rss_mb(pid: Pid = "self") -> float:
    """Resident memory now (VmRSS), MB."""
    return (status_kb(pid, "VmRSS") or 0) / 1024


def peak_rss_mb(pid: Pid = "self") -> float:
    """The most resident memory the process has had (VmHWM), MB."""
    return (status_kb(pid, "VmHWM") or 0) / 1024


def smaps_rollup_kb(pid: Pid) -> dict[str, int]:
    """/proc/PID/smaps_rollup's kB figures by name (Rss, Pss, Shared_Clean, Private_Dirty...)."""
    out = {}
    for line in (_read(pid, "smaps_rollup") or "").splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if len(words) == 2 and words[1] == "kB" and words[0].isdigit():
            out[key] = int(words[0])
    return out


def pss_mb(pid: Pid) -> float:
    """Proportional set size (each shared page split among its sharers), MB."""
    return smaps_rollup_kb(pid).get("Pss", 0) / 1024


def thread_count(pid: Pid) -> int:
    """The process's OS threads (its /proc/PID/task entries)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_count(pid: Pid) -> int:
    """The process's open file descriptors."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def parent_pid(pid: Pid) -> int:
    """The parent's pid (field 4 of /proc/PID/stat; the command name may hold spaces)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def cmdline(pid: Pid) -> str:
    """The command line, its arguments joined by spaces ("" for a zombie)."""
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()


def descendants(pid: Pid) -> list[int]:
    """Every process below `pid`, depth first (workers forked by a loader are grandchildren);
    one that exits meanwhile is skipped."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        for kid in map(int, (_read(pid, f"task/{task}/children") or "").split()):
            out += [kid, *descendants(kid)]
    return out


def _cpuinfo_line(key: str) -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_model() -> str:
    """The first CPU's model name ("" if /proc/cpuinfo names none)."""
    return _cpuinfo_line("model name")


def cpu_flags() -> set[str]:
    """The first CPU's feature flags (avx2, avx512f, amx_int8...)."""
    return set(_cpuinfo_line("flags").split())
