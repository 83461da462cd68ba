"""Grant table v2: 16-byte entries, sub-page grants, and the in-use bits in separate
status frames, against the simulated guest's real shared v2 table."""

import errno

import pytest
from grantrig import backend_grant_table, guest_ram_and_table

import backendd.grants as grants_module
from backendd.errors import ControlError
from backendd.grants import GrantError, GrantTable
from backendd.guest import GuestGrantTable, GuestRAM
from backendd.memory import GuestMemory
from rings import atomic
from rings.consts import GTF_READING, GTF_READONLY, GTF_SUB_PAGE, GTF_WRITING, GrantType

PAGE = 4096


@pytest.fixture
def guest():
    with guest_ram_and_table(16, version=2) as pair:
        yield pair


@pytest.fixture
def table(guest):
    with backend_grant_table(*guest) as t:
        yield t


def test_v2_geometry(table):
    assert table.entries == PAGE // 16
    assert GrantTable.status_frames(1) == 1 and GrantTable.status_frames(9) == 2


def test_in_use_bits_go_to_the_status_word_not_the_entry(guest, table):
    ram, gt = guest
    gfn = ram.alloc_page()
    ram.write(gfn * PAGE + 10, b"v2 data")
    gref = gt.grant_access(gfn)
    m = table.map(gref, writable=True)
    assert bytes(m.page_view(10, 7)) == b"v2 data"
    assert gt.status(gref) == GTF_READING | GTF_WRITING
    assert gt.entry(gref)[0] == GrantType.PERMIT_ACCESS
    # A revoke while the daemon uses the page is refused.
    assert not gt.end_access(gref)
    m.release()
    assert gt.status(gref) == 0


def test_revoke_after_release_succeeds(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    with table.map(gref, writable=False):
        assert gt.status(gref) == GTF_READING
    assert gt.end_access(gref)
    with pytest.raises(GrantError, match="not permit_access"):
        table.map(gref, writable=False)


def test_sub_page_window_is_enforced(guest, table):
    ram, gt = guest
    gfn = ram.alloc_page()
    gref = gt.grant_access(gfn, sub_page=(512, 1024))
    with table.map(gref, writable=True) as m:
        assert m.window == (512, 1536)
        m.page_view(512, 1024)[:4] = b"abcd"
        for start, length in ((0, 4), (511, 2), (1535, 2), (1536, 1)):
            with pytest.raises(GrantError, match="outside the granted sub-page"):
                m.page_view(start, length)
    assert ram.read(gfn * PAGE + 512, 4) == b"abcd"


def test_sub_page_crossing_the_page_is_refused_and_leaves_no_status(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    gt.set_entry(gref, GrantType.PERMIT_ACCESS | GTF_SUB_PAGE, 0, ram.alloc_page(),
                 sub_page=(4000, 200))
    with pytest.raises(GrantError, match="crosses the page"):
        table.map(gref, writable=False)
    assert gt.status(gref) == 0


@pytest.mark.parametrize(("page_off", "length", "fits"), [
    (3584, 512, True), (0, 4096, True), (4095, 1, True),
    (3585, 512, False), (1, 4096, False), (4096, 1, False),
])
def test_sub_page_exact_fit_at_the_page_end(guest, table, page_off, length, fits):
    """The sub-page window may end exactly at the page end, not one byte beyond."""
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page(), sub_page=(page_off, length))
    if not fits:
        with pytest.raises(GrantError, match="crosses the page"):
            table.map(gref, writable=False)
        assert gt.status(gref) == 0
        return
    with table.map(gref, writable=True) as m:
        assert m.window == (page_off, page_off + length)
        m.page_view(page_off, length)[-1:] = b"z"
    assert ram.read(gt.entry(gref)[2] * PAGE + page_off + length - 1, 1) == b"z"


@pytest.mark.parametrize("flags,domid,writable,message", [
    (GrantType.TRANSITIVE, 0, False, "transitive"),
    (GrantType.ACCEPT_TRANSFER, 0, False, "not permit_access"),
    (GrantType.PERMIT_ACCESS | GTF_READONLY, 0, True, "readonly"),
    (GrantType.PERMIT_ACCESS, 5, False, "domain 5"),
])
def test_v2_rules(guest, table, flags, domid, writable, message):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    gt.set_entry(gref, flags, domid, ram.alloc_page())
    with pytest.raises(GrantError, match=message):
        table.map(gref, writable=writable)
    assert gt.status(gref) == 0


def test_frame_outside_memory(guest, table):
    _, gt = guest
    gref = gt.grant_access(1 << 40)
    with pytest.raises(GrantError, match="not guest memory"):
        table.map(gref, writable=False)
    assert gt.status(gref) == 0


def test_entry_changing_under_the_pin_is_unstable(guest, table, monkeypatch):
    """The guest rewrites the entry between our status update and our re-check, every
    time: the map gives up with "unstable" and withdraws its status bits."""
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    toggle = [0]

    def guest_writes_then_barrier() -> None:
        toggle[0] ^= 1
        gt.set_entry(gref, GrantType.PERMIT_ACCESS | (GTF_READONLY * toggle[0]), 0,
                     gt.entry(gref)[2])
        atomic.full_barrier()

    monkeypatch.setattr(grants_module, "full_barrier", guest_writes_then_barrier)
    with pytest.raises(GrantError, match="unstable"):
        table.map(gref, writable=False)
    assert gt.status(gref) == 0


def test_version_change_while_in_use_is_refused(guest, table):
    ram, gt = guest
    gref = gt.grant_access(ram.alloc_page())
    m = table.map(gref, writable=False)
    v1 = GuestGrantTable(nr_frames=1)
    with pytest.raises(ControlError) as e:
        table.set_table(v1.fd, 0, 1, version=1)
    assert e.value.code == errno.EBUSY
    m.release()
    table.set_table(v1.fd, 0, 1, version=1)
    assert table.entries == PAGE // 8
    v1.close()


def test_v1_entry_changing_under_the_cas_is_unstable(monkeypatch):
    ram = GuestRAM(4 * PAGE)
    gt = GuestGrantTable(nr_frames=1)
    mem = GuestMemory()
    for gpa, size, fd, offset in ram.regions:
        mem.add_region(gpa, size, fd, offset)
    table = GrantTable(mem)
    table.set_table(gt.fd, 0, 1)
    gref = gt.grant_access(ram.alloc_page())
    real_cas = atomic.cmpxchg32

    def guest_writes_then_cas(addr: int, expected: int, desired: int):
        # The guest flips GTF_READONLY just before each of our compare-and-swaps.
        flags, domid, frame = gt.entry(gref)
        gt.set_entry(gref, flags ^ GTF_READONLY, domid, frame)
        return real_cas(addr, expected, desired)

    monkeypatch.setattr(grants_module, "cmpxchg32", guest_writes_then_cas)
    with pytest.raises(GrantError, match="unstable"):
        table.map(gref, writable=False)
    assert not gt.entry(gref)[0] & (GTF_READING | GTF_WRITING)
    table.close()
    mem.close()
    gt.close()
    ram.close()
