"""Compiles and loads the data-plane kernels (blk_kernel.c, net_kernel.c; both include
core.h and pool.h) with the system gcc against Xen's public headers, and nbd_kernel.c
(an NBD disk's reads and writes, linked with libnbd).

    python -m backendd.dataplane.build [--sanitize] [-o PATH] [blk] [net] [nbd]

builds the kernels named (both if none) next to this file, or one of them at PATH. The
Makefile runs this before `demo` and `test`, and `make install` into the installed
package; the tests also build sanitizer variants (-fsanitize=address,undefined) into a
temporary directory.

`Loader` is how each binding finds its library: at $BACKENDD_BLK_KERNEL or
$BACKENDD_NET_KERNEL (the tests point them at sanitizer builds), else next to this file.
`Region` and `Env` are core.h's `dp_region` and `dp_env`, which both kernels take.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from backendd.dirtylog import DirtyBitmap

HERE = Path(__file__).resolve().parent
XEN = Path("/usr/include/xen")
CFLAGS = ["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
          "-fvisibility=default"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer"]


@dataclass(frozen=True)
class Spec:
    """One kernel: its C file, the Xen header it cannot do without, where it goes."""

    name: str
    source: Path
    xen_header: str
    env: str
    libs: tuple[str, ...] = ()  # gcc's -l options

    @property
    def library(self) -> Path:
        return HERE / f"_{self.name}_kernel.so"


KERNELS = {
    "blk": Spec("blk", HERE / "blk_kernel.c", "io/blkif.h", "BACKENDD_BLK_KERNEL"),
    "net": Spec("net", HERE / "net_kernel.c", "io/netif.h", "BACKENDD_NET_KERNEL"),
    # An NBD disk's reads and writes issued to libnbd (Debian libnbd-dev) from C.
    "nbd": Spec("nbd", HERE / "nbd_kernel.c", "", "BACKENDD_NBD_KERNEL", ("-lnbd",)),
}


class Region(ctypes.Structure):
    _fields_ = [("gpa", ctypes.c_uint64), ("size", ctypes.c_uint64), ("host", ctypes.c_void_p)]


class Env(ctypes.Structure):
    _fields_ = [("regions", ctypes.POINTER(Region)), ("nr_regions", ctypes.c_uint32),
                ("gnt_version", ctypes.c_uint32), ("gnt_entries", ctypes.c_uint32),
                ("backend_domid", ctypes.c_uint32), ("gnt_shared", ctypes.c_void_p),
                ("gnt_status", ctypes.c_void_p), ("gnt_uses", ctypes.c_void_p),
                ("log", ctypes.c_void_p), ("log_ram_pages", ctypes.c_uint64),
                ("log_gnt_offset", ctypes.c_uint64), ("log_gnt_pages", ctypes.c_uint64)]


def set_log(env: Env, log: DirtyBitmap | None) -> None:
    """Point `env` at the connection's dirty log (None: logging off, one NULL test per
    write site in the kernels)."""
    if log is None or not log.address:
        env.log = None
        env.log_ram_pages = env.log_gnt_offset = env.log_gnt_pages = 0
    else:
        env.log = log.address
        env.log_ram_pages = log.ram_pages
        env.log_gnt_offset = log.gnt_offset
        env.log_gnt_pages = log.gnt_pages


class BuildError(Exception):
    pass


class KernelError(Exception):
    """A library that does not match its binding (built for other layouts)."""


def build(name: str, out: Path | None = None, sanitize: bool = False) -> Path:
    """Compile kernel `name` ("blk", "net" or "nbd") to `out` (default: next to this file)."""
    spec = KERNELS[name]
    out = spec.library if out is None else out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("gcc is missing (the Makefile installs it)")
    if spec.xen_header and not (XEN / spec.xen_header).exists():
        raise BuildError("Xen public headers missing: install libxen-dev")
    flags = CFLAGS + (SANITIZE if sanitize else [])
    tmp = out.with_name(out.name + ".tmp")
    result = subprocess.run([gcc, *flags, "-o", str(tmp), str(spec.source), *spec.libs],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise BuildError(f"gcc failed on {spec.source.name}:\n{result.stderr}")
    tmp.replace(out)  # atomic: a running daemon keeps the old file it mapped
    return out


T = TypeVar("T")


class Loader(Generic[T]):
    """Finds and opens one kernel's library once per process; `load()` is None when it
    is not built (devices then use the pure-Python data plane)."""

    def __init__(self, name: str, bind: Callable[[str], T]) -> None:
        self.spec = KERNELS[name]
        self.bind = bind
        self._loaded: T | None = None
        self._tried = False

    def library_path(self) -> str:
        return os.environ.get(self.spec.env) or str(self.spec.library)

    def load(self) -> T | None:
        if not self._tried:
            self._tried = True
            path = self.library_path()
            if os.path.exists(path):
                self._loaded = self.bind(path)
        return self._loaded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backendd.dataplane.build")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("-o", "--output", type=Path, help="with exactly one kernel named")
    ap.add_argument("kernels", nargs="*", metavar="{blk,net,nbd}")
    args = ap.parse_args(argv)
    names = args.kernels or list(KERNELS)
    if unknown := [n for n in names if n not in KERNELS]:
        ap.error(f"unknown kernel {unknown[0]!r}: blk, net or nbd")
    if args.output is not None and len(names) != 1:
        ap.error("-o needs exactly one kernel")
    try:
        for name in names:
            print(build(name, args.output, args.sanitize))
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
