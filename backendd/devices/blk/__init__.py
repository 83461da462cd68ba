"""The block backend: blkif rings served from an image file or block device.

Importing the package registers the "blk" device type."""

from . import device

__all__ = ["device"]
