"""`python -m rings` (what `make demo` runs for now) describes the layouts and passes."""

import subprocess
import sys


def test_python_m_rings_self_check() -> None:
    result = subprocess.run([sys.executable, "-m", "rings"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "blkif x86_32: request 108 B" in result.stdout
    assert "[32, 64, 128, 256, 512]" in result.stdout
    assert "self-check ok: 100000 requests" in result.stdout


def test_import_rings_exposes_layouts() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import rings; print(rings.BLKIF[rings.consts.BlkifAbi.X86_64]"
         ".request.sizeof(), rings.netif.netif_tx_request.sizeof())"],
        capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["112", "12"]
