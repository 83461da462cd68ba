"""A whole simulated guest as a VMM sees it: RAM and grant table, handed to the daemon."""

from __future__ import annotations

from .gnttab import GuestGrantTable
from .memory import GuestRAM
from .vmm import VmmClient


class SimGuest:
    def __init__(self, ram_size: int = 64 << 20, gnttab_frames: int = 32,
                 layout: list[tuple[int, int]] | None = None, gnttab_version: int = 1) -> None:
        self.ram = GuestRAM(ram_size, layout)
        try:
            self.gnttab = GuestGrantTable(gnttab_frames, gnttab_version)
        except BaseException:
            self.ram.close()
            raise

    async def attach(self, client: VmmClient) -> None:
        """Give the daemon this guest's memory regions and grant table."""
        for gpa, size, fd, offset in self.ram.regions:
            await client.add_mem_region(gpa, size, fd, offset)
        await client.set_grant_table(self.gnttab.fd, self.gnttab.nr_frames,
                                     version=self.gnttab.version)

    def close(self) -> None:
        self.gnttab.close()
        self.ram.close()
