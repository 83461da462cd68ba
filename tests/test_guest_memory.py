"""GuestMemory over real memfds, and the simulated guest's RAM built on it."""

import errno
import os

import pytest

from backendd.errors import ControlError, GuestError
from backendd.guest import GuestRAM
from backendd.memory import GuestMemory, GuestMemoryError

PAGE = 4096


@pytest.fixture
def memfd():
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * PAGE)
    yield fd
    os.close(fd)


@pytest.fixture
def mem():
    m = GuestMemory()
    yield m
    m.close()


def test_region_shares_the_fd_both_ways(mem, memfd):
    mem.add_region(0x10000, 4 * PAGE, memfd, offset=2 * PAGE)
    os.pwrite(memfd, b"from-vmm", 2 * PAGE + 5)
    assert mem.read(0x10005, 8) == b"from-vmm"
    mem.write(0x10000 + PAGE, b"from-daemon")
    assert os.pread(memfd, 11, 3 * PAGE) == b"from-daemon"
    assert bytes(mem.page(0x11)[:11]) == b"from-daemon"


def test_read_write_cross_adjacent_regions_but_views_do_not(mem, memfd):
    mem.add_region(0, 2 * PAGE, memfd, 0)
    mem.add_region(2 * PAGE, 2 * PAGE, memfd, 8 * PAGE)  # adjacent gpa, distant offset
    data = bytes(range(256)) * 2
    mem.write(2 * PAGE - 100, data)
    assert mem.read(2 * PAGE - 100, len(data)) == data
    assert os.pread(memfd, 100, PAGE * 2 - 100) == data[:100]
    assert os.pread(memfd, len(data) - 100, 8 * PAGE) == data[100:]
    with pytest.raises(GuestMemoryError, match="one memory region"):
        mem.view(2 * PAGE - 100, 200)


def test_holes_are_not_memory(mem, memfd):
    mem.add_region(0, PAGE, memfd, 0)
    mem.add_region(4 * PAGE, PAGE, memfd, PAGE)
    with pytest.raises(GuestMemoryError):
        mem.page(1)
    with pytest.raises(GuestMemoryError):
        mem.read(PAGE - 4, 8)  # runs into the hole
    with pytest.raises(GuestMemoryError):
        mem.write(4 * PAGE - 1, b"xy")
    # A failed write changes nothing, even the part that was inside a region.
    assert mem.read(0, PAGE) == bytes(PAGE)
    assert mem.page(4)[0] == 0


@pytest.mark.parametrize("gpa,length", [
    (-1, 1), (2**64, 0), (2**64 - 1, 2), (0, -1), (2**63, 2**63 + 1),
])
def test_checked_arithmetic(mem, memfd, gpa, length):
    mem.add_region(0, PAGE, memfd, 0)
    with pytest.raises(GuestMemoryError) as e:
        mem.view(gpa, length)
    assert isinstance(e.value, GuestError)
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)


def test_page_rejects_frames_outside_memory(mem, memfd):
    mem.add_region(0, PAGE, memfd, 0)
    for gfn in (-1, 1, 2**52, 2**64):
        with pytest.raises(GuestMemoryError):
            mem.page(gfn)


@pytest.mark.parametrize("gpa,size,offset,code", [
    (1, PAGE, 0, errno.EINVAL),
    (0, PAGE + 1, 0, errno.EINVAL),
    (0, PAGE, 12, errno.EINVAL),
    (0, 0, 0, errno.EINVAL),
    (-PAGE, PAGE, 0, errno.EINVAL),
    (2**64 - PAGE, 2 * PAGE, 0, errno.EINVAL),
    (PAGE, PAGE, 0, errno.EEXIST),        # inside the existing region
    (0, 8 * PAGE, 0, errno.EEXIST),       # covering it
    (3 * PAGE, PAGE, 0, errno.EEXIST),    # overlapping its last page
])
def test_bad_regions(mem, memfd, gpa, size, offset, code):
    mem.add_region(PAGE, 3 * PAGE, memfd, 0)
    with pytest.raises(ControlError) as e:
        mem.add_region(gpa, size, memfd, offset)
    assert e.value.code == code
    assert mem.regions == [(PAGE, 3 * PAGE)]


def test_remove_region_busy_while_a_view_is_held(mem, memfd):
    mem.add_region(0, 2 * PAGE, memfd, 0)
    v = mem.page(1)
    with pytest.raises(ControlError) as e:
        mem.remove_region(0, 2 * PAGE)
    assert e.value.code == errno.EBUSY
    v[0] = 7  # still mapped and usable
    v.release()
    mem.remove_region(0, 2 * PAGE)
    assert mem.regions == []
    with pytest.raises(GuestMemoryError):
        mem.page(0)
    with pytest.raises(ControlError) as e:
        mem.remove_region(0, 2 * PAGE)
    assert e.value.code == errno.ENOENT


def test_mapping_outlives_the_fd(mem):
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE)
    mem.add_region(0, PAGE, fd)
    os.close(fd)
    mem.write(10, b"abc")
    assert mem.read(10, 3) == b"abc"


def test_guest_ram_with_hole_is_shared_with_the_daemon():
    ram = GuestRAM(4 * PAGE, layout=[(0, 2 * PAGE), (8 * PAGE, 2 * PAGE)])
    mem = GuestMemory()
    try:
        for gpa, size, fd, offset in ram.regions:
            mem.add_region(gpa, size, fd, offset)
        gfns = [ram.alloc_page() for _ in range(4)]
        assert gfns == [0, 1, 8, 9]
        with pytest.raises(MemoryError):
            ram.alloc_page()
        ram.page(8)[:5] = b"guest"
        assert mem.read(8 * PAGE, 5) == b"guest"
        mem.write(9 * PAGE, b"back")
        assert ram.read(9 * PAGE, 4) == b"back"
        with pytest.raises(GuestMemoryError):
            ram.page(2)
        ram.free_page(8)
        assert ram.alloc_page() == 8
        assert ram.page(8)[:5] == bytes(5)  # allocation hands out a zeroed page
    finally:
        mem.close()
        ram.close()


def test_host_view_stays_inside_one_region(mem, memfd):
    """What compiled code names by host address comes back as a view of that region
    only: a range that runs past its end is refused even if the next mapping happens to
    follow it in the daemon's address space (an NBD request's pages fall back to a
    bounce buffer then)."""
    mem.add_region(0, 2 * PAGE, memfd, 0)
    mem.add_region(2 * PAGE, 2 * PAGE, memfd, 2 * PAGE)
    native = mem.native()
    base = native.host_address(PAGE, PAGE)
    os.pwrite(memfd, b"host", PAGE + 8)
    view = native.host_view(base + 8, 4)
    assert bytes(view) == b"host"
    view[:] = b"back"
    assert os.pread(memfd, 4, PAGE + 8) == b"back"
    with pytest.raises(GuestMemoryError):
        native.host_view(base, 2 * PAGE)
    view.release()
