"""The benchmarks' C programs (blkfront_load, netfront_load, eventfd_pingpong): built with
the Debian gcc against Xen's public headers, on demand, into build/native/ of the checkout.
blkfront_load and netfront_load are compiled with the C client library
(clients/c/backendd-client.c).

    python -m bench.native          build them all (what `make bench` and `make test` run)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCES = Path(__file__).resolve().parent
ROOT = SOURCES.parent.parent
# The C client library (docs/protocol.md, "Reference client for C VMMs"): blkfront_load
# and netfront_load do their own control plane through it with --socket.
CLIENT = ROOT / "clients" / "c"
OUT = ROOT / "build" / "native"
PROGRAMS = ("blkfront_load", "netfront_load", "eventfd_pingpong")
# What the frontends share (guest memory, grants, eventfds, options, the stdio protocol,
# the --socket control plane).
COMMON = {"blkfront_load": ("frontend_common.c", CLIENT / "backendd-client.c"),
          "netfront_load": ("frontend_common.c", CLIENT / "backendd-client.c")}
COMMON_HEADERS = ("frontend_common.h", CLIENT / "backendd-client.h")
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-pthread"]
SANITIZE = ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all"]


class BuildError(RuntimeError):
    pass


def build(name: str, sanitize: bool = False, out_dir: Path | None = None) -> Path:
    """Path of the compiled program, compiled first when missing or older than any of its
    sources. `sanitize`: with -fsanitize=address,undefined (a report aborts the program)."""
    source = SOURCES / f"{name}.c"
    sources = [source, *(SOURCES / extra for extra in COMMON.get(name, ()))]
    inputs = sources + ([SOURCES / h for h in COMMON_HEADERS] if name in COMMON else [])
    out = (out_dir or OUT) / (f"{name}-sanitize" if sanitize else name)
    if out.exists() and out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("gcc is missing: `make bench` or `make test` installs it")
    if not Path("/usr/include/xen/io/ring.h").exists():
        raise BuildError("Xen public headers missing (/usr/include/xen): "
                         "`make bench` or `make test` installs libxen-dev")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    flags = CFLAGS + (SANITIZE if sanitize else [])
    result = subprocess.run([gcc, *flags, f"-I{CLIENT}", "-o", str(tmp), *map(str, sources)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"gcc {' '.join(flags)} {source.name} failed:\n{result.stderr}")
    tmp.replace(out)  # atomic: a concurrent build never sees half a binary
    return out


def main() -> int:
    try:
        for name in PROGRAMS:
            print(build(name))
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


__all__ = ["BuildError", "build"]
