"""qcow2 option amendment (qemu-img amend): compat up/downgrade, lazy_refcounts, refcount_bits,
backing file, size, the external data file's name and data_file_raw=off.  Options only meaningful
at creation are refused, as QEMU does."""
import struct
from typing import Any, Dict

from ...errors import ImageError, InvalidOption
from . import header as hdr
from .check import count_references
from .refcount import Refcounts, rebuild_refcounts

AMENDABLE = ("compat", "lazy_refcounts", "refcount_bits", "backing_file", "backing_fmt", "size", "data_file",
             "data_file_raw")
CREATE_ONLY = ("cluster_size", "preallocation", "extended_l2", "compression_type", "encryption", "encrypt.format")
U64 = struct.Struct(">Q")


def _keyslot_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The options that amend the key slots of the LUKS header inside the image: the luks format's
    key-slot options (luks/keyslots.py, imported only when an ``encrypt.`` option is given) with
    the ``encrypt.`` prefix."""
    if not any(name.startswith("encrypt.") for name in options):
        return {}
    from ..luks.keyslots import OPTION_NAMES  # pylint: disable=import-outside-toplevel
    names = {"encrypt." + name for name in OPTION_NAMES}
    return {k: v for k, v in options.items() if k in names}


def _typed(img, options: Dict[str, Any]) -> Dict[str, Any]:
    """Values given as text (qemu-img's ``-o`` strings) typed by the create option of their name, as
    qemu's option parser does before amend: a bad number is refused first, other bad values and
    unknown names are left for amend to name; the ``encrypt.`` key-slot values are the luks code's."""
    typed: Dict[str, Any] = {}
    for name, value in options.items():
        typed[name] = value
        if not isinstance(value, str) or name.startswith("encrypt."):
            continue
        try:
            spec = img.driver.option(name)
        except ImageError:
            continue
        try:
            typed[name] = spec.parse(value)
        except ImageError:
            if spec.amendable and spec.type in ("int", "size"):
                raise
    return typed


def amend(img, options: Dict[str, Any], force: bool = False) -> None:
    """Apply amendable options to an image opened read-write (values typed or as text)."""
    options = _typed(img, options)
    keyslot_options = _keyslot_options(options)
    if keyslot_options:
        if img.crypto is None:
            raise InvalidOption("Invalid parameter 'encrypt.%s': the image is not encrypted"
                                % sorted(keyslot_options)[0][len("encrypt."):], path=img.path,
                                field=sorted(keyslot_options)[0])
        img.crypto.amend_keyslots(keyslot_options, force)
        options = {k: v for k, v in options.items() if k not in keyslot_options}
        if not options:
            return
    for name in options:
        if name in CREATE_ONLY:
            raise InvalidOption("Invalid parameter '%s': this option is only supported for image creation" % name,
                                path=img.path, field=name)
        if name not in AMENDABLE:
            raise InvalidOption("Invalid parameter '%s'" % name, path=img.path, field=name)
    h = img.header
    _check_data_file_options(img, options)
    new_version = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}[str(options["compat"])] if "compat" in options \
        else h.version
    lazy = options.get("lazy_refcounts")
    bits = options.get("refcount_bits")
    if new_version < 3 and lazy:
        raise InvalidOption("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 "
                            "or greater)", path=img.path, field="lazy_refcounts")
    if bits is not None:
        bits = int(bits)
        if bits < 1 or bits > 64 or bits & (bits - 1):
            raise InvalidOption("Refcount width must be a power of two and may not exceed 64 bits", path=img.path,
                                field="refcount_bits")
        if new_version < 3 and bits != 16:
            raise InvalidOption("Refcount widths other than 16 bits require compatibility level 1.1 or above (use "
                                "compat=1.1 or greater)", path=img.path, field="refcount_bits")
    # the order QEMU uses: upgrade, refcount width, backing file, lazy refcounts, size, downgrade
    if new_version > h.version:
        h.version = 3
        h.header_length = hdr.HEADER_V3_WRITTEN_LENGTH
        h.compression_type = hdr.COMPRESSION_ZLIB
        img.write_header()
        img.host.flush()
    if bits is not None and bits != h.refcount_bits:
        rebuild_refcounts(img, count_references(img), bits.bit_length() - 1)
        img.refcounts = Refcounts(img)
    if "backing_file" in options or "backing_fmt" in options:
        path = options.get("backing_file", h.backing_file)
        fmt = options.get("backing_fmt", h.backing_format if path == h.backing_file else None)
        if fmt and not path:
            raise InvalidOption("backing_fmt requires backing_file", path=img.path, field="backing_fmt")
        img.set_backing(path, fmt)
    if lazy is not None and h.version >= 3:
        if lazy:
            h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
        else:
            h.compatible_features &= ~hdr.COMPAT_LAZY_REFCOUNTS
        img.host.pwrite(*h.pack_fields("compatible_features"))
        img._set_dirty_on_write = bool(lazy)
        img.host.flush()
    _amend_data_file(img, options)
    if "size" in options and options["size"] is not None:
        img.resize(int(options["size"]), shrink=True)
    if new_version < h.version:
        downgrade(img)


def _check_data_file_options(img, options: Dict[str, Any]) -> None:
    """What qemu-img amend allows: renaming the data file of an image that has one, and clearing
    data_file_raw (setting it would need the data file to be a raw image already)."""
    if options.get("data_file") and img.data_file is None:
        raise InvalidOption("data-file can only be set for images that use an external data file", path=img.path,
                            field="data_file")
    if options.get("data_file_raw") and not img.data_raw:
        raise InvalidOption("data-file-raw cannot be set on existing images", path=img.path, field="data_file_raw")


def _amend_data_file(img, options: Dict[str, Any]) -> None:
    """Record a new data file name (not opened: the image is left to name a file that is not there,
    as with qemu-img) and clear data_file_raw; the header is rewritten once."""
    h = img.header
    changed = False
    if options.get("data_file") and options["data_file"] != h.data_file:
        h.data_file = str(options["data_file"])
        changed = True
    if options.get("data_file_raw") is False and h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW:
        h.autoclear_features &= ~hdr.AUTOCLEAR_DATA_FILE_RAW
        img.data_raw = False
        changed = True
    if changed:
        img.flush()
        img.write_header()
        img.host.flush()


def downgrade(img) -> None:
    """compat=1.1 -> 0.10: expand zero clusters, then write a version 2 header."""
    h = img.header
    if h.refcount_bits != 16:
        raise ImageError("Cannot downgrade an image with refcount_bits other than 16", path=img.path,
                         field="compat")
    if h.extended_l2:
        raise ImageError("Cannot downgrade an image with extended L2 entries", path=img.path, field="compat")
    if h.compression_type != hdr.COMPRESSION_ZLIB:
        raise ImageError("Cannot downgrade an image with a compression type other than zlib", path=img.path,
                         field="compat")
    if h.incompatible_features & hdr.INCOMPAT_DATA_FILE:
        raise ImageError("Cannot downgrade an image with a data file", path=img.path, field="compat")
    if h.bitmaps_extension is not None:
        # version 2 cannot say whether bitmaps are valid: QEMU downgrades and leaves them in the header,
        # invalid, their clusters leaked; vdisk removes them, freeing their clusters
        editor = img.bitmap_editor()
        for bm in list(editor.bitmaps):
            editor.remove(bm.entry.name.decode("utf-8", "surrogateescape"))
        img.commit_bitmaps(editor)
        h.bitmaps_extension = None
    expand_zero_clusters(img)
    h.version = 2
    h.header_length = hdr.HEADER_V2_LENGTH
    h.incompatible_features = 0
    h.compatible_features = 0
    h.autoclear_features = 0
    img._set_dirty_on_write = False
    img.write_header()
    img.host.flush()


def expand_zero_clusters(img) -> None:
    """Replace zero-flag entries (which version 2 cannot express) in every L2 table, active and snapshot."""
    cs = img.cs
    tables = []
    for entry in img.l1:
        if entry & hdr.OFFSET_MASK:
            tables.append(entry & hdr.OFFSET_MASK)
    for snap in img.snapshots_table():
        raw = img.host.pread(snap.l1_size * 8, snap.l1_table_offset)
        for i in range(0, len(raw), 8):
            off = U64.unpack_from(raw, i)[0] & hdr.OFFSET_MASK
            if off:
                tables.append(off)
    has_backing = bool(img.header.backing_file)
    zeros = bytes(cs)
    for l2_off in sorted(set(tables)):
        raw = bytearray(img.host.pread(cs, l2_off))
        l2_refcount = img.refcounts.get(l2_off // cs)
        changed = False
        for idx in range(cs // 8):
            entry = U64.unpack_from(raw, idx * 8)[0]
            if entry & hdr.OFLAG_COMPRESSED or not entry & hdr.OFLAG_ZERO:
                continue
            off = entry & hdr.OFFSET_MASK
            if off:
                img.check_overlap(off, cs)
                img.host.pwrite(zeros, off)       # preallocated zero cluster: make the zeros real
                new = off | (entry & hdr.OFLAG_COPIED)
            elif has_backing:
                # must not fall through to the backing file: a real cluster of zeros, referenced as often
                # as the L2 table that points to it
                new_off = img.refcounts.alloc(1)
                if l2_refcount > 1:
                    img.refcounts.change(new_off // cs, 1, l2_refcount - 1)
                img.host.pwrite(zeros, new_off)
                new = new_off | (hdr.OFLAG_COPIED if l2_refcount == 1 else 0)
            else:
                new = 0                           # unallocated reads as zeros without a backing file
            U64.pack_into(raw, idx * 8, new)
            changed = True
        if changed:
            img.host.flush()
            img.host.pwrite(bytes(raw), l2_off)
    img._l2_cache.clear()
    img.host.flush()
