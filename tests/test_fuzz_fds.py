"""The fd-kind, seal and per-connection-bound fuzz target (bench/fuzz.py `fds`), run short
through its command line against the real daemon: every fd of the wrong kind is refused
with the rule named, the right kinds are never refused for their kind, the bounds hold,
no fd flag of the VMM's changes, nothing leaks and nothing reaches the local-bug path."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fd_kinds_seals_and_bounds_fuzz_target():
    result = subprocess.run(
        [sys.executable, "-m", "bench.fuzz", "--targets", "fds", "--inputs", "1500",
         "--jobs", "1", "--seed", "7"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("fds "))
    assert row.split()[1:3] == ["1500", "0"], result.stdout
