"""qcow2 sizes for ``qemu-img measure``: the bytes a new image needs before and after filling it.

References: QEMU's qcow2 measure and preallocation-size calculations (block/qcow2.c) and the
persistent-bitmap size estimate (block/qcow2-bitmap.c), reproduced from their documented
behaviour and checked against qemu-img 7.2's output.

The fully allocated size is the header cluster, every L2 table, the L1 table (whole clusters),
the refcount structure that counts all of that plus the data, and the data itself.  "Required"
drops the data clusters the image would not hold: all metadata of the full image is still
counted, so it overestimates a little, as QEMU does.
"""
from typing import Any, Dict, List, Optional, Tuple

from ...driver import MeasureSource
from ...errors import InvalidOption
from . import bitmaps as bm
from . import crypto
from . import header as hdr

DEFAULT_CLUSTER_SIZE = 65536
L1E_SIZE = 8
REFTABLE_ENTRY_SIZE = 8
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
# measure parses compat with QEMU's legacy parser: only these two spellings
MEASURE_COMPAT = {"0.10": 2, "1.1": 3}

BITMAP_TABLE_ENTRY_SIZE = 8


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_bits: int) -> int:
    """Bytes of refcount blocks and table needed to count *clusters* clusters and themselves."""
    per_block = cluster_size * 8 // refcount_bits
    per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    blocks = table = 0
    # the refcount structure counts itself: grow it until it covers everything, itself included
    while True:
        need_blocks = -(-(clusters + blocks + table) // per_block)
        need_table = -(-need_blocks // per_table_cluster)
        if (need_blocks, need_table) == (blocks, table):
            return (blocks + table) * cluster_size
        blocks, table = need_blocks, need_table


def fully_allocated_size(size: int, cluster_size: int, refcount_bits: int, extended_l2: bool) -> int:
    """The file size of an image of *size* guest bytes with every cluster allocated."""
    data = -(-size // cluster_size) * cluster_size
    l2_entry = 16 if extended_l2 else 8
    meta = cluster_size                                   # header
    l2_entries = _round_up(data // cluster_size, cluster_size // l2_entry)
    meta += l2_entries * l2_entry                         # every L2 table, whole
    l1_entries = _round_up(l2_entries * l2_entry // cluster_size, cluster_size // L1E_SIZE)
    meta += l1_entries * L1E_SIZE                         # the L1 table in whole clusters
    meta += refcount_metadata_size((meta + data) // cluster_size, cluster_size, refcount_bits)
    return meta + data


def bitmaps_size(bitmaps: List[Tuple[str, int]], size: int, cluster_size: int) -> int:
    """Bytes the source's persistent bitmaps would take: each bitmap fully allocated, its
    table, and the bitmap directory."""
    total = 0
    directory = 0
    for name, granularity in bitmaps:
        bitmap_bytes = _div_up(_div_up(size, granularity), 8)      # one bit per granule
        clusters = _div_up(bitmap_bytes, cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * BITMAP_TABLE_ENTRY_SIZE, cluster_size)
        directory += bm.entry_size(len(name.encode("utf-8", "surrogateescape")))
    return total + _round_up(directory, cluster_size)


def measure(size: Optional[int], options: Dict[str, Any], source: Optional[MeasureSource]) -> Dict[str, int]:
    """qemu-img measure -O qcow2: ``{"bitmaps"?, "required", "fully-allocated"}``.

    Options are checked in QEMU's order and with its messages; options that do not change
    the numbers (lazy_refcounts, compression_type, data_file...) are accepted unchecked,
    as qemu-img does.
    """
    extended_l2 = bool(options.get("extended_l2", False))
    cluster_size = options.get("cluster_size")
    cluster_size = DEFAULT_CLUSTER_SIZE if cluster_size is None else int(cluster_size)
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        raise InvalidOption("Cluster size must be a power of two between 512 and 2048k", field="cluster_size")
    if extended_l2 and cluster_size < 512 * hdr.SUBCLUSTERS:
        raise InvalidOption("Extended L2 entries are only supported with cluster sizes of at least %d bytes"
                            % (512 * hdr.SUBCLUSTERS), field="cluster_size")
    compat = options.get("compat")
    if compat is None:
        version = 3
    elif str(compat) in MEASURE_COMPAT:
        version = MEASURE_COMPAT[str(compat)]
    else:
        raise InvalidOption("Invalid compatibility level: '%s'" % compat, field="compat")
    refcount_bits = options.get("refcount_bits")
    refcount_bits = 16 if refcount_bits is None else int(refcount_bits)
    if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise InvalidOption("Refcount width must be a power of two and may not exceed 64 bits",
                            field="refcount_bits")
    if version < 3 and refcount_bits != 16:
        raise InvalidOption("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                            "(use compat=1.1 or greater)", field="refcount_bits")
    prealloc = options.get("preallocation")
    prealloc = "off" if prealloc is None else str(prealloc)
    if prealloc not in PREALLOCATION_MODES:
        raise InvalidOption("invalid parameter value: %s" % prealloc, field="preallocation")
    has_backing = options.get("backing_file") is not None
    # the LUKS header's clusters (QEMU's qcow2_measure: the header and key material size for the cipher
    # asked, rounded up to a cluster, added to both numbers); qemu-img asks for the key even here
    luks_size = _round_up(crypto.header_length(options), cluster_size) if crypto.wanted(options) else 0

    virtual = _round_up(size or 0, cluster_size)
    l2_entry = 16 if extended_l2 else 8
    if -(-(virtual // cluster_size) // (cluster_size // l2_entry)) * L1E_SIZE > hdr.MAX_L1_SIZE:
        raise InvalidOption("The image size is too large (try using a larger cluster size)", field="size")

    required = 0
    if source is not None:
        virtual = _round_up(source.virtual_size, cluster_size)
        # with a backing file nobody knows what it already holds: assume every cluster is written
        required = virtual if has_backing else source.allocated(cluster_size)
    if prealloc in ("falloc", "full"):
        required = virtual
    full = fully_allocated_size(virtual, cluster_size, refcount_bits, extended_l2)
    result: Dict[str, int] = {}
    if version >= 3 and source is not None and source.bitmaps is not None:
        result["bitmaps"] = bitmaps_size(source.bitmaps, source.virtual_size, cluster_size)
    full += luks_size
    result["required"] = full - virtual + required
    result["fully-allocated"] = full
    return result


def persistent_bitmaps(image) -> Optional[List[Tuple[str, int]]]:
    """``(name, granularity)`` of the bitmaps in a qcow2 image's bitmap directory (None for v2)."""
    entries = bitmap_entries(image)
    return None if entries is None else [(name, gran) for name, gran, dummy in entries]


def bitmap_info(image) -> List[Dict[str, Any]]:
    """The bitmaps as ``qemu-img info`` lists them: flags (in-use, auto), name, granularity."""
    out = []
    for name, gran, flags in bitmap_entries(image) or ():
        names = [n for bit, n in ((1, "in-use"), (2, "auto")) if flags & bit]
        out.append({"flags": names, "name": name, "granularity": gran})
    return out


def bitmap_entries(image) -> Optional[List[Tuple[str, int, int]]]:
    """``(name, granularity, flags)`` of the bitmaps in a qcow2 image's bitmap directory.

    Version 2 images cannot carry bitmaps (None).  A directory whose autoclear bit was
    cleared by a program without bitmap support is stale: QEMU ignores it, and so do we.
    """
    if image.header.version < 3:
        return None
    entries = bm.read_directory(image, tables_in_file=False)[0]
    return [(e.name.decode("utf-8", "surrogateescape"), e.granularity, e.flags) for e in entries]


def _div_up(value: int, divisor: int) -> int:
    return -(-value // divisor)


def _round_up(value: int, alignment: int) -> int:
    return _div_up(value, alignment) * alignment
