"""The daemon's grant checks against the simulated guest's real shared grant table."""

import errno

import pytest
from grantrig import backend_grant_table, guest_ram_and_table

from backendd.errors import ControlError, GuestError
from backendd.grants import GrantError, GrantTable
from backendd.guest import GuestGrantTable, GuestRAM
from backendd.memory import GuestMemory
from rings.consts import GTF_READING, GTF_READONLY, GTF_WRITING, GrantType

PAGE = 4096


@pytest.fixture
def guest():
    with guest_ram_and_table(16) as pair:
        yield pair


@pytest.fixture
def table(guest):
    with backend_grant_table(*guest) as t:
        yield t


def test_mapped_page_is_the_guest_page(guest, table):
    ram, gt = guest
    gfn = ram.alloc_page()
    ram.write(gfn * PAGE + 100, b"request")
    gref = gt.grant_access(gfn)
    with table.map(gref, writable=True) as m:
        assert bytes(m.page_view(100, 7)) == b"request"
        m.page_view(200, 8)[:] = b"response"
    assert ram.read(gfn * PAGE + 200, 8) == b"response"


def test_flags_visible_while_mapped_and_cleared_after(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    m = table.map(gref, writable=True)
    flags = gt.entry(gref)[0]
    assert flags & GTF_READING and flags & GTF_WRITING
    m.release()
    m.release()  # idempotent: must not clear a second time or raise
    assert gt.entry(gref)[0] == GrantType.PERMIT_ACCESS
    with table.map(gref, writable=False):
        flags = gt.entry(gref)[0]
        assert flags & GTF_READING and not flags & GTF_WRITING
    assert gt.entry(gref)[0] == GrantType.PERMIT_ACCESS


def test_end_access_refused_while_held(guest, table):
    ram, gt = guest
    gfn = ram.alloc_page()
    gref = gt.grant_access(gfn)
    m = table.map(gref, writable=False)
    assert gt.end_access(gref) is False
    assert gt.entry(gref) == (GrantType.PERMIT_ACCESS | GTF_READING, 0, gfn)
    m.release()
    assert gt.end_access(gref) is True
    assert gt.entry(gref)[0] == 0


def test_revoked_grant_cannot_be_mapped(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    assert gt.end_access(gref)
    with pytest.raises(GrantError, match=rf"gref {gref}: .*not permit_access"):
        table.map(gref, writable=False)


def test_nested_uses_are_counted(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    a = table.map(gref, writable=True)
    b = table.map(gref, writable=False)
    c = table.map(gref, writable=False)
    assert table.in_use(gref) == 3
    a.release()  # the last writer: writing clears, reading stays
    assert gt.entry(gref)[0] == GrantType.PERMIT_ACCESS | GTF_READING
    b.release()
    assert gt.entry(gref)[0] == GrantType.PERMIT_ACCESS | GTF_READING
    assert not gt.end_access(gref)
    c.release()
    assert table.in_use(gref) == 0
    assert gt.entry(gref)[0] == GrantType.PERMIT_ACCESS
    assert gt.end_access(gref)


def test_readonly_grant_mapped_writable(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page(), readonly=True)
    with pytest.raises(GrantError, match=rf"gref {gref}: readonly"):
        table.map(gref, writable=True)
    assert gt.entry(gref)[0] == GrantType.PERMIT_ACCESS | GTF_READONLY
    with table.map(gref, writable=False) as m, pytest.raises(TypeError):
        m.page_view(0, 1)[0] = 1  # a read-only use hands out a read-only view


def test_wrong_domid(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page(), domid=5)
    with pytest.raises(GrantError, match=rf"gref {gref}: granted to domain 5"):
        table.map(gref, writable=False)
    assert gt.entry(gref)[0] == GrantType.PERMIT_ACCESS


@pytest.mark.parametrize("gtype", [GrantType.INVALID, GrantType.ACCEPT_TRANSFER,
                                   GrantType.TRANSITIVE])
def test_not_permit_access(guest, table, gtype):
    ram, gt = guest
    gt.set_entry(10, gtype, 0, ram.alloc_page())
    with pytest.raises(GrantError, match=r"gref 10: .*not permit_access"):
        table.map(10, writable=False)


@pytest.mark.parametrize("frame", [16, 0xFFFFFFFF])
def test_frame_outside_memory(guest, table, frame):
    _, gt = guest
    gref = gt.grant_access(frame)
    with pytest.raises(GrantError, match=rf"gref {gref}: frame .* not guest memory"):
        table.map(gref, writable=True)
    # The failed map leaves no flags behind, so the guest can still revoke.
    assert gt.entry(gref)[0] == GrantType.PERMIT_ACCESS
    assert table.in_use(gref) == 0
    assert gt.end_access(gref)


@pytest.mark.parametrize("gref", [512, 10**9, -1])
def test_gref_beyond_table(table, gref):
    with pytest.raises(GrantError, match="beyond the grant table") as e:
        table.map(gref, writable=False)
    assert isinstance(e.value, GuestError)


def test_page_view_bounds_and_release(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    m = table.map(gref, writable=True)
    assert len(m.page_view(0, PAGE)) == PAGE
    for start, length in [(-1, 1), (0, PAGE + 1), (PAGE, 1), (4000, 100), (0, -1)]:
        with pytest.raises(GrantError, match=f"gref {gref}: range"):
            m.page_view(start, length)
    m.release()
    with pytest.raises(GrantError, match="released"):
        m.page_view(0, 1)


def test_grow_table_keeps_uses(guest, table):
    ram, _ = guest
    gt4 = GuestGrantTable(nr_frames=4)
    try:
        table.set_table(gt4.fd, 0, 1)
        gref = gt4.grant_access(ram.alloc_page())
        m = table.map(gref, writable=True)
        table.set_table(gt4.fd, 0, 4)  # grow while a gref is in use
        assert table.entries == 2048
        far = 1500
        gt4.set_entry(far, GrantType.PERMIT_ACCESS, 0, ram.alloc_page())
        with table.map(far, writable=False):
            assert gt4.entry(far)[0] & GTF_READING
        m.release()
        assert gt4.entry(gref)[0] == GrantType.PERMIT_ACCESS
        with pytest.raises(GrantError, match="beyond"):
            table.map(2048, writable=False)
    finally:
        table.close()
        gt4.close()


def test_versions_and_sane_geometry(guest, table):
    _, gt = guest
    for kwargs, code in [({"version": 3}, errno.EOPNOTSUPP), ({"nr_frames": 0}, errno.EINVAL),
                         ({"offset": 5}, errno.EINVAL), ({"nr_frames": 99}, errno.EINVAL)]:
        args = {"fd": gt.fd, "offset": 0, "nr_frames": 1} | kwargs
        with pytest.raises(ControlError) as e:
            table.set_table(**args)
        assert e.value.code == code


def test_memory_region_busy_while_a_grant_is_mapped(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    m = table.map(gref, writable=False)
    (gpa, size, _, _), = ram.regions
    with pytest.raises(ControlError) as e:
        table.memory.remove_region(gpa, size)
    assert e.value.code == errno.EBUSY
    m.release()
    table.memory.remove_region(gpa, size)


@pytest.mark.parametrize("version", [1, 2])
def test_writing_bit_stays_until_the_last_writer_releases(version):
    """Two writers and a reader of one gref, released writer, reader, writer: the in-use
    bits after each release are fixed (v1 flags word, v2 status word)."""
    ram = GuestRAM(4 * PAGE)
    gt = GuestGrantTable(nr_frames=1, version=version)
    mem = GuestMemory()
    for gpa, size, fd, offset in ram.regions:
        mem.add_region(gpa, size, fd, offset)
    table = GrantTable(mem)
    table.set_table(gt.fd, 0, 1, version=version)

    def in_use_bits(gref: int) -> int:
        word = gt.status(gref) if version == 2 else gt.entry(gref)[0]
        return word & (GTF_READING | GTF_WRITING)

    try:
        gref = gt.grant_access(ram.alloc_page())
        w1 = table.map(gref, writable=True)
        w2 = table.map(gref, writable=True)
        r = table.map(gref, writable=False)
        assert in_use_bits(gref) == GTF_READING | GTF_WRITING
        w1.release()  # a writer is still there
        assert in_use_bits(gref) == GTF_READING | GTF_WRITING
        r.release()
        assert in_use_bits(gref) == GTF_READING | GTF_WRITING
        assert not gt.end_access(gref)
        w2.release()  # the last use of any kind
        assert in_use_bits(gref) == 0
        assert table.in_use(gref) == 0
        assert gt.end_access(gref)
    finally:
        table.close()
        mem.close()
        gt.close()
        ram.close()
