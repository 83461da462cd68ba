"""Malformed tx requests through the real device: dropped packets are answered ERROR for
every slot and the ring goes on; a fatal one halts that vif and notifies the VMM, while
another vif on the same guest keeps passing traffic."""

from __future__ import annotations

import pytest
from test_net_harness import addr, make_guest, namespaces, plug, run, uniq, until

from rings.consts import NetifRsp, NetTxFlags
from rings.netif import TX_REQUEST

# Taps, bridges and namespaces need root: without it these tests fail, never skip.
pytestmark = pytest.mark.usefixtures("root")

MORE = NetTxFlags.MORE_DATA
OK, ERR = NetifRsp.OKAY, NetifRsp.ERROR


def frame(n: int) -> bytes:
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(n - 14)


async def test_drop_vs_fatal_and_other_vif_unaffected():
    host, gns = uniq("nbh"), uniq("nbg")
    with namespaces(host, gns):
        guest = make_guest()
        try:
            bad_dev, bad = await plug(guest, 3, {"tap": uniq("bv") + "c", "netns": host,
                                                 "queues": "1"})
            good_dev, good = await plug(guest, 4, {"tap": uniq("bv") + "d", "netns": host})
            gtap = uniq("bg") + "d"
            await good.attach_tap(gtap, netns=gns)
            await addr(host, uniq("bv") + "d", "10.77.4.1/24")
            await addr(gns, gtap, "10.77.4.2/24")

            g0, g1 = bad.tx_page(0)[1], bad.tx_page(1)[1]
            gfn0 = bad.tx_page(0)[0]
            guest.ram.write(gfn0 * 4096, frame(60))

            def req(gref, size, flags=0, rid=0, offset=0):
                return TX_REQUEST.pack(gref, offset, flags, rid, size)

            # A slot larger than what remains of the packet: ERROR for all three slots.
            # Then a zero-size slot naming a gref that was never granted (answered
            # OKAY without being touched), then a packet whose grant is bad (ERROR),
            # then a good packet.
            bad.put_tx_raw([
                req(g0, 3000, MORE, rid=1), req(g1, 2000, MORE, rid=2), req(g1, 2000, rid=3),
                req(g0, 100, MORE, rid=4), req(7, 0, MORE, rid=5), req(g1, 40, rid=6),
                req(9999, 60, rid=7),
                req(g0, 60, rid=8),
            ])
            await until(lambda: len(bad.raw_tx_responses) == 8)
            assert bad.raw_tx_responses == [(1, ERR), (2, ERR), (3, ERR), (4, OK), (5, OK),
                                            (6, OK), (7, ERR), (8, OK)]
            stats = bad_dev.stats()
            assert stats["tx_packets"] == 2 and stats["tx_errors"] == 2
            assert not guest.notices.misbehaved

            # A data slot crossing its page: the frontend is shut down, nothing answered.
            bad.put_tx_raw([req(g0, 2000, MORE, rid=10), req(g1, 1000, rid=11, offset=3500)])
            await until(lambda: guest.notices.misbehaved)
            assert guest.notices.misbehaved[0][0] == 3
            assert "crosses" in guest.notices.misbehaved[0][1]
            bad.put_tx_raw([req(g0, 60, rid=12)])  # ignored from now on

            # The other vif still works both ways.
            await run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.4.1", ns=gns)
            assert len(bad.raw_tx_responses) == 8
            assert bad_dev.stats()["fatal"] == 1
            assert bad_dev.stats()["tx_packets"] == 2
            assert not good_dev.stats().get("fatal")
            # The halted vif's grants were all released: only ring pages stay mapped.
            assert guest.gnttab.entry(g0)[0] & 0x18 == 0
        finally:
            await guest.close()


async def test_impossible_request_count_is_fatal():
    host = uniq("nbh")
    with namespaces(host):
        guest = make_guest()
        try:
            dev, front = await plug(guest, 5, {"tap": uniq("bv") + "e", "netns": host,
                                               "queues": "1"})
            q = front.queues[0]
            q.tx_shared.idx[0] = 1000  # req_prod far beyond a 256-slot ring
            q.tx_port.send()
            await until(lambda: guest.notices.misbehaved)
            assert "impossible" in guest.notices.misbehaved[0][1]
            assert dev.stats()["tx_fatal"] == 1
            q.tx_shared.idx[0] = 0
        finally:
            await guest.close()
