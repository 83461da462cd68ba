"""A simulated Xen HVM guest: RAM, grant table, event channels, and a VMM's control
client to hand them to the daemon."""

from .evtchn import GuestPort, new_channel_pair
from .gnttab import GuestGrantTable
from .machine import SimGuest
from .memory import GuestRAM, sealed_memfd
from .vmm import ConnectionLost, RequestFailed, VmmClient

__all__ = [
    "ConnectionLost",
    "GuestGrantTable",
    "GuestPort",
    "GuestRAM",
    "RequestFailed",
    "SimGuest",
    "VmmClient",
    "new_channel_pair",
    "sealed_memfd",
]
