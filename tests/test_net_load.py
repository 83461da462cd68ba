"""The C netfront (bench/native/netfront_load.c) against the real daemon: ping and TCP
transfers checked with sha256, both ways, between a "host" namespace (the daemon's tap)
and a "guest" namespace (the tap the C program bridges to the netif rings), with real v1
grants per use, split event channels, GSO in both directions and two queues. Also built
with -fsanitize=address,undefined and run the same way, so the benchmark's frontend cannot
rot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_net_harness import addr, namespaces, run, tcp_transfer, uniq

from backendd.dataplane import netkernel
from backendd.dataplane.net import net_round
from bench.native import build
from bench.netload import NetLoadFailed, netfront

# Taps, bridges and namespaces need root: without it these tests fail, never skip.
pytestmark = pytest.mark.usefixtures("root")

MiB = 1 << 20


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("netfront_load", sanitize=True, out_dir=tmp_path_factory.mktemp("asan"))


async def bridge_and_check(daemon, queues: int, split: bool, nbytes: int,
                           binary: Path | None = None, socket: bool = False) -> None:
    host, gns = uniq("nlh"), uniq("nlg")
    tap, gtap = uniq("nlt") + "h", uniq("nlt") + "g"
    with namespaces(host, gns):
        async with netfront(daemon.path, host_ns=host, guest_ns=gns, host_tap=tap,
                            guest_tap=gtap, queues=queues, split=split,
                            binary=binary, socket=socket) as bridge:
            await addr(host, tap, "10.79.0.1/24")
            await addr(gns, gtap, "10.79.0.2/24")
            await run("ping", "-c", "3", "-i", "0.2", "-W", "5", "10.79.0.1", ns=gns)
            await run("ping", "-c", "3", "-i", "0.2", "-W", "5", "10.79.0.2", ns=host)
            sent, received = await tcp_transfer(gns, host, "10.79.0.1", nbytes, seed=3)
            assert sent == received  # guest -> host, byte for byte
            sent, received = await tcp_transfer(host, gns, "10.79.0.2", nbytes, seed=4)
            assert sent == received  # host -> guest
            stats = await bridge.stats()  # with socket=True, through the program
            result = await bridge.finish()
    if socket:  # read by the program itself, with GET_STATS, before it closed the nic
        final = result.daemon_stats
        assert final["tx_packets"] >= stats["tx_packets"] > 0
        assert final["rx_packets"] >= stats["rx_packets"] > 0
        stats = final
    assert result["failure"] == "" and result["refused_end_access"] == 0
    assert result["tx_too_big"] == 0 and result["rx_tap_drops"] == 0
    assert result.held_after_close == []  # the closed device holds none of our grants
    # GSO super-frames went through the rings both ways (tx extra-info slots, rx extras).
    assert result["tx_gso"] > 0 and result["rx_gso"] > 0
    assert result["tx_bytes"] > nbytes and result["rx_bytes"] > nbytes
    # What the netfront put on the rings is what the daemon counted.
    assert stats["tx_packets"] == result["tx_frames"]
    assert stats["tx_gso"] == result["tx_gso"]
    assert stats["rx_packets"] == result["rx_frames"]
    assert stats["tx_errors"] == 0 and stats["rx_dropped"] == 0
    if queues > 1:
        assert stats["queues"] == queues


async def test_two_queues_split_channels(daemon):
    await bridge_and_check(daemon, queues=2, split=True, nbytes=8 * MiB)


async def test_one_queue_shared_channel(daemon):
    await bridge_and_check(daemon, queues=1, split=False, nbytes=2 * MiB)


async def test_sanitizer_build(daemon, sanitized):
    """The same with -fsanitize=address,undefined: any report aborts the program."""
    await bridge_and_check(daemon, queues=2, split=True, nbytes=2 * MiB, binary=sanitized)


async def test_socket_mode_does_its_own_control_plane(daemon):
    """--socket: the program connects through the C client library (clients/c), hands
    over its memfds and eventfds, adds and connects the nic, bridges, reads the daemon's
    counters, closes the nic (which must then hold none of its grants) and removes it."""
    await bridge_and_check(daemon, queues=2, split=True, nbytes=4 * MiB, socket=True)
    await bridge_and_check(daemon, queues=1, split=False, nbytes=MiB, socket=True)


async def test_socket_mode_sanitizer_build(daemon, sanitized):
    await bridge_and_check(daemon, queues=2, split=True, nbytes=2 * MiB, binary=sanitized,
                           socket=True)


async def test_socket_mode_reports_a_refused_nic(daemon):
    host, gns = uniq("nlh"), uniq("nlg")
    with namespaces(host, gns), pytest.raises(NetLoadFailed, match="ADD_DEVICE"):
        async with netfront(daemon.path, host_ns=host, guest_ns=gns,
                            host_tap=uniq("nlt") + "h", guest_tap=uniq("nlt") + "g",
                            socket=True, config={"no-such-key": "1"}):
            pass


async def test_two_queues_served_by_one_call_on_two_threads(daemon):
    """The wake-ups due in one loop turn go to one kernel call that serves them on helper
    threads with the GIL released: with flows both ways over two queues, calls serve
    both queues at once on two threads, and every byte still arrives as sent."""
    kernel = netkernel.load()
    assert kernel is not None, "the net kernel is not built (make netkernel)"
    served = net_round(kernel, asyncio.get_running_loop())  # the round the nic uses
    apart, helped = served.apart, served.helped
    host, gns = uniq("nph"), uniq("npg")
    tap, gtap = uniq("npt") + "h", uniq("npt") + "g"
    with namespaces(host, gns):
        async with netfront(daemon.path, host_ns=host, guest_ns=gns, host_tap=tap,
                            guest_tap=gtap, queues=2, split=True) as bridge:
            await addr(host, tap, "10.78.0.1/24")
            await addr(gns, gtap, "10.78.0.2/24")
            await run("ping", "-c", "2", "-i", "0.2", "-W", "5", "10.78.0.1", ns=gns)
            flows = [tcp_transfer(gns, host, "10.78.0.1", 4 * MiB, port=5211 + k, seed=k)
                     for k in range(3)]
            flows += [tcp_transfer(host, gns, "10.78.0.2", 4 * MiB, port=5221 + k,
                                   seed=10 + k) for k in range(3)]
            for sent, received in await asyncio.gather(*flows):
                assert sent == received
            result = await bridge.finish()
    assert result["failure"] == "" and result["refused_end_access"] == 0
    assert result.held_after_close == []
    assert served.helped > helped
    assert served.apart > apart


async def test_one_queue_is_served_on_one_thread(daemon):
    """The tx and rx wake-ups of one queue go to one thread in order (nk_serve_groups):
    with flows both ways over one queue, whose tx and rx are due in the same loop turns,
    no wake-up is handed to a helper thread, and every byte still arrives as sent."""
    kernel = netkernel.load()
    assert kernel is not None, "the net kernel is not built (make netkernel)"
    served = net_round(kernel, asyncio.get_running_loop())  # the round the nic uses
    shared, helped = served.shared, served.helped
    host, gns = uniq("n1h"), uniq("n1g")
    tap, gtap = uniq("n1t") + "h", uniq("n1t") + "g"
    with namespaces(host, gns):
        async with netfront(daemon.path, host_ns=host, guest_ns=gns, host_tap=tap,
                            guest_tap=gtap, queues=1, split=True) as bridge:
            await addr(host, tap, "10.78.0.1/24")
            await addr(gns, gtap, "10.78.0.2/24")
            await run("ping", "-c", "2", "-i", "0.2", "-W", "5", "10.78.0.1", ns=gns)
            flows = [tcp_transfer(gns, host, "10.78.0.1", 4 * MiB, port=5231, seed=1),
                     tcp_transfer(host, gns, "10.78.0.2", 4 * MiB, port=5232, seed=2)]
            for sent, received in await asyncio.gather(*flows):
                assert sent == received
            result = await bridge.finish()
    assert result["failure"] == "" and result.held_after_close == []
    assert served.shared > shared  # tx and rx were due in the same kernel calls
    assert served.helped == helped


async def test_a_program_that_does_not_start_is_reported(daemon):
    host, gns = uniq("nlh"), uniq("nlg")
    with namespaces(host, gns), pytest.raises(NetLoadFailed, match="did not start"):
        async with netfront(daemon.path, host_ns=host, guest_ns=gns, host_tap=uniq("nlt") + "h",
                            guest_tap=uniq("nlt") + "g", binary=Path("/bin/false")):
            pass
