"""Inflating deflate streams (compressed qcow/qcow2 clusters, VMDK grains, DMG and cloop chunks).

The ``zlib-ng`` package (a dependency of the pip package) inflates about 1.6x as fast as the
standard library's zlib; it is imported on first use and, where it is missing (an Ansible target
with the standard library only), zlib does the same work: the bytes out are the same, only the
speed differs.  Writing stays on zlib: zlib-ng's output at the same level is a few percent larger
than zlib's, and qemu-img's output size is the bar (docs/performance.md).
"""
import zlib
from types import ModuleType
from typing import Any, Optional, Tuple

_module: Optional[ModuleType] = None
ERRORS: Tuple[type, ...] = (zlib.error,)    # what a damaged stream raises (both modules' errors once loaded)


def _inflater() -> ModuleType:
    global _module, ERRORS  # pylint: disable=global-statement
    if _module is None:
        try:
            from zlib_ng import zlib_ng  # pylint: disable=import-outside-toplevel
        except ImportError:
            _module = zlib
        else:
            _module = zlib_ng
            ERRORS = (zlib.error, zlib_ng.error)
    return _module


def decompressobj(wbits: int = zlib.MAX_WBITS) -> Any:
    """A decompressor with zlib's API (``decompress(data, max_length)``, ``eof``, ``unused_data``):
    zlib-ng's when installed, else zlib's.  Catch :func:`errors` for a damaged stream."""
    return _inflater().decompressobj(wbits)


def errors() -> Tuple[type, ...]:
    """The exception classes a damaged stream raises from :func:`decompressobj`'s objects."""
    _inflater()
    return ERRORS
