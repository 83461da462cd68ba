"""Hot-path codecs: `struct.Struct` objects derived from the construct layouts.

construct is the single source of truth for every layout, but parsing with it costs
~150 us per request and its compiled mode skips checks, so guest data is decoded with a
`struct.Struct` whose format is computed here by walking the construct declaration. The
result is a flat tuple in declaration order (arrays and nested structs flattened), and
`flatten_parsed` turns a construct parse result into the same tuple so the two can be
compared (tests do, on random inputs).
"""

import struct
from typing import Any

from construct import Array, Bytes, Construct, FormatField, Padded, Pass, Renamed, Struct


def _flatten(con: Construct, name: str, fmt: list[str], names: list[str]) -> None:
    if isinstance(con, Renamed):
        _flatten(con.subcon, name, fmt, names)  # the parent Struct qualified the name
    elif isinstance(con, FormatField):
        fmt.append(con.fmtstr[1:])  # drop the byte-order prefix; the whole struct is '<'
        names.append(name)
    elif isinstance(con, Padded) and con.subcon is Pass:
        fmt.append(f"{con.length}x")
    elif isinstance(con, Bytes):
        fmt.append(f"{con.length}s")
        names.append(name)
    elif isinstance(con, Array):
        for i in range(con.count):
            _flatten(con.subcon, f"{name}[{i}]", fmt, names)
    elif isinstance(con, Struct):
        for sub in con.subcons:
            sub_name = sub.name if isinstance(sub, Renamed) else None
            _flatten(sub, f"{name}.{sub_name}" if name and sub_name else (sub_name or name),
                     fmt, names)
    else:
        raise TypeError(f"no struct equivalent for {type(con).__name__} ({name})")


class Codec:
    """A construct layout compiled to one little-endian `struct.Struct`."""

    __slots__ = ("layout", "names", "size", "struct")

    def __init__(self, layout: Struct) -> None:
        fmt: list[str] = []
        names: list[str] = []
        _flatten(layout, "", fmt, names)
        self.layout = layout
        self.struct = struct.Struct("<" + "".join(fmt))
        self.names = tuple(names)
        self.size = self.struct.size
        if self.size != layout.sizeof():
            raise AssertionError(f"derived size {self.size} != construct {layout.sizeof()}")

    def unpack_from(self, buf: Any, offset: int = 0) -> tuple:
        return self.struct.unpack_from(buf, offset)

    def unpack(self, data: bytes) -> tuple:
        return self.struct.unpack(data)

    def pack(self, *values: Any) -> bytes:
        return self.struct.pack(*values)

    def pack_into(self, buf: Any, offset: int, *values: Any) -> None:
        self.struct.pack_into(buf, offset, *values)

    def field_index(self, name: str) -> int:
        return self.names.index(name)


def flatten_parsed(layout: Struct, parsed: Any) -> tuple:
    """A construct parse result as the flat tuple a Codec of `layout` produces."""
    out: list[Any] = []

    def walk(con: Construct, value: Any) -> None:
        if isinstance(con, Renamed):
            walk(con.subcon, value)
        elif isinstance(con, FormatField | Bytes):
            out.append(value)
        elif isinstance(con, Padded) and con.subcon is Pass:
            pass
        elif isinstance(con, Array):
            for item in value:
                walk(con.subcon, item)
        elif isinstance(con, Struct):
            for sub in con.subcons:
                if isinstance(sub, Renamed) and sub.name:
                    walk(sub, value[sub.name])
                else:
                    walk(sub, None)
        else:
            raise TypeError(type(con).__name__)

    walk(layout, parsed)
    return tuple(out)


def unflatten(layout: Struct, values: tuple) -> dict:
    """The inverse of flatten_parsed: a dict construct can build from."""
    it = iter(values)

    def walk(con: Construct) -> Any:
        if isinstance(con, Renamed):
            return walk(con.subcon)
        if isinstance(con, FormatField | Bytes):
            return next(it)
        if isinstance(con, Padded) and con.subcon is Pass:
            return None
        if isinstance(con, Array):
            return [walk(con.subcon) for _ in range(con.count)]
        if isinstance(con, Struct):
            result = {}
            for sub in con.subcons:
                value = walk(sub)
                if isinstance(sub, Renamed) and sub.name:
                    result[sub.name] = value
            return result
        raise TypeError(type(con).__name__)

    return walk(layout)
