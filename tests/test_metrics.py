"""The Prometheus exposition of a real daemon with a named guest, a disk and a nic, checked
by the real `promtool check metrics` (Debian package prometheus) and parsed with the
prometheus_client parser; guest names in HELLO."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_net_harness import namespaces, uniq

from backendd.guest import RequestFailed, SimGuest, VmmClient
from backendd.metrics import DEVICE_FAMILIES, render_status


def promtool(text: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool missing (Debian package prometheus)"
    return subprocess.run([tool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture
async def guest_with_disk_and_nic(daemon, tmp_path) -> AsyncIterator[VmmClient]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    host = uniq("mth")
    with namespaces(host):
        client = await VmmClient.connect(daemon.path, name="vm1")
        guest = SimGuest(ram_size=16 << 20, gnttab_frames=4)
        try:
            await guest.attach(client)
            await client.add_device(51712, "blk", {"path": str(image)})
            await client.add_device(0, "net", {"tap": uniq("mtv") + "i", "netns": host})
            yield client
        finally:
            await client.close()
            guest.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a tap in a namespace)")
async def test_exposition_passes_promtool_and_parses(daemon, guest_with_disk_and_nic) -> None:
    text = render_status(daemon.server.full_status())
    result = promtool(text)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", \
        result.stdout + result.stderr
    fams = families(text)
    # Every family has HELP, and counters end in _total (the parser strips it).
    assert all(f.documentation for f in fams.values())
    assert fams["backendd_device_queues"].type == "gauge"
    assert fams["backendd_blk_writes"].type == "counter"
    assert fams["backendd_blk_writes"].samples[0].name == "backendd_blk_writes_total"
    # Net error counters exist before they first count, labelled with the guest's name.
    tx_errors = fams["backendd_net_tx_errors"].samples
    assert [(s.labels, s.value) for s in tx_errors] == [
        ({"guest": "vm1", "devid": "0", "type": "net"}, 0.0)]
    for kind in ("blk", "net"):
        for counter, family in DEVICE_FAMILIES[kind].items():
            assert family.name.removesuffix("_total") in fams, counter
    # Every counter the devices report has its own family (none from the fallback).
    status = daemon.server.full_status()
    for key in status:
        parts = key.split(".")
        if len(parts) == 6 and parts[4] == "stat":
            kind = status[".".join(parts[:4]) + ".type"]
            assert parts[5] in DEVICE_FAMILIES[kind], f"{kind} counter {parts[5]}: no family"
    assert fams["backendd_blk_persistent_grants_cached"].type == "gauge"
    # Daemon-level families.
    assert fams["backendd_connections"].samples[0].value == 1
    assert fams["backendd_devices"].samples[0].value == 2
    assert fams["backendd_build_info"].samples[0].labels["version"]
    assert fams["backendd_uptime_seconds"].samples[0].value >= 0
    assert fams["backendd_io_threads"].type == "gauge"


async def test_no_devices_is_still_a_valid_exposition(daemon) -> None:
    client = await VmmClient.connect(daemon.path)
    try:
        text = render_status(daemon.server.status())
    finally:
        await client.close()
    result = promtool(text)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", \
        result.stdout + result.stderr
    fams = families(text)
    assert fams["backendd_devices"].samples[0].value == 0
    # An unnamed guest is labelled by its connection.
    assert fams["backendd_control_requests"].samples[0].labels == {"guest": "conn-1"}


async def test_guest_names_in_hello(daemon) -> None:
    first = await VmmClient.connect(daemon.path, name="vm-7.a")
    try:
        assert daemon.server.status()["conn.1.guest"] == "vm-7.a"
        # A name is held by one live connection at a time.
        with pytest.raises(RequestFailed) as exc:
            await VmmClient.connect(daemon.path, name="vm-7.a")
        assert exc.value.code == errno.EEXIST
        for bad in ("", "-x", "a b", "x" * 65, "é"):
            with pytest.raises(RequestFailed) as exc:
                await VmmClient.connect(daemon.path, name=bad)
            assert exc.value.code == errno.EINVAL, bad
    finally:
        gone = daemon.server.connections[1].done
        await first.close()
    # Once the first connection is gone, its name is free again.
    await gone
    again = await VmmClient.connect(daemon.path, name="vm-7.a")
    await again.close()


async def test_the_endpoint_reads_every_status_page(daemon, tmp_path, monkeypatch) -> None:
    """The metrics endpoint's text covers every device even when DAEMON_STATUS needs
    several pages for them."""
    import backendd.server as server_module
    from backendd.daemon import prometheus_text

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    clients = [await VmmClient.connect(daemon.path, name=f"g{i}") for i in range(3)]
    try:
        for client in clients:
            for devid in (51712, 51728):
                await client.add_device(devid, "blk", {"path": str(image), "mode": "r"})
        whole = prometheus_text(daemon.server)
        monkeypatch.setattr(server_module, "STATUS_PAGE_BYTES", 1200)
        assert "next.conn" in daemon.server.status()  # several pages now
        paged = prometheus_text(daemon.server)
        drop = ("backendd_uptime_seconds ",)
        assert [x for x in paged.splitlines() if not x.startswith(drop)] == \
            [x for x in whole.splitlines() if not x.startswith(drop)]
        assert families(paged)["backendd_devices"].samples[0].value == 6
    finally:
        for client in clients:
            await client.close()
