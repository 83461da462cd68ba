"""A simulated Xen HVM guest: RAM, grant table, event channels."""

from .evtchn import GuestPort, new_channel_pair
from .gnttab import GuestGrantTable
from .memory import GuestRAM

__all__ = ["GuestGrantTable", "GuestPort", "GuestRAM", "new_channel_pair"]
