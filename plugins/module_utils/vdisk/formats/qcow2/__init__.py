"""qcow2: QEMU's copy-on-write format (docs/interop/qcow2.txt)."""
from .driver import DRIVER  # noqa: F401
