"""What this process holds right now, for leak checks."""

import os


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def mapping_count() -> int:
    """Mappings of memfds: guest RAM and grant tables. (Anonymous mappings come and go
    with the allocator, so they say nothing about leaks.)"""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/memfd:" in line)
