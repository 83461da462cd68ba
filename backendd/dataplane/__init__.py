"""The compiled data plane: C kernels that serve a whole ring batch per call.

Python keeps the control plane (sessions, xenbus, configuration, stats, logs, the I/O
pool). `blk_kernel.c` does the per-request work of a blkif ring: `build` compiles it,
`kernel` loads it with ctypes, `blk` is the ring queue that drives it. `net_kernel.c`
does netif tx and rx (with `core.h`'s guest-memory and grant primitives): `netkernel`
builds and loads it, `net` drives it.
"""
