"""Which deflate implementation does the work: the standard library's zlib, or a faster one where
the pip package's dependencies are installed (imported on first use; the bytes they read are the
same, and what they write is valid deflate that qemu-img reads, at most as large as zlib's).

- Inflating (compressed qcow/qcow2 clusters, VMDK grains, DMG and cloop chunks): ``zlib-ng``,
  about 1.6x as fast as zlib.
- Compressing a zlib stream (streamOptimized VMDK grains, 32 KiB window): ``libdeflate`` through
  the ``deflate`` package, about 2.8x as fast as zlib and about 1 % smaller at the same level.
- Raw deflate with qcow2's and qcow's 4 KiB window stays on zlib: libdeflate always uses a 32 KiB
  window (a reader that inflates with window bits -12 in pieces, as Python's zlib does, could not
  follow its distances), and zlib-ng's output at zlib's level is a few percent larger than zlib's
  (docs/performance.md).

Without them (an Ansible target with the standard library only) zlib does everything.
"""
import zlib
from types import ModuleType
from typing import Any, Callable, Optional, Tuple

_inflate_module: Optional[ModuleType] = None
ERRORS: Tuple[type, ...] = (zlib.error,)    # what a damaged stream raises (both modules' errors once loaded)
_zlib_compress: Optional[Callable[[bytes, int], bytes]] = None


def _inflater() -> ModuleType:
    global _inflate_module, ERRORS  # pylint: disable=global-statement
    if _inflate_module is None:
        try:
            from zlib_ng import zlib_ng  # pylint: disable=import-outside-toplevel
        except ImportError:
            _inflate_module = zlib
        else:
            _inflate_module = zlib_ng
            ERRORS = (zlib.error, zlib_ng.error)
    return _inflate_module


def decompressobj(wbits: int = zlib.MAX_WBITS) -> Any:
    """A decompressor with zlib's API (``decompress(data, max_length)``, ``eof``, ``unused_data``):
    zlib-ng's when installed, else zlib's.  Catch :func:`errors` for a damaged stream."""
    return _inflater().decompressobj(wbits)


def errors() -> Tuple[type, ...]:
    """The exception classes a damaged stream raises from :func:`decompressobj`'s objects."""
    _inflater()
    return ERRORS


def zlib_compress(data: bytes, level: int = 6) -> bytes:
    """*data* as one zlib stream (RFC 1950, 32 KiB window): libdeflate's where the ``deflate``
    package is installed, else zlib's.  Safe to call from several threads (both release the GIL)."""
    global _zlib_compress  # pylint: disable=global-statement
    if _zlib_compress is None:
        try:
            import deflate  # pylint: disable=import-outside-toplevel
        except ImportError:
            _zlib_compress = zlib.compress
        else:
            _zlib_compress = deflate.zlib_compress
    return _zlib_compress(data, level)
