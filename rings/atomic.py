"""Memory barriers and compare-and-swap on shared memory, through libatomic.

Python has no fence or atomic read-modify-write on a buffer of its own. GCC's libatomic
exports both as plain C functions (`atomic_thread_fence`, `__atomic_compare_exchange_2`),
so ctypes can call them on an address inside an mmap'd guest page. A call costs about
1-3 us, far below a syscall, and each is the real instruction: `mfence` and `lock cmpxchg`
on x86.

Plain loads and stores of aligned 32-bit ring indices need no help: they go through a
native-format memoryview (`cast("I")`), which CPython performs with one `memcpy` of four
bytes, compiled to a single aligned load or store, so the other side never sees a torn
index.
"""

import ctypes
import ctypes.util
import platform

_SEQ_CST = 5  # __ATOMIC_SEQ_CST


def _load_libatomic() -> ctypes.CDLL:
    for name in ("libatomic.so.1", ctypes.util.find_library("atomic")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise ImportError("libatomic.so.1 not found: install the libatomic1 package")


_lib = _load_libatomic()

_fence = _lib.atomic_thread_fence
_fence.argtypes = [ctypes.c_int]
_fence.restype = None

_cas16 = _lib.__atomic_compare_exchange_2
_cas16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint16, ctypes.c_int,
                   ctypes.c_int]
_cas16.restype = ctypes.c_bool

_cas32 = _lib.__atomic_compare_exchange_4
_cas32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                   ctypes.c_int]
_cas32.restype = ctypes.c_bool

_or8 = _lib.__atomic_fetch_or_1
_or8.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
_or8.restype = ctypes.c_uint8

_xchg64 = _lib.__atomic_exchange_8
_xchg64.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
_xchg64.restype = ctypes.c_uint64


def full_barrier() -> None:
    """xen_mb(): orders earlier loads and stores before later ones, including a store
    before a later load, which x86 otherwise reorders through its store buffer."""
    _fence(_SEQ_CST)


def _compiler_barrier() -> None:
    """Each Python-level access is an opaque C call, so the compiler cannot move loads or
    stores across it; that is all x86's total store order needs for wmb/rmb."""


# xen_wmb()/xen_rmb(): free on x86 (TSO keeps store->store and load->load order); a real
# fence elsewhere.
if platform.machine() in ("x86_64", "AMD64", "i386", "i686"):
    write_barrier = _compiler_barrier
    read_barrier = _compiler_barrier
else:  # pragma: no cover - exercised only on weakly ordered hosts
    write_barrier = full_barrier
    read_barrier = full_barrier


def cmpxchg16(address: int, expected: int, desired: int) -> tuple[bool, int]:
    """Atomically replace the u16 at `address` with `desired` if it equals `expected`.
    Returns (swapped, value seen)."""
    seen = ctypes.c_uint16(expected)
    ok = _cas16(address, ctypes.byref(seen), desired, _SEQ_CST, _SEQ_CST)
    return bool(ok), seen.value


def cmpxchg32(address: int, expected: int, desired: int) -> tuple[bool, int]:
    seen = ctypes.c_uint32(expected)
    ok = _cas32(address, ctypes.byref(seen), desired, _SEQ_CST, _SEQ_CST)
    return bool(ok), seen.value


def fetch_or8(address: int, bits: int) -> int:
    """Atomically OR `bits` into the byte at `address` (`lock or`); returns the byte
    before. A dirty-log bit is set this way while the VMM clears words of the same log."""
    return int(_or8(address, bits, _SEQ_CST))


def exchange64(address: int, value: int) -> int:
    """Atomically replace the aligned u64 at `address` with `value`; returns the old one."""
    return int(_xchg64(address, value, _SEQ_CST))


class PinnedAddress:
    """The address of a writable buffer (an mmap), held while atomics use it.

    ctypes keeps a buffer export open while the address is in use, which stops the mmap
    from being closed underneath; `release()` drops it before the owner unmaps."""

    __slots__ = ("_anchor", "address")

    def __init__(self, buffer: object) -> None:
        self._anchor: ctypes.Array | None = (ctypes.c_char * len(buffer)).from_buffer(buffer)  # type: ignore[arg-type]
        self.address = ctypes.addressof(self._anchor)

    def release(self) -> None:
        self._anchor = None
        self.address = 0
