"""Guest errors on a blk device reach the log at warning, rate-limited per device: a
guest's bad requests are visible at the default level, and a flood of them is not."""

from __future__ import annotations

import random

from test_blk_integration import connect_front

from backendd.guest.blkfront import BlkFront, BlkIOError
from backendd.guest.machine import SimGuest
from backendd.guest.vmm import VmmClient
from rings.consts import BlkifStatus

DEVID = 51712


async def test_bad_requests_are_logged_at_warning_within_the_burst(daemon, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(1 << 20))
    client = await VmmClient.connect(daemon.path)
    guest = SimGuest(ram_size=16 << 20, gnttab_frames=4)
    try:
        await guest.attach(client)
        _, keys = await client.add_device(DEVID, "blk", {"path": str(image)})
        front = BlkFront(guest.ram, guest.gnttab, DEVID, backend_keys=keys)
        await connect_front(client, front)
        sectors = (1 << 20) // 512
        for _ in range(19):  # each one past the end of the disk
            try:
                await front.read(sectors, 4096)
            except BlkIOError as e:
                assert e.status == BlkifStatus.ERROR
            else:
                raise AssertionError("a read past the end succeeded")
        # The ring carries on after them.
        await front.write(0, b"x" * 4096)
        front.close()
    finally:
        await client.close()
        guest.close()
    lines = [line for line in daemon.log_lines() if "event=guest_error" in line]
    # guest_log_burst (10) lines a minute for this device, at warning, naming it.
    assert len(lines) == 10, daemon.log_lines()
    assert all(line.startswith("<4>level=warning") and f"devid={DEVID}" in line
               and "kind=bad_request" in line for line in lines)
    assert "beyond the disk" in lines[0], lines[0]
