"""The netif backend (netback in userspace): tap devices on the host side, the guest's
tx and rx rings on the other."""

from .device import NetDevice

__all__ = ["NetDevice"]
