"""Compiles the C programs under tests/native with gcc. Absence of the compiler or the
Xen headers is a failure with a clear message, never a skip: these tests are the proof
that our layouts are Xen's."""

import re
import shutil
import struct
import subprocess
from pathlib import Path

from construct import Struct

from rings import Codec

NATIVE = Path(__file__).resolve().parent / "native"


def compile_c(source: str, out_dir: Path, bits: int = 64) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is missing: run `make test`, which installs gcc and gcc-multilib"
    assert Path("/usr/include/xen/io/ring.h").exists(), (
        "Xen public headers missing: run `make test`, which installs libxen-dev")
    binary = out_dir / f"{Path(source).stem}-m{bits}"
    result = subprocess.run(
        [gcc, f"-m{bits}", "-O2", "-Wall", "-Werror", "-o", str(binary), str(NATIVE / source)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"gcc -m{bits} {source} failed:\n{result.stderr}"
    return binary


_TOKEN = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefds])")


def field_offsets(layout: Struct) -> dict[str, int]:
    """Byte offset of every named field of a construct layout, from its derived codec."""
    codec = Codec(layout)
    offsets: dict[str, int] = {}
    names = iter(codec.names)
    offset = 0
    for count, code in _TOKEN.findall(codec.struct.format[1:]):
        n = int(count) if count else 1
        if code == "x":
            offset += n
        elif code == "s":
            offsets[next(names)] = offset
            offset += n
        else:
            size = struct.calcsize("<" + code)
            for _ in range(n):
                offsets[next(names)] = offset
                offset += size
    assert offset == layout.sizeof()
    return offsets
