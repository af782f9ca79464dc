"""qcow2 compressed clusters: raw deflate (compression type 0) and zstd (type 1).

References: docs/interop/qcow2.txt "Compressed Clusters Descriptor" and the
compression_type header field; QEMU block/qcow2-threads.c (what its zstd writer
produces and how far its reader decodes).

A compressed cluster inflates to exactly one cluster, and decoding is always bounded
by the cluster size.  The stored length comes from a sector count, so the bytes read
for a cluster usually run past the end of its compressed data (into the next
payload, or zeros): both decoders stop once the cluster is full and ignore the rest.

zstd comes from the standard library's ``compression.zstd`` (Python 3.14+) or, on
older Pythons, from the ``backports.zstd`` package, which has the same API.  It is
imported on first use only, so images that never touch a zstd cluster work on the
standard library alone.
"""
import importlib
import zlib
from types import ModuleType
from typing import Optional

from ... import deflate_codecs
from ...errors import CorruptImage, MissingPackage, UnsupportedFeature
from .header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

#: Raw deflate with a 4 KiB window: what QEMU writes (no zlib header, window bits -12).
DEFLATE_WINDOW_BITS = -12
#: The level QEMU's deflate writer uses.
DEFLATE_LEVEL = 6

#: Where a zstd implementation may come from, best first: the standard library (3.14+),
#: then its backport for older Pythons, which has the same API.
ZSTD_MODULES = ("compression.zstd", "backports.zstd")
ZSTD_PACKAGE = "backports.zstd"

_zstd: Optional[ModuleType] = None   # the module of ZSTD_MODULES that imported, once one has


def zstd_module(path: Optional[str] = None, field: str = "compression_type") -> ModuleType:
    """The zstd module (imported on first use); :class:`MissingPackage` naming *path* and *field*
    when neither the standard library nor backports.zstd provides one."""
    global _zstd  # pylint: disable=global-statement
    if _zstd is None:
        for name in ZSTD_MODULES:
            # import_module (not "from backports import zstd") so that a module made unimportable
            # through sys.modules counts as missing even when its package is already imported
            try:
                _zstd = importlib.import_module(name)
                break
            except ImportError:
                continue
        else:
            raise MissingPackage("zstd compression", ZSTD_PACKAGE, path=path, field=field)
    return _zstd


def zstd_available() -> bool:
    """Whether zstd clusters can be read and written on this Python (imports the module)."""
    try:
        zstd_module()
    except MissingPackage:
        return False
    return True


def decompress_cluster(data: bytes, cluster_size: int, ctype: int, path: str, where: str) -> bytes:
    """Inflate one compressed cluster; the result is exactly *cluster_size* bytes."""
    if ctype == COMPRESSION_ZLIB:
        try:
            d = deflate_codecs.decompressobj(DEFLATE_WINDOW_BITS)
            out = d.decompress(data, cluster_size)
        except deflate_codecs.errors() as exc:
            raise CorruptImage("compressed cluster at %s cannot be inflated: %s" % (where, exc), path=path,
                               field="compressed cluster") from None
    elif ctype == COMPRESSION_ZSTD:
        out = _zstd_decompress(data, cluster_size, path, where)
    else:
        raise UnsupportedFeature("unknown compression type %d" % ctype, path=path, field="compression_type")
    if len(out) != cluster_size:
        raise CorruptImage("compressed cluster at %s inflates to %d bytes, not %d" % (where, len(out), cluster_size),
                           path=path, field="compressed cluster")
    return out


def _zstd_decompress(data: bytes, cluster_size: int, path: str, where: str) -> bytes:
    """Decode zstd frames one after another until *cluster_size* bytes are out, as QEMU does.

    QEMU writes one frame per cluster, but its reader accepts any sequence of frames (skippable
    ones included) and stops as soon as the cluster is full, even in the middle of a frame; what
    follows is the padding of the sector-rounded length and is never looked at."""
    zstd = zstd_module(path, "compression_type")
    view = memoryview(data)
    out = bytearray()
    pos = 0
    try:
        while len(out) < cluster_size:
            rest = view[pos:]
            if not rest:
                raise CorruptImage("compressed cluster at %s ends after %d of %d bytes"
                                   % (where, len(out), cluster_size), path=path, field="compressed cluster")
            # Hand the decoder one frame at a time (a slice of the view, not a copy): its
            # unused_data would copy the remainder after every frame, quadratic for many tiny frames.
            try:
                size = zstd.get_frame_size(rest)
            except zstd.ZstdError:
                size = len(rest)      # a frame cut short or damaged: the decoder says which
            dec = zstd.ZstdDecompressor()
            out += dec.decompress(rest[:size], max_length=cluster_size - len(out))
            if not dec.eof:
                if len(out) == cluster_size:
                    break             # the cluster is full before the frame ends: QEMU stops here too
                raise CorruptImage("compressed cluster at %s ends inside a zstd frame after %d of %d bytes"
                                   % (where, len(out), cluster_size), path=path, field="compressed cluster")
            pos += size - len(dec.unused_data)
    except zstd.ZstdError as exc:
        raise CorruptImage("compressed cluster at %s cannot be decoded: %s" % (where, exc), path=path,
                           field="compressed cluster") from None
    return bytes(out)


def compress_cluster(data: bytes, ctype: int, level: Optional[int] = None, path: Optional[str] = None) -> bytes:
    """Compress one cluster as qcow2 stores it: raw deflate with a 4 KiB window, or one zstd frame.

    The zstd frame is what QEMU writes (its default level, the content size in the frame header);
    this is safe to call from several threads at once, as the parallel compressed writer does."""
    if ctype == COMPRESSION_ZLIB:
        c = zlib.compressobj(DEFLATE_LEVEL if level is None else level, zlib.DEFLATED, DEFLATE_WINDOW_BITS)
        return c.compress(data) + c.flush()
    if ctype == COMPRESSION_ZSTD:
        zstd = zstd_module(path, "compression_type")
        return zstd.compress(data) if level is None else zstd.compress(data, level)
    raise UnsupportedFeature("unknown compression type %d" % ctype, path=path, field="compression_type")
