"""Block reads through an NBD export: a real `backendd serve` process, its disk an
nbd+unix:// export of qemu-nbd serving a warm raw image, driven by the C blkfront load
generator doing its own control plane as a VMM would (bench/blkload.py
run_load_socket); beside it, in the same run and on the same export, fio's
own NBD engine (libnbd in C), or nbdcopy where this fio has no such engine.

    python -m bench.nbd [--seconds S]      (also run at the end of python -m bench.blk)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .blkload import Load, LoadFailed, LoadResult, run_load_socket, socket_result
from .native import build
from .report import table

MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
SECONDS = 3.0
NAN = float("nan")
# (label, load, fio's rw and bs)
CASES = [("4 KiB randread QD32", Load(bs=4096, qd=32), "randread", "4k"),
         ("1 MiB seq read QD4", Load(pattern="seq", bs=MiB, qd=4), "read", "1m")]
# The compiled data plane (the default), and the Python one for comparison.
DATAPLANES = [("auto", ""), ("python", ", python data plane")]


def fio_has_nbd() -> bool:
    if not shutil.which("fio"):
        return False
    out = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout
    return any(line.strip() == "nbd" for line in out.splitlines())


def fio_nbd(uri: str, rw: str, bs: str, depth: int, seconds: float) -> tuple[float, float]:
    """(IOPS, MB/s) from fio's JSON output (the engine prints a line before it)."""
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={IMAGE_SIZE}",
           f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--time_based",
           f"--runtime={seconds:g}", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    read = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return read["iops"], read["bw_bytes"] / 1e6


def nbdcopy(uri: str, bs: int, depth: int) -> tuple[float, float]:
    """(I/Os per second, MB/s) of one sequential copy of the export to null:."""
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", f"--request-size={bs}", f"--requests={depth}",
                    "--connections=1", uri, "null:"], check=True, capture_output=True)
    elapsed = time.perf_counter() - t0
    return IMAGE_SIZE / bs / elapsed, IMAGE_SIZE / elapsed / 1e6


def _make_image(path: Path) -> None:
    with open(path, "wb") as f:
        chunk = random.Random(0).randbytes(MiB)
        for _ in range(IMAGE_SIZE // MiB):
            f.write(chunk)
    with open(path, "rb") as f:  # warm the page cache
        while f.read(8 * MiB):
            pass


def wait_exit(pid: int) -> None:
    """Wait for a process that is not our child (it daemonised) to be gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], 30)
    finally:
        os.close(fd)


async def _daemon(workdir: Path) -> tuple[asyncio.subprocess.Process, str]:
    config = workdir / "backendd.toml"
    config.write_text(f'[block]\nallowed_nbd = ["{workdir}"]\n')
    path = str(workdir / "backendd.sock")
    log = open(workdir / "backendd.log", "w")  # noqa: SIM115 - the child's; closed below
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backendd", "--config", str(config), "--socket", path,
        "serve", stdout=log, stderr=asyncio.subprocess.STDOUT)
    log.close()
    for _ in range(200):  # as bench.blk: the socket appears once the daemon listens
        if os.path.exists(path) or proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    if not os.path.exists(path):
        raise RuntimeError(f"daemon did not start: {(workdir / 'backendd.log').read_text()}")
    return proc, path


def baseline(uri: str, label: str, load: Load, rw: str, bs: str,
             seconds: float) -> tuple[str, float, float]:
    """(what, IOPS, MB/s) of the baseline on the same export."""
    if fio_has_nbd():
        return (f"fio nbd engine, {label}", *fio_nbd(uri, rw, bs, load.qd, seconds))
    if shutil.which("nbdcopy") and load.pattern == "seq":
        return (f"nbdcopy, {label}", *nbdcopy(uri, load.bs, load.qd))
    return f"(no baseline), {label}", NAN, NAN


async def measure(workdir: Path, uri: str, seconds: float) -> list[tuple]:
    """Per case: the baseline, the daemon's lines, the baseline again; each line's share
    is of the mean of the two baseline runs around it, so that a machine whose load
    drifts during the run (other work on it) moves both alike."""
    proc, path = await _daemon(workdir)
    rows: list[tuple] = []
    try:
        for label, load, rw, bs in CASES:
            before = baseline(uri, label, load, rw, bs, seconds)
            runs: list[tuple[str, LoadResult]] = []
            for dataplane, note in DATAPLANES:
                one = Load(**{**load.__dict__, "seconds": seconds})
                # As a VMM would: the program does its own control plane (clients/c).
                raw = await run_load_socket(path, uri, one, daemon_pid=proc.pid,
                                            device_config={"dataplane": dataplane})
                result = socket_result(one, raw)
                if result.held_after_close:
                    raise LoadFailed(f"{len(result.held_after_close)} grants still in use "
                                     "after the device was closed")
                runs.append((note, result))
            after = baseline(uri, label, load, rw, bs, seconds)
            base_iops, base_mbs = (before[1] + after[1]) / 2, (before[2] + after[2]) / 2
            for note, result in runs:
                share = f"{result.iops / base_iops:.0%}" if base_iops == base_iops else "-"
                rows.append((f"backendd on NBD, {label}{note}", result.iops,
                             result.mb_per_s, result.lat_ns["p50"] / 1e3,
                             result.cpu_us_per_io, result.frontend_cpu_us_per_io, share))
            rows.append((f"{before[0]} (mean of 2 runs: {before[1]:,.0f} and "
                         f"{after[1]:,.0f} IOPS)", base_iops, base_mbs, NAN, NAN, NAN,
                         "100%"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nbd")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="per line")
    args = parser.parse_args(argv or [])
    if not shutil.which("qemu-nbd"):
        raise SystemExit("bench.nbd: qemu-nbd is missing (Debian qemu-utils): "
                         "`make bench` installs it")
    build("blkfront_load")
    workdir = Path(tempfile.mkdtemp(prefix="bench-nbd-", dir="/var/tmp"))
    image, sock, pidfile = workdir / "disk.img", workdir / "nbd.sock", workdir / "nbd.pid"
    uri = f"nbd+unix:///disk?socket={sock}"
    pid = 0
    try:
        _make_image(image)
        # qemu-nbd --fork returns once the socket listens.
        subprocess.run(["qemu-nbd", "--fork", "--persistent", "--shared=16",
                        f"--pid-file={pidfile}", f"--socket={sock}", "--export-name=disk",
                        "--format=raw", "--cache=writeback", str(image)], check=True)
        pid = int(pidfile.read_text())
        rows = asyncio.run(measure(workdir, uri, args.seconds))
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            wait_exit(pid)
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(f"blk reads through NBD: qemu-nbd, raw, unix socket, warm "
                f"{IMAGE_SIZE // MiB} MiB image, {args.seconds:g} s a line",
                ["what", "IOPS", "MB/s", "p50 us", "daemon CPU us/IO", "frontend CPU us/IO",
                 "of baseline"], rows))


if __name__ == "__main__":
    main(sys.argv[1:])
