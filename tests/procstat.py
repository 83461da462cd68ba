"""What this process holds right now, for leak checks."""

import os


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def describe_fds(fds: set[int]) -> str:
    """What each fd is (its /proc/self/fd link), for a leak check's failure message."""
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd} (closed since)")
    return ", ".join(out)


def fdinfo(fd: int, field: str) -> str:
    """The first value of `field` in /proc/self/fdinfo/FD (e.g. "flags", "eventfd-count")."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split()[1]
    raise AssertionError(f"fd {fd}: no {field} in fdinfo")


def mapping_count() -> int:
    """Mappings of memfds: guest RAM and grant tables. (Anonymous mappings come and go
    with the allocator, so they say nothing about leaks.)"""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/memfd:" in line)
