"""The block backend: blkif rings served from an image file or block device."""
