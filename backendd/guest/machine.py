"""A whole simulated guest as a VMM sees it: RAM and grant table, handed to the daemon,
and its disks, which it can hand to a restarted daemon again."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from backendd.inflight import region_size
from rings.consts import PAGE_SIZE, XenbusState

from .blkfront import BlkFront
from .gnttab import GuestGrantTable
from .memory import GuestRAM, sealed_memfd
from .vmm import VmmClient


@dataclass
class Disk:
    """What the VMM must remember of a disk to hand it to a restarted daemon."""

    devid: int
    config: dict[str, str]
    front: BlkFront
    inflight_fd: int = -1  # -1: no SET_INFLIGHT
    inflight_size: int = 0


class SimGuest:
    def __init__(self, ram_size: int = 64 << 20, gnttab_frames: int = 32,
                 layout: list[tuple[int, int]] | None = None, gnttab_version: int = 1) -> None:
        self.ram = GuestRAM(ram_size, layout)
        try:
            self.gnttab = GuestGrantTable(gnttab_frames, gnttab_version)
        except BaseException:
            self.ram.close()
            raise
        self.disks: dict[int, Disk] = {}

    async def attach(self, client: VmmClient) -> None:
        """Give the daemon this guest's memory regions and grant table."""
        for gpa, size, fd, offset in self.ram.regions:
            await client.add_mem_region(gpa, size, fd, offset)
        await client.set_grant_table(self.gnttab.fd, self.gnttab.nr_frames,
                                     version=self.gnttab.version)

    async def add_disk(self, client: VmmClient, devid: int, config: dict[str, str], *,
                       inflight: bool = True, **front_args: Any) -> BlkFront:
        """ADD_DEVICE, SET_INFLIGHT (with a memfd this guest keeps, unless `inflight` is
        False), then a BlkFront connected with fresh event channels and started. The disk
        is remembered for reconnect(). With an in-flight table the frontend's requests
        survive the loss of the daemon; without one they fail with ConnectionLost."""
        _, keys = await client.add_device(devid, "blk", config)
        disk_fd, size = -1, 0
        try:
            if inflight:
                size = -(-region_size(front_args.get("queues", 1)) // PAGE_SIZE) * PAGE_SIZE
                disk_fd = sealed_memfd(f"inflight-{devid}", size)
                await client.set_inflight(devid, disk_fd, size)
            front = BlkFront(self.ram, self.gnttab, devid, backend_keys=keys, **front_args)
        except BaseException:
            if disk_fd >= 0:
                os.close(disk_fd)
            raise
        disk = Disk(devid, dict(config), front, disk_fd, size)
        try:
            await self._connect_disk(client, disk, front.channels())
        except BaseException:
            front.close()
            if disk_fd >= 0:
                os.close(disk_fd)
            raise
        front.start()
        self.disks[devid] = disk
        return front

    async def _connect_disk(self, client: VmmClient, disk: Disk,
                            channels: list[tuple[int, int, int]]) -> None:
        front = disk.front
        _, keys = await client.hand_over_channels(disk.devid, XenbusState.CONNECTED,
                                                  front.frontend_keys(), channels)
        front.update_backend_keys(keys)
        front.watch(client, keep_pending=disk.inflight_fd >= 0)

    async def reconnect(self, path: str, name: str | None = None) -> VmmClient:
        """After a daemon restart: a new connection that replays this guest's setup
        (HELLO, memory, grant table, then per disk ADD_DEVICE, SET_INFLIGHT with the same
        memfd, and FRONTEND_STATE Connected with fresh event channels). The rings, grants
        and requests in flight are kept; the daemon completes those it had taken. `name`:
        HELLO's guest name, the same as before the restart."""
        client = await VmmClient.connect(path, name=name)
        try:
            await self.attach(client)
            for disk in self.disks.values():
                await client.add_device(disk.devid, "blk", disk.config)
                if disk.inflight_fd >= 0:
                    await client.set_inflight(disk.devid, disk.inflight_fd,
                                              disk.inflight_size)
                disk.front.resume()
                await self._connect_disk(client, disk, disk.front.new_channels())
        except BaseException:
            await client.close()
            raise
        return client

    def close(self) -> None:
        for disk in self.disks.values():
            disk.front.close()
            if disk.inflight_fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(disk.inflight_fd)
        self.disks.clear()
        self.gnttab.close()
        self.ram.close()
