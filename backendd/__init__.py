"""backendd: a userspace backend for Xen PV block and network devices of HVM guests on KVM."""

__version__ = "0.1.0"
