"""`backendd demo` end to end: a real daemon process, a disk and a nic, exit status 0."""

import subprocess
import sys


def test_demo_shows_a_working_disk_and_nic() -> None:
    result = subprocess.run([sys.executable, "-m", "backendd", "demo", "--seconds", "4"],
                            capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "image file after flush matches: yes" in out
    assert "read-back mismatches: 0" in out
    assert "0% packet loss" in out
    assert "sha256 checked on both ends: ok" in out
    assert out.rstrip().endswith("demo: disk and nic working")
