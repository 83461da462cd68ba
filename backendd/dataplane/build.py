"""Compiles the data-plane kernel with the system gcc against Xen's public headers.

    python -m backendd.dataplane.build [--sanitize] [-o PATH]

The Makefile runs this before `demo` and `test`; the tests also build a sanitizer
variant (-fsanitize=address,undefined) into a temporary directory.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "blk_kernel.c"
LIBRARY = HERE / "_blk_kernel.so"
CFLAGS = ["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
          "-fvisibility=default"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer"]


class BuildError(Exception):
    pass


def build(out: Path = LIBRARY, sanitize: bool = False) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("gcc is missing (the Makefile installs it)")
    if not Path("/usr/include/xen/io/blkif.h").exists():
        raise BuildError("Xen public headers missing: install libxen-dev")
    flags = CFLAGS + (SANITIZE if sanitize else [])
    tmp = out.with_name(out.name + ".tmp")
    result = subprocess.run([gcc, *flags, "-o", str(tmp), str(SOURCE)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise BuildError(f"gcc failed:\n{result.stderr}")
    tmp.replace(out)  # atomic: a running daemon keeps the old file it mapped
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backendd.dataplane.build")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("-o", "--output", type=Path, default=LIBRARY)
    args = ap.parse_args(argv)
    try:
        print(build(args.output, args.sanitize))
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
