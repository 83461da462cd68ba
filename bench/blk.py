"""Block device figures: a real `backendd serve` process driven by the C blkfront load
generator (bench/native/blkfront_load.c, see bench/blkload.py), beside fio on the same
warm image file (--invalidate=0) and an eventfd ping-pong between two processes, all
measured in this one run.

    python -m bench.blk [--seconds S]
    python -m bench.blk --persistent-rounds N [--seconds S]
    python -m bench.blk --beside-rounds N [--seconds S]
    python -m bench.blk --queues-rounds N [--seconds S] [--kernel PATH ...]

The second form runs only the 4 KiB QD32 lines (read and write, 1 and 2 queues) and the
1 MiB sequential ones (QD4), with persistent grants and without, alternated N times, and
prints each line's median run beside the range of its N runs. The third runs only the
cached guest's 4 KiB QD32 reads alone, beside an O_DIRECT guest and beside fio's O_DIRECT
reads (psync x4 threads, and io_uring QD32 x1), N rounds in turn, with each round's
ratios to the run alone just before it.

The fourth runs only the lines of the queue and latency targets (4 KiB randread QD32 at 1
and 2 queues, and QD1), alternated N times, and prints each line's median run, the range,
and the frontend's kicks and sleeps per I/O. With --kernel (once per build), one daemon
per compiled blk kernel (BACKENDD_BLK_KERNEL), each round running every line on each
daemon in turn: two builds compared in the same minutes.

The frontend is C so that the figures are the daemon's: the Python simulated guest costs
more per request than the daemon does. It pairs with the daemon as a C VMM would, through
the C client library (clients/c, blkfront_load --socket). Daemon CPU per I/O is the daemon process's
utime + stime over the run (from the generator's "ready" once the disk is connected to
its "done" before it closes it) divided by the I/Os answered; the frontend's is the load
generator's own, so that one can see it is not the limit. QD is per queue. fio is required:
without it there is no baseline, and the bench stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from backendd.demo import start_daemon

from .blkload import Load, LoadFailed, LoadResult, pingpong, run_load_socket, socket_result
from .native import build
from .report import table

MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
SECONDS = 3.0
LOG_ROUNDS = 5  # dirty log off/on pairs
NAN = float("nan")


@dataclass
class Row:
    what: str
    iops: float
    mb_per_s: float
    p50_us: float
    p99_us: float
    cpu_us: float = NAN
    front_cpu_us: float = NAN

    def _replace_what(self, what: str) -> Row:
        self.what = what
        return self

    def cells(self) -> tuple[object, ...]:
        return (self.what, self.iops, self.mb_per_s, self.p50_us, self.p99_us, self.cpu_us,
                self.front_cpu_us)


def _describe(load: Load, result: LoadResult) -> str:
    size = f"{load.bs // 1024} KiB" if load.bs < MiB else f"{load.bs // MiB} MiB"
    kind = ("rand" if load.pattern == "rand" else "seq ") + load.rw
    text = f"backendd {size} {kind} QD{load.qd} x{load.queues}q"
    if load.persistent:
        text += ", persistent" if result.persistent else ", persistent (not offered: off)"
    return text


def _row(load: Load, result: LoadResult) -> Row:
    lat = result.lat_ns
    return Row(_describe(load, result), result.iops, result.mb_per_s, lat["p50"] / 1e3,
               lat["p99"] / 1e3, result.cpu_us_per_io, result.frontend_cpu_us_per_io)


def fio(image: str, engine: str, bs: str, rw: str, depth: int, seconds: float,
        direct_jobs: int = 0) -> Row:
    """direct_jobs: that many O_DIRECT jobs, reported together."""
    cmd = ["fio", "--name=bench", f"--filename={image}", f"--ioengine={engine}",
           f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--invalidate=0",
           "--time_based", f"--runtime={seconds:g}", "--output-format=json"]
    if direct_jobs:
        cmd += ["--direct=1", f"--numjobs={direct_jobs}", "--group_reporting"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    side = out["jobs"][0]["write" if "write" in rw else "read"]
    pct = side["clat_ns"].get("percentile", {})
    return Row(f"fio {engine} {bs} {rw} QD{depth}", side["iops"], side["bw_bytes"] / 1e6,
               pct.get("50.000000", NAN) / 1e3, pct.get("99.000000", NAN) / 1e3)


def _make_image(path: str) -> None:
    with open(path, "wb") as f:
        chunk = random.Random(0).randbytes(MiB)
        for _ in range(IMAGE_SIZE // MiB):
            f.write(chunk)
        # Written back before the first line: otherwise the first lines' writes wait
        # for the image's own writeback while fio's, measured last, do not.
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:  # warm the page cache for both sides
        while f.read(8 * MiB):
            pass


def _ratio(a: float, b: float) -> float:
    return a / b if b else NAN


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    await proc.wait()


async def _one(proc: asyncio.subprocess.Process, path: str, image: str, load: Load,
               measure_cpu: bool = True, **kw) -> LoadResult:
    """One load generator run against the daemon `proc` (its CPU measured unless not)."""
    return socket_result(load, await run_load_socket(
        path, image, load, daemon_pid=proc.pid if measure_cpu else None, **kw))


async def _warm_up(proc: asyncio.subprocess.Process, path: str, image: str,
                   seconds: float) -> None:
    # Not reported: the first line would otherwise also pay for the daemon's first
    # connection (threads started, memory touched for the first time).
    await _one(proc, path, image, Load(bs=4096, qd=32, seconds=min(1.0, seconds)),
               measure_cpu=False)


async def _stop_after_failure(proc: asyncio.subprocess.Process, log_path: Path) -> None:
    await _stop(proc)
    print("daemon log:\n" + log_path.read_text()[-4000:], file=sys.stderr)


async def measure(image: str, workdir: Path, seconds: float) -> tuple[list[Row], list[tuple]]:
    proc, path, log_path = await start_daemon(workdir)
    rows: list[Row] = []
    results: dict[str, LoadResult] = {}
    try:
        pp = await pingpong()

        one = functools.partial(_one, proc, path, image)

        async def run(key: str, load: Load) -> LoadResult:
            result = await one(load)
            if result.held_after_close:
                raise LoadFailed(f"{len(result.held_after_close)} grants still in use after "
                                 "the device was closed")
            results[key] = result
            rows.append(_row(load, result))
            return result

        await _warm_up(proc, path, image, seconds)
        for rw in ("read", "write"):
            for queues in (1, 2):
                for persistent in (False, True):
                    await run(f"4k-{rw}-{queues}-{int(persistent)}",
                              Load(rw=rw, bs=4096, qd=32, queues=queues, seconds=seconds,
                                   persistent=persistent))
        for rw in ("read", "write"):
            await run(f"1m-{rw}", Load(rw=rw, pattern="seq", bs=MiB, qd=4, seconds=seconds))
        qd1 = await run("qd1", Load(bs=4096, qd=1, seconds=seconds))
        # The dirty log's cost (live migration's pre-copy): the same 4 KiB random reads
        # with logging off and on, alternated five times; the run of median IOPS of each
        # (single runs scatter by +-50% on a shared machine).
        log_load = Load(bs=4096, qd=32, seconds=seconds)
        runs: dict[bool, list[LoadResult]] = {False: [], True: []}
        for _ in range(LOG_ROUNDS):
            for on in (False, True):
                runs[on].append(await one(log_load, log=on))
        for on in (False, True):
            results["log-on" if on else "log-off"] = sorted(
                runs[on], key=lambda r: r.iops)[LOG_ROUNDS // 2]
        rows.append(_row(log_load, results["log-off"])._replace_what(
            "backendd 4 KiB randread QD32 x1q, dirty log off (median of 5)"))
        rows.append(_row(log_load, results["log-on"])._replace_what(
            "backendd 4 KiB randread QD32 x1q, dirty log on (median of 5)"))
        # A guest reading its disk with O_DIRECT (every read goes to the device) beside one
        # whose reads the page cache serves: the cached one should barely notice.
        cached_load = Load(bs=4096, qd=32, seconds=seconds)
        # Alone, just before: the reference of the two lines beside, minutes after the
        # first lines on a machine whose load moves.
        results["alone"] = alone = await one(cached_load)
        rows.append(_row(cached_load, alone)._replace_what(
            "backendd 4 KiB randread QD32 x1q (alone, just before the next lines)"))
        beside, direct = await asyncio.gather(
            one(cached_load),
            one(Load(bs=4096, qd=32, seconds=seconds, seed=9), measure_cpu=False,
                device_config={"direct-io": "1"}))
        results["beside-direct"] = beside
        rows.append(_row(cached_load, beside)._replace_what(
            "backendd 4 KiB randread QD32 x1q beside an O_DIRECT guest"))
        rows.append(_row(cached_load, direct)._replace_what(
            "backendd 4 KiB randread QD32 x1q, O_DIRECT (the other guest)"))
        async def beside_fio(key: str, engine: str, depth: int, jobs: int, what: str,
                             fio_what: str) -> None:
            reads = asyncio.create_task(asyncio.to_thread(
                fio, image, engine, "4k", "randread", depth, seconds, jobs))
            results[key] = beside_it = await one(cached_load)
            rows.append(_row(cached_load, beside_it)._replace_what(
                "backendd 4 KiB randread QD32 x1q beside " + what))
            rows.append((await reads)._replace_what(fio_what + " (beside the line above)"))

        # The baseline for that line: the same O_DIRECT reads done by fio (4 threads, as
        # the I/O pool), no daemon work at all. What the cached guest keeps here is what
        # this machine leaves it when another process reads the disk directly.
        await beside_fio("beside-fio-direct", "psync", 1, 4, "fio O_DIRECT randread",
                         "fio psync 4k randread O_DIRECT x4 threads")
        # The same beside fio's io_uring reads, QD32 from one thread as the O_DIRECT guest
        # asks: the machine's part when the reads cost no thread hand-off per I/O.
        await beside_fio("beside-fio-uring", "io_uring", 32, 1,
                         "fio io_uring O_DIRECT randread",
                         "fio io_uring 4k randread O_DIRECT QD32 x1")
    except BaseException:
        await _stop_after_failure(proc, log_path)
        raise
    await _stop(proc)

    base = {}
    for key, engine, bs, rw, depth in (
            ("psync-4k-read", "psync", "4k", "randread", 1),
            ("uring-4k-read", "io_uring", "4k", "randread", 32),
            ("psync-4k-write", "psync", "4k", "randwrite", 1),
            ("uring-4k-write", "io_uring", "4k", "randwrite", 32),
            ("psync-1m-read", "psync", "1m", "read", 1),
            ("uring-1m-read", "io_uring", "1m", "read", 4),
            ("psync-1m-write", "psync", "1m", "write", 1),
            ("uring-1m-write", "io_uring", "1m", "write", 4)):
        base[key] = fio(image, engine, bs, rw, depth, seconds)
        rows.append(base[key])
    rows.append(Row("eventfd ping-pong, 2 processes", NAN, NAN, pp["p50_ns"] / 1e3,
                    pp["p99_ns"] / 1e3))

    # Where a workload ran with and without persistent grants, the better one counts.
    def best(prefix: str) -> LoadResult:
        return max((r for k, r in results.items() if k.startswith(prefix)),
                   key=lambda r: r.iops)

    r4 = best("4k-read-1-")
    w4 = best("4k-write-1-")
    two = best("4k-read-2-")
    fio_1m = {rw: max(base[f"psync-1m-{rw}"].mb_per_s, base[f"uring-1m-{rw}"].mb_per_s)
              for rw in ("read", "write")}
    # (what, measured, goal, at least?, unit): "%" a share, "x" a multiple, "us" CPU time
    targets = [
        ("4 KiB randread QD32 1q, IOPS / fio psync randread",
         _ratio(r4.iops, base["psync-4k-read"].iops), 0.70, True, "%"),
        ("4 KiB randwrite QD32 1q, IOPS / fio psync randwrite",
         _ratio(w4.iops, base["psync-4k-write"].iops), 0.60, True, "%"),
        ("daemon CPU per 4 KiB read (QD32 1q)",
         min(r.cpu_us_per_io for k, r in results.items() if k.startswith("4k-read-1-")),
         3.0, False, "us"),
        ("1 MiB seq read QD4, MB/s / best fio", _ratio(results["1m-read"].mb_per_s,
                                                      fio_1m["read"]), 0.90, True, "%"),
        ("1 MiB seq write QD4, MB/s / best fio", _ratio(results["1m-write"].mb_per_s,
                                                       fio_1m["write"]), 0.90, True, "%"),
        ("4 KiB randread QD32, 2 queues / 1 queue", _ratio(two.iops, r4.iops), 1.5, True, "x"),
        ("cached 4 KiB randread beside an O_DIRECT guest / alone",
         _ratio(results["beside-direct"].iops, results["alone"].iops), 0.8, True, "%"),
        ("the same, beside fio's O_DIRECT reads instead / alone (the machine's part)",
         _ratio(results["beside-fio-direct"].iops, results["alone"].iops), 0.8, True, "%"),
        ("the same, beside fio io_uring QD32 O_DIRECT reads / alone",
         _ratio(results["beside-fio-uring"].iops, results["alone"].iops), 0.8, True, "%"),
        ("4 KiB randread QD32 1q, dirty log on / off (IOPS)",
         _ratio(results["log-on"].iops, results["log-off"].iops), 0.90, True, "%"),
        ("QD1 4 KiB read p50 / eventfd ping-pong p50",
         _ratio(qd1.lat_ns["p50"], pp["p50_ns"]), 4.0, False, "x"),
    ]
    return rows, [(what, _unit(value, unit), (">= " if at_least else "<= ") + _unit(goal, unit),
                   "yes" if (value >= goal if at_least else value <= goal) else "no")
                  for what, value, goal, at_least, unit in targets]


async def measure_persistent(image: str, workdir: Path, seconds: float, rounds: int
                             ) -> list[tuple]:
    """The 4 KiB QD32 and 1 MiB QD4 lines with and without persistent grants,
    alternated `rounds` times on one daemon: per line, the run of median IOPS and the
    range of all."""
    proc, path, log_path = await start_daemon(workdir)
    runs: dict[tuple[int, str, int, bool], list[LoadResult]] = {}
    shapes = [(4096, rw, queues) for rw in ("read", "write") for queues in (1, 2)]
    shapes += [(MiB, rw, 1) for rw in ("read", "write")]
    try:
        async def one(load: Load) -> LoadResult:
            result = await _one(proc, path, image, load)
            if result.held_after_close:
                raise LoadFailed(f"{len(result.held_after_close)} grants still in use after "
                                 "the device was closed")
            return result

        await _warm_up(proc, path, image, seconds)
        for _ in range(rounds):
            for bs, rw, queues in shapes:
                for persistent in (False, True):
                    load = _persistent_load(bs, rw, queues, persistent, seconds)
                    runs.setdefault((bs, rw, queues, persistent), []).append(
                        await one(load))
    except BaseException:
        await _stop_after_failure(proc, log_path)
        raise
    await _stop(proc)
    out = []
    for (bs, rw, queues, persistent), results in runs.items():
        by_iops = sorted(results, key=lambda r: r.iops)
        mid = by_iops[len(by_iops) // 2]
        row = _row(_persistent_load(bs, rw, queues, persistent, seconds), mid)
        cpu = sorted(r.cpu_us_per_io for r in results)
        out.append((row.what, row.iops, f"{by_iops[0].iops:,.0f}-{by_iops[-1].iops:,.0f}",
                    row.p50_us, row.p99_us, row.cpu_us, f"{cpu[0]:.2f}-{cpu[-1]:.2f}",
                    row.front_cpu_us))
    return out


# --beside-rounds: the cached guest's reads alone, then beside each O_DIRECT reader.
BESIDE = (("alone", "alone"), ("direct", "beside an O_DIRECT guest"),
          ("fio-psync", "beside fio psync O_DIRECT x4 threads"),
          ("fio-uring", "beside fio io_uring O_DIRECT QD32 x1"))


async def measure_beside(image: str, workdir: Path, seconds: float, rounds: int
                         ) -> tuple[list[tuple], list[tuple]]:
    """The cached guest alone and beside each O_DIRECT reader, `rounds` times in turn
    on one daemon. Returns per round and kind: (round, kind, cached IOPS, ratio to the
    run alone of that round, cached daemon CPU us/IO, the O_DIRECT reader's IOPS)."""
    proc, path, log_path = await start_daemon(workdir)
    cached = Load(bs=4096, qd=32, seconds=seconds)
    out: list[tuple] = []
    try:
        one = functools.partial(_one, proc, path, image)
        await _warm_up(proc, path, image, seconds)
        for r in range(rounds):
            alone = await one(cached)
            out.append((r, "alone", alone.iops, 1.0, alone.cpu_us_per_io, NAN))
            beside, direct = await asyncio.gather(
                one(cached),
                one(Load(bs=4096, qd=32, seconds=seconds, seed=9), measure_cpu=False,
                    device_config={"direct-io": "1"}))
            out.append((r, "direct", beside.iops, _ratio(beside.iops, alone.iops),
                        beside.cpu_us_per_io, direct.iops))
            for kind, engine, depth, jobs in (("fio-psync", "psync", 1, 4),
                                              ("fio-uring", "io_uring", 32, 1)):
                task = asyncio.create_task(asyncio.to_thread(
                    fio, image, engine, "4k", "randread", depth, seconds, jobs))
                beside = await one(cached)
                other = await task
                out.append((r, kind, beside.iops, _ratio(beside.iops, alone.iops),
                            beside.cpu_us_per_io, other.iops))
    except BaseException:
        await _stop_after_failure(proc, log_path)
        raise
    await _stop(proc)
    words = dict(BESIDE)
    per_round = [(r, words[kind], iops, _unit(ratio, "%"), cpu, other)
                 for r, kind, iops, ratio, cpu, other in out]
    summary = []
    for kind, what in BESIDE:
        mine = [row for row in out if row[1] == kind]
        ratios = sorted(row[3] for row in mine)
        iops = sorted(row[2] for row in mine)
        cpu = sorted(row[4] for row in mine)
        other = sorted(row[5] for row in mine)
        summary.append((what, iops[len(iops) // 2], _unit(ratios[len(ratios) // 2], "%"),
                        f"{_unit(ratios[0], '%')}-{_unit(ratios[-1], '%')}",
                        cpu[len(cpu) // 2], other[len(other) // 2]))
    return per_round, summary


QUEUE_LINES = (("1q", Load(bs=4096, qd=32)), ("2q", Load(bs=4096, qd=32, queues=2)),
               ("qd1", Load(bs=4096, qd=1)))


async def measure_queues(image: str, workdir: Path, seconds: float, rounds: int,
                         kernels: list[str]) -> list[tuple]:
    """The lines of the queue and QD1 targets alternated `rounds` times, on one daemon
    per kernel in `kernels` (BACKENDD_BLK_KERNEL; "" the default build), the kernels
    taking turns within each round: per kernel and line, the run of median IOPS, the
    range, and per round the 2-queue / 1-queue ratio."""
    daemons = []
    try:
        for n, kernel in enumerate(kernels or [""]):
            saved = os.environ.get("BACKENDD_BLK_KERNEL")
            if kernel:
                os.environ["BACKENDD_BLK_KERNEL"] = kernel
            try:
                d = workdir / f"daemon{n}"
                d.mkdir()
                daemons.append((n, *await start_daemon(d)))
            finally:
                if saved is None:
                    os.environ.pop("BACKENDD_BLK_KERNEL", None)
                else:
                    os.environ["BACKENDD_BLK_KERNEL"] = saved
        runs: dict[tuple[int, str], list[LoadResult]] = {}
        for _, proc, path, _ in daemons:
            await _warm_up(proc, path, image, seconds)
        for _ in range(rounds):
            for n, proc, path, _ in daemons:
                for line, load in QUEUE_LINES:
                    load = Load(bs=load.bs, qd=load.qd, queues=load.queues, seconds=seconds)
                    runs.setdefault((n, line), []).append(
                        await _one(proc, path, image, load))
    except BaseException:
        for _, proc, _, log_path in daemons:
            await _stop_after_failure(proc, log_path)
        raise
    for _, proc, _, _ in daemons:
        await _stop(proc)
    out = []
    for n, _, _, _ in daemons:
        name = Path(kernels[n]).name if kernels else "default"
        for line, _ in QUEUE_LINES:
            results = runs[(n, line)]
            by_iops = sorted(results, key=lambda r: r.iops)
            mid = by_iops[len(by_iops) // 2]
            ios = sum(r.ios for r in results)
            ratio = ""
            if line == "2q":
                ratios = sorted(_ratio(two.iops, one_.iops) for two, one_ in
                                zip(results, runs[(n, "1q")], strict=True))
                ratio = ", ".join(f"{x:.2f}" for x in ratios)
            out.append((f"{name} {_describe(mid.load, mid)}", mid.iops,
                        f"{by_iops[0].iops:,.0f}-{by_iops[-1].iops:,.0f}", mid.lat_ns["p50"] / 1e3,
                        mid.cpu_us_per_io, mid.frontend_cpu_us_per_io,
                        f'{sum(r.raw["kicks"] for r in results) / ios:.4f}',
                        f'{sum(r.raw["waits"] for r in results) / ios:.4f}', ratio))
    return out


def _persistent_load(bs: int, rw: str, queues: int, persistent: bool, seconds: float
                     ) -> Load:
    if bs >= MiB:
        return Load(rw=rw, pattern="seq", bs=bs, qd=4, seconds=seconds,
                    persistent=persistent)
    return Load(rw=rw, bs=bs, qd=32, queues=queues, seconds=seconds, persistent=persistent)


def _unit(value: float, unit: str) -> str:
    if value != value:
        return "-"
    if unit == "%":
        return f"{value:.0%}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.2f} us"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.blk")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="per line")
    parser.add_argument("--persistent-rounds", type=int, default=0, metavar="N",
                        help="only the 4 KiB lines with and without persistent grants, "
                        "alternated N times (medians)")
    parser.add_argument("--beside-rounds", type=int, default=0, metavar="N",
                        help="only the cached 4 KiB reads alone and beside O_DIRECT "
                        "readers, N rounds in turn")
    parser.add_argument("--queues-rounds", type=int, default=0, metavar="N",
                        help="only the 4 KiB randread QD32 1- and 2-queue lines and QD1, "
                        "alternated N times (medians)")
    parser.add_argument("--kernel", action="append", default=[], metavar="PATH",
                        help="with --queues-rounds: a blk kernel build to run (one daemon "
                        "each, alternated); default: the worktree's own")
    args = parser.parse_args(argv or [])
    if args.kernel and not args.queues_rounds:
        parser.error("--kernel goes with --queues-rounds")
    if args.queues_rounds:
        _queues_main(args.seconds, args.queues_rounds, args.kernel)
        return
    if args.beside_rounds:
        _beside_main(args.seconds, args.beside_rounds)
        return
    if args.persistent_rounds:
        _persistent_main(args.seconds, args.persistent_rounds)
        return
    if shutil.which("fio") is None:
        raise SystemExit("bench.blk: fio is missing, so there is no baseline to print "
                         "beside the daemon's figures: `make bench` installs it")
    for name in ("blkfront_load", "eventfd_pingpong"):
        build(name)
    rows, targets = _on_a_warm_image(measure, args.seconds)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(table(f"blk on a warm {IMAGE_SIZE // MiB} MiB image file, {args.seconds:g} s a "
                f"line, {os.cpu_count()} CPUs, {when} (QD per queue)",
                ["what", "IOPS", "MB/s", "p50 us", "p99 us", "daemon CPU us/IO",
                 "frontend CPU us/IO"],
                [r.cells() for r in rows]))
    print()
    print(table("targets (ratios from this run)", ["what", "measured", "goal", "met"],
                targets))
    print()
    from . import nbd  # the same reads through an NBD export, beside fio's nbd engine
    nbd.main(["--seconds", f"{args.seconds:g}"])


def _on_a_warm_image(measure_fn, *args):
    """measure_fn(image, workdir, *args) on a fresh warm image in a scratch directory."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-blk-", dir="/var/tmp"))
    try:
        image = str(workdir / "disk.img")
        _make_image(image)
        return asyncio.run(measure_fn(image, workdir, *args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _persistent_main(seconds: float, rounds: int) -> None:
    build("blkfront_load")
    rows = _on_a_warm_image(measure_persistent, seconds, rounds)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(table(f"blk, persistent grants on and off alternated, {rounds} rounds "
                f"of {seconds:g} s a line, {os.cpu_count()} CPUs, {when} (median run)",
                ["what", "IOPS", "IOPS range", "p50 us", "p99 us", "daemon CPU us/IO",
                 "CPU range", "frontend CPU us/IO"], rows))


def _beside_main(seconds: float, rounds: int) -> None:
    if shutil.which("fio") is None:
        raise SystemExit("bench.blk: fio is missing: `make bench` installs it")
    build("blkfront_load")
    load = os.getloadavg()
    per_round, summary = _on_a_warm_image(measure_beside, seconds, rounds)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(table(f"cached 4 KiB randread QD32 x1q beside O_DIRECT readers, {rounds} rounds "
                f"of {seconds:g} s a line, {os.cpu_count()} CPUs, {when}, load "
                f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} before",
                ["round", "cached guest", "IOPS", "/ alone", "daemon CPU us/IO",
                 "O_DIRECT reader IOPS"], per_round))
    print()
    print(table("medians over the rounds", ["cached guest", "IOPS", "/ alone", "range",
                                            "daemon CPU us/IO", "O_DIRECT reader IOPS"],
                summary))


def _queues_main(seconds: float, rounds: int, kernels: list[str]) -> None:
    build("blkfront_load")
    rows = _on_a_warm_image(measure_queues, seconds, rounds, kernels)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    print(table(f"blk queues, {rounds} rounds of {seconds:g} s a line alternated, "
                f"{os.cpu_count()} CPUs, {when}, load average {load[0]:.2f} {load[1]:.2f} "
                "(median run)",
                ["what", "IOPS", "IOPS range", "p50 us", "daemon CPU us/IO",
                 "frontend CPU us/IO", "kicks/IO", "sleeps/IO",
                 "2q/1q of each round, sorted"], rows))


__all__ = ["Row", "fio", "main", "measure", "measure_beside", "measure_persistent",
           "measure_queues"]

if __name__ == "__main__":
    main(sys.argv[1:])
