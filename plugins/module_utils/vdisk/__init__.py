"""vdisk: a pure-Python engine for virtual machine disk images (stdlib only)."""

__version__ = "0.1.0"
