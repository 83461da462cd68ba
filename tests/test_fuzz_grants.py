"""GrantTable.map against random grant entries, v1 and v2, over a guest whose memory is
all canary: the daemon must either refuse with GrantError or hand out a mapping of
exactly the entry's frame (and sub-page window) with exactly the permission the flags
allow; it must write nothing into guest memory on its own; and once every mapping is
released the guest's entry (v1) or status word (v2) must be exactly what the guest left
there. A second guest thread rewrites an entry while the daemon maps it."""

from __future__ import annotations

import contextlib
import mmap
import random
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from backendd.grants import GrantError, GrantMapping, GrantTable
from backendd.guest import GuestGrantTable, GuestRAM
from backendd.memory import GuestMemory
from rings.consts import (
    GTF_READING,
    GTF_READONLY,
    GTF_SUB_PAGE,
    GTF_TYPE_MASK,
    GTF_WRITING,
    PAGE_SIZE,
    GrantType,
)

# Two RAM regions with a hole between them: frames 0-15 and 32-47 exist, 16-31 do not.
LAYOUT = [(0, 16 * PAGE_SIZE), (32 * PAGE_SIZE, 16 * PAGE_SIZE)]
RAM_FRAMES = [*range(16), *range(32, 48)]
IN_USE = GTF_READING | GTF_WRITING


def canary(gpa: int, n: int) -> bytes:
    """A pattern that names its own address, so a misplaced copy is caught too."""
    return bytes((gpa + i) * 7 + 0x5A & 0xFF for i in range(n))


CANARY = {gfn: canary(gfn * PAGE_SIZE, PAGE_SIZE) for gfn in RAM_FRAMES}


@dataclass
class Guest:
    ram: GuestRAM
    gt: GuestGrantTable
    table: GrantTable
    image: dict[int, bytearray]  # gfn -> what the guest expects that page to hold

    def check_memory(self) -> None:
        for gfn, expected in self.image.items():
            assert self.ram.read(gfn * PAGE_SIZE, PAGE_SIZE) == expected, f"frame {gfn:#x}"

    def raw_entry(self, gref: int) -> bytes:
        size = self.gt.entry_size
        with open(f"/proc/self/fd/{self.gt.fd}", "rb") as f:
            f.seek(gref * size)
            return f.read(size)


@contextlib.contextmanager
def guest(version: int) -> Iterator[Guest]:
    ram = GuestRAM(sum(s for _, s in LAYOUT), LAYOUT)
    gt = GuestGrantTable(nr_frames=1, version=version)
    mem = GuestMemory()
    image = {}
    for gfn in RAM_FRAMES:
        image[gfn] = bytearray(CANARY[gfn])
        ram.write(gfn * PAGE_SIZE, image[gfn])
    for gpa, size, fd, offset in ram.regions:
        mem.add_region(gpa, size, fd, offset)
    table = GrantTable(mem, backend_domid=0)
    table.set_table(gt.fd, 0, gt.nr_frames, version)
    try:
        yield Guest(ram, gt, table, image)
    finally:
        table.close()
        mem.close()
        gt.close()
        ram.close()


frames = st.one_of(st.sampled_from(RAM_FRAMES), st.integers(16, 31),
                   st.sampled_from([48, 0xFFFFF, (1 << 32) - 1]), st.integers(0, (1 << 32) - 1))
flag_values = st.one_of(
    st.sampled_from([GrantType.PERMIT_ACCESS, GrantType.PERMIT_ACCESS | GTF_READONLY,
                     GrantType.PERMIT_ACCESS | GTF_SUB_PAGE, GrantType.INVALID,
                     GrantType.TRANSITIVE, GrantType.ACCEPT_TRANSFER]),
    st.integers(0, 0xFFFF)).map(lambda f: f & ~IN_USE)  # in-use bits are the backend's
entries = st.tuples(flag_values, st.sampled_from([0, 0, 0, 1, 0x7FF0, 0xFFFF]), frames,
                    st.tuples(st.integers(0, 4200), st.integers(0, 4200)))
valid_entries = st.tuples(st.sampled_from([GrantType.PERMIT_ACCESS,
                                           GrantType.PERMIT_ACCESS | GTF_READONLY,
                                           GrantType.PERMIT_ACCESS | GTF_SUB_PAGE]),
                          st.just(0), st.sampled_from(RAM_FRAMES),
                          st.tuples(st.integers(0, 4096), st.integers(0, 4096)))
# A few grefs, so maps mostly land on entries the guest wrote; and some beyond the table.
grefs = st.one_of(st.integers(0, 3), st.sampled_from([-1, 255, 256, 511, 512, 1 << 31]))
ops = st.lists(st.one_of(
    st.tuples(st.just("set"), st.integers(0, 3), st.one_of(valid_entries, entries)),
    st.tuples(st.just("map"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("map"), grefs, st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("write"), st.integers(0, 20), st.binary(min_size=1, max_size=64)),
), min_size=1, max_size=30)


def expected_window(g: Guest, gref: int, writable: bool) -> tuple[int, tuple[int, int]] | None:
    """What a correct daemon maps for this entry: (frame, window), or None to refuse."""
    if not 0 <= gref < g.gt.entries:
        return None
    flags, domid, frame = g.gt.entry(gref)
    if flags & GTF_TYPE_MASK != GrantType.PERMIT_ACCESS or domid != 0:
        return None
    if writable and flags & GTF_READONLY:
        return None
    if frame not in g.image:
        return None
    if g.gt.version == 2 and flags & GTF_SUB_PAGE:
        off, length = struct_sub_page(g, gref)
        if off + length > PAGE_SIZE:
            return None
        return frame, (off, off + length)
    return frame, (0, PAGE_SIZE)


def struct_sub_page(g: Guest, gref: int) -> tuple[int, int]:
    raw = g.raw_entry(gref)
    return int.from_bytes(raw[4:6], "little"), int.from_bytes(raw[6:8], "little")


def in_use_bits(g: Guest, gref: int) -> int:
    if g.gt.version == 2:
        return g.gt.status(gref)
    return g.gt.entry(gref)[0] & IN_USE


def check_flags(g: Guest, held: list[GrantMapping], written: dict[int, bytes]) -> None:
    """Every entry is what the guest wrote, plus exactly the backend's in-use bits."""
    for gref, raw in written.items():
        mine = [m for m in held if m.gref == gref]
        want = (GTF_READING if mine else 0) | (GTF_WRITING if any(m.writable for m in mine)
                                                else 0)
        assert in_use_bits(g, gref) == want, f"gref {gref}"
        now = bytearray(g.raw_entry(gref))
        if g.gt.version == 1:
            now[0] &= ~IN_USE
        assert bytes(now) == raw, f"gref {gref}: entry changed by the daemon"


def run_ops(version: int, initial: list, steps: list) -> None:
    with guest(version) as g:
        held: list[GrantMapping] = []
        written: dict[int, bytes] = {}
        for op in [("set", gref, entry) for gref, entry in enumerate(initial)] + steps:
            if op[0] == "set":
                _, gref, (flags, domid, frame, sub) = op
                if any(m.gref == gref for m in held):
                    continue  # rewriting a busy entry is the threaded test's business
                if version == 1:
                    frame &= 0xFFFFFFFF
                g.gt.set_entry(gref, flags, domid, frame, sub)
                written[gref] = g.raw_entry(gref)
            elif op[0] == "map":
                _, gref, writable = op
                want = expected_window(g, gref, writable)
                try:
                    m = g.table.map(gref, writable)
                except GrantError:
                    assert want is None, f"gref {gref}: a valid grant was refused"
                else:
                    assert want is not None, f"gref {gref}: mapped a grant it must refuse"
                    frame, window = want
                    assert (m.frame, m.window, m.writable) == (frame, window, writable)
                    lo, hi = window
                    assert bytes(m.page_view(lo, hi - lo)) == g.image[frame][lo:hi]
                    if not writable and hi > lo:
                        with pytest.raises(TypeError):
                            m.page_view(lo, 1)[0] = 0
                    if lo > 0:
                        with pytest.raises(GrantError):
                            m.page_view(lo - 1, 1)
                    with pytest.raises(GrantError):
                        m.page_view(lo, hi - lo + 1)
                    held.append(m)
            elif op[0] == "release" and held:
                held.pop(op[1] % len(held)).release()
            elif op[0] == "write":
                writable = [m for m in held if m.writable and m.window[1] > m.window[0]]
                if writable:
                    m = writable[op[1] % len(writable)]
                    lo, hi = m.window
                    data = op[2][:hi - lo]
                    m.page_view(lo, len(data))[:] = data
                    g.image[m.frame][lo:lo + len(data)] = data
            check_flags(g, held, written)
            g.check_memory()
        for m in held:
            m.release()
        check_flags(g, [], written)
        g.check_memory()


@settings(max_examples=examples(120), deadline=None)
@given(initial=st.lists(valid_entries, min_size=4, max_size=4), steps=ops)
def test_random_v1_entries(initial, steps):
    run_ops(1, initial, steps)


@settings(max_examples=examples(120), deadline=None)
@given(initial=st.lists(valid_entries, min_size=4, max_size=4), steps=ops)
def test_random_v2_entries(initial, steps):
    run_ops(2, initial, steps)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("what", ["flags", "domid"])
def test_entry_rewritten_by_another_thread_while_mapping(version, what):
    """A guest vCPU flips the entry between grantable and not while the daemon maps it.
    Every attempt either fails with GrantError or maps the one frame granted; afterwards
    the entry holds exactly the guest's last store and no in-use bit is left behind."""
    with guest(version) as g:
        gref, frame = 9, 3
        good = GrantType.PERMIT_ACCESS
        g.gt.set_entry(gref, good, 0, frame)
        # The guest's own mapping of its table, as a second vCPU would store to it.
        shared = mmap.mmap(g.gt.fd, g.gt.size)
        words = memoryview(shared).cast("H")
        first = gref * g.gt.entry_size // 2
        if what == "flags":
            values = [(first, v) for v in (good, good | GTF_READONLY, GrantType.INVALID,
                                           GrantType.TRANSITIVE, good | GTF_SUB_PAGE)]
        else:
            values = [(first + 1, d) for d in (0, 7, 0, 0xFFFF)]
        stop = threading.Event()
        flipping = threading.Event()
        last: list[tuple[int, int]] = []

        def flipper() -> None:
            rng = random.Random(version)
            while not stop.is_set():
                word, value = rng.choice(values)
                words[word] = value
                last[:] = [(word, value)]
                flipping.set()

        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        thread = threading.Thread(target=flipper)
        thread.start()
        outcomes = {"mapped": 0, "refused": 0}
        try:
            # Map only once the guest is storing: on a loaded machine the thread may not
            # have run at all by the time 400 mappings are done.
            assert flipping.wait(timeout=60), "the flipping thread never ran"
            for i in range(400):
                writable = bool(i & 1)
                try:
                    with g.table.map(gref, writable) as m:
                        assert m.frame == frame
                        outcomes["mapped"] += 1
                        if m.window == (0, PAGE_SIZE):
                            assert bytes(m.page_view()) == g.image[frame]
                except GrantError:
                    outcomes["refused"] += 1
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(old_interval)
        assert outcomes["mapped"] + outcomes["refused"] == 400
        assert in_use_bits(g, gref) == 0
        word, value = last[0]
        assert words[word] == value  # the guest's last store, no bit of ours left
        g.check_memory()
        words.release()
        shared.close()
