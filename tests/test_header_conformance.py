"""Our construct layouts, ring sizes and constants against what gcc makes of Xen's own
public headers (Debian libxen-dev), for the x86_64 (-m64) and x86_32 (-m32) ABIs."""

import subprocess
from pathlib import Path

import pytest
from native_build import compile_c, field_offsets

from backendd.devices.net import hash as nethash
from rings import BLKIF, blkif_segment, consts, grant, netif, sring
from rings.consts import BlkifAbi


@pytest.fixture(scope="module", params=[64, 32], ids=["x86_64", "x86_32"])
def dump(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[BlkifAbi, dict[str, int]]:
    binary = compile_c("layout_dump.c", tmp_path_factory.mktemp("c"), request.param)
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    values = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
    return (BlkifAbi.X86_64 if request.param == 64 else BlkifAbi.X86_32), values


def _check(values: dict[str, int], c_name: str, layout, fields: dict[str, str]) -> None:
    ours = field_offsets(layout)
    assert values[f"{c_name}.sizeof"] == layout.sizeof(), c_name
    for c_field, our_field in fields.items():
        assert values[f"{c_name}.{c_field}"] == ours[our_field], f"{c_name}.{c_field}"


def test_blkif_layouts(dump: tuple[BlkifAbi, dict[str, int]]) -> None:
    abi, values = dump
    blk = BLKIF[abi]
    _check(values, "blkif_request_segment", blkif_segment,
           {f: f for f in ("gref", "first_sect", "last_sect")})
    _check(values, "blkif_request", blk.request,
           {**{f: f for f in ("operation", "nr_segments", "handle", "id", "sector_number")},
            "seg": "seg[0].gref"})
    _check(values, "blkif_request_discard", blk.discard,
           {f: f for f in ("operation", "flag", "handle", "id", "sector_number", "nr_sectors")})
    _check(values, "blkif_request_indirect", blk.indirect,
           {**{f: f for f in ("operation", "indirect_op", "nr_segments", "id",
                              "sector_number", "handle")},
            "indirect_grefs": "indirect_grefs[0]"})
    _check(values, "blkif_response", blk.response,
           {f: f for f in ("id", "operation", "status")})
    assert values["entry.blkif"] == blk.entry_size


def test_shared_ring_header(dump: tuple[BlkifAbi, dict[str, int]]) -> None:
    _abi, values = dump
    ours = field_offsets(sring.sring_header)
    for field in ("req_prod", "req_event", "rsp_prod", "rsp_event", "pvt"):
        assert values[f"blkif_sring.{field}"] == ours[field]
    assert values["blkif_sring.ring"] == sring.SRING_HEADER_SIZE


def test_netif_layouts(dump: tuple[BlkifAbi, dict[str, int]]) -> None:
    _abi, values = dump
    _check(values, "netif_tx_request", netif.netif_tx_request,
           {f: f for f in ("gref", "offset", "flags", "id", "size")})
    _check(values, "netif_tx_response", netif.netif_tx_response, {"id": "id", "status": "status"})
    _check(values, "netif_extra_info", netif.netif_extra_gso,
           {"type": "type", "flags": "flags", "u.gso.size": "size", "u.gso.type": "gso_type",
            "u.gso.pad": "pad", "u.gso.features": "features"})
    _check(values, "netif_extra_info", netif.netif_extra_mcast, {"u.mcast.addr": "addr"})
    _check(values, "netif_extra_info", netif.netif_extra_hash,
           {"u.hash.type": "hash_type", "u.hash.algorithm": "alg", "u.hash.value": "value"})
    _check(values, "netif_extra_info", netif.netif_extra_info, {"type": "type", "flags": "flags"})
    _check(values, "netif_rx_request", netif.netif_rx_request, {"id": "id", "gref": "gref"})
    _check(values, "netif_rx_response", netif.netif_rx_response,
           {f: f for f in ("id", "offset", "flags", "status")})
    _check(values, "xen_netif_ctrl_request", netif.netif_ctrl_request,
           {"id": "id", "type": "type", "data": "data[0]"})
    _check(values, "xen_netif_ctrl_response", netif.netif_ctrl_response,
           {f: f for f in ("id", "type", "status", "data")})
    assert values["entry.netif_tx"] == netif.TX_ENTRY_SIZE
    assert values["entry.netif_rx"] == netif.RX_ENTRY_SIZE
    assert values["entry.netif_ctrl"] == netif.CTRL_ENTRY_SIZE


def test_grant_layouts(dump: tuple[BlkifAbi, dict[str, int]]) -> None:
    _abi, values = dump
    _check(values, "grant_entry_v1", grant.grant_entry_v1,
           {f: f for f in ("flags", "domid", "frame")})
    assert values["grant_entry_v2.sizeof"] == grant.GRANT_ENTRY_V2_SIZE
    full = field_offsets(grant.grant_entry_v2_full_page)
    sub = field_offsets(grant.grant_entry_v2_sub_page)
    trans = field_offsets(grant.grant_entry_v2_transitive)
    for layout in (grant.grant_entry_v2_full_page, grant.grant_entry_v2_sub_page,
                   grant.grant_entry_v2_transitive):
        assert layout.sizeof() == grant.GRANT_ENTRY_V2_SIZE
    assert values["grant_entry_v2.hdr.flags"] == full["flags"] == grant.GRANT_FLAGS_OFFSET
    assert values["grant_entry_v2.hdr.domid"] == full["domid"] == grant.GRANT_DOMID_OFFSET
    assert values["grant_entry_v2.full_page.frame"] == full["frame"]
    assert values["grant_entry_v2.sub_page.page_off"] == sub["page_off"]
    assert values["grant_entry_v2.sub_page.length"] == sub["length"]
    assert values["grant_entry_v2.sub_page.frame"] == sub["frame"]
    assert values["grant_entry_v2.transitive.trans_domid"] == trans["trans_domid"]
    assert values["grant_entry_v2.transitive.gref"] == trans["gref"]
    assert values["grant_status.sizeof"] == grant.GRANT_STATUS_SIZE


def test_ring_sizes_for_1_to_16_pages(dump: tuple[BlkifAbi, dict[str, int]]) -> None:
    abi, values = dump
    entries = {"blkif": BLKIF[abi].entry_size, "netif_tx": netif.TX_ENTRY_SIZE,
               "netif_rx": netif.RX_ENTRY_SIZE, "netif_ctrl": netif.CTRL_ENTRY_SIZE}
    for pages in range(1, 17):
        for name, entry in entries.items():
            assert values[f"ring.{name}.{pages}"] == \
                sring.ring_entries_for_pages(pages, entry), (name, pages)


def test_constants(dump: tuple[BlkifAbi, dict[str, int]]) -> None:
    _abi, values = dump
    expected = {
        **{f"BLKIF_OP_{op.name}": op.value for op in consts.BlkifOp},
        **{f"BLKIF_RSP_{s.name}": s.value for s in consts.BlkifStatus},
        **{f"VDISK_{f.name}": f.value for f in consts.VDiskInfo},
        "BLKIF_MAX_SEGMENTS_PER_REQUEST": consts.BLKIF_MAX_SEGMENTS_PER_REQUEST,
        "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST": consts.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
        "BLKIF_DISCARD_SECURE": consts.BLKIF_DISCARD_SECURE,
        **{f"NETTXF_{f.name.lower()}": f.value for f in consts.NetTxFlags},
        **{f"NETRXF_{f.name.lower()}": f.value for f in consts.NetRxFlags},
        **{f"XEN_NETIF_EXTRA_TYPE_{t.name}": t.value for t in consts.NetExtraType},
        "XEN_NETIF_EXTRA_TYPE_MAX": consts.NETIF_EXTRA_TYPE_MAX,
        "XEN_NETIF_EXTRA_FLAG_MORE": consts.NETIF_EXTRA_FLAG_MORE,
        **{f"XEN_NETIF_GSO_TYPE_{t.name}": t.value for t in consts.NetGsoType},
        **{f"NETIF_RSP_{r.name}": r.value for r in consts.NetifRsp},
        "XEN_NETIF_NR_SLOTS_MIN": consts.XEN_NETIF_NR_SLOTS_MIN,
        **{f"XEN_NETIF_CTRL_TYPE_{t.name}": t.value for t in consts.NetCtrlType},
        **{f"XEN_NETIF_CTRL_STATUS_{t.name}": t.value for t in consts.NetCtrlStatus},
        "XEN_NETIF_CTRL_HASH_TYPE_IPV4": nethash.FLAG_IPV4,
        "XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP": nethash.FLAG_IPV4_TCP,
        "XEN_NETIF_CTRL_HASH_TYPE_IPV6": nethash.FLAG_IPV6,
        "XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP": nethash.FLAG_IPV6_TCP,
        "_XEN_NETIF_CTRL_HASH_TYPE_IPV4": nethash.TYPE_IPV4,
        "_XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP": nethash.TYPE_IPV4_TCP,
        "_XEN_NETIF_CTRL_HASH_TYPE_IPV6": nethash.TYPE_IPV6,
        "_XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP": nethash.TYPE_IPV6_TCP,
        "XEN_NETIF_CTRL_HASH_ALGORITHM_NONE": nethash.ALG_NONE,
        "XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ": nethash.ALG_TOEPLITZ,
        **{f"GTF_{t.name.lower()}": t.value for t in consts.GrantType},
        "GTF_type_mask": consts.GTF_TYPE_MASK, "GTF_readonly": consts.GTF_READONLY,
        "GTF_reading": consts.GTF_READING, "GTF_writing": consts.GTF_WRITING,
        "GTF_PWT": consts.GTF_PWT, "GTF_PCD": consts.GTF_PCD, "GTF_PAT": consts.GTF_PAT,
        "GTF_sub_page": consts.GTF_SUB_PAGE,
        **{f"XenbusState{s.name.title().replace('_', '')}": s.value
           for s in consts.XenbusState},
    }
    assert {name: values[name] for name in expected} == expected


def test_native_sources_exist() -> None:
    assert (Path(__file__).parent / "native" / "layout_dump.c").exists()
