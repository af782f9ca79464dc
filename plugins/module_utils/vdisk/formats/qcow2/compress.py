"""qcow2 compressed clusters: raw deflate (compression type 0) and zstd (type 1).

Reference: qcow2.txt "Compressed Clusters Descriptor" and the compression_type
header field.  A compressed cluster inflates to exactly one cluster; decoding is
always bounded by the cluster size.
"""
import zlib
from typing import Optional

from ...errors import CorruptImage, UnsupportedFeature
from .header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

try:  # Python 3.14+
    from compression import zstd as _zstd  # type: ignore
except ImportError:  # pragma: no cover - depends on the Python
    _zstd = None


def zstd_available() -> bool:
    return _zstd is not None


def decompress_cluster(data: bytes, cluster_size: int, ctype: int, path: str, where: str) -> bytes:
    """Inflate one compressed cluster; the result is exactly *cluster_size* bytes."""
    if ctype == COMPRESSION_ZLIB:
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(data, cluster_size)
        except zlib.error as exc:
            raise CorruptImage("compressed cluster at %s cannot be inflated: %s" % (where, exc), path=path,
                               field="compressed cluster") from None
    elif ctype == COMPRESSION_ZSTD:
        if _zstd is None:
            raise UnsupportedFeature("zstd-compressed clusters need a Python with the compression.zstd module "
                                     "(3.14+)", path=path, field="compression_type")
        try:
            dec = _zstd.ZstdDecompressor()
            out = dec.decompress(data, max_length=cluster_size)
        except Exception as exc:  # zstd raises its own ZstdError
            raise CorruptImage("compressed cluster at %s cannot be decoded: %s" % (where, exc), path=path,
                               field="compressed cluster") from None
    else:
        raise UnsupportedFeature("unknown compression type %d" % ctype, path=path, field="compression_type")
    if len(out) != cluster_size:
        raise CorruptImage("compressed cluster at %s inflates to %d bytes, not %d" % (where, len(out), cluster_size),
                           path=path, field="compressed cluster")
    return out


def compress_cluster(data: bytes, ctype: int, level: Optional[int] = None) -> bytes:
    """Compress one cluster as qcow2 stores it (raw deflate, 4 KiB window, or a zstd frame)."""
    if ctype == COMPRESSION_ZLIB:
        c = zlib.compressobj(6 if level is None else level, zlib.DEFLATED, -12)
        return c.compress(data) + c.flush()
    if _zstd is None:
        raise UnsupportedFeature("zstd compression needs a Python with the compression.zstd module (3.14+)",
                                 field="compression_type")
    return _zstd.compress(data)
