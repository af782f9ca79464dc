"""vmdk: VMware virtual disks: monolithic and split (2 GB) sparse and flat images, stream-optimized.

References: VMware "Virtual Disk Format 1.1"; QEMU 7.2 block/vmdk.c for qemu-img's create options,
file names, descriptor layout, limits and messages.  Images of the split and flat subformats are
a descriptor file plus extent files named after it (``NAME-s001.vmdk``, ``NAME-f001.vmdk``,
``NAME-flat.vmdk``); a stream-optimized image is written as VMware writes it: compressed grains
behind markers, then the grain tables, the directory and a footer (``gdOffset`` at the end).
"""
import os
import random
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ...driver import Driver, OptionSpec, Policy
from ...errors import ImageError, InvalidOption
from ...io import AtomicOutput, HostFile
from ..signatures import vmdk_text_descriptor
from . import header as hdr
from .extent import _pack32
from .image import VmdkImage

SECTOR = hdr.SECTOR
DEFAULT_TOOLS_VERSION = "2147483647"


class VmdkDriver(Driver):
    name = "vmdk"
    image_class = VmdkImage
    extensions = (".vmdk",)
    names_other_files = True
    capabilities = frozenset({"create", "write", "backing", "compression", "check"})
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size"),
        OptionSpec("adapter_type", "str", None, "Virtual adapter type, can be one of ide (default), lsilogic, "
                   "buslogic or legacyESX"),
        OptionSpec("backing_file", "str", None, "File name of a base image"),
        OptionSpec("backing_fmt", "str", None, "Must be 'vmdk' if present"),
        OptionSpec("compat6", "bool", False, "VMDK version 6 image"),
        OptionSpec("hwversion", "str", None, "VMDK hardware version"),
        OptionSpec("subformat", "str", None, "VMDK flat extent format, can be one of {monolithicSparse (default) | "
                   "monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "),
        OptionSpec("toolsversion", "str", None, "VMware guest tools version"),
        OptionSpec("zeroed_grain", "bool", False, "Enable efficient zero writes using the zeroed-grain GTE feature"),
    )

    def probe(self, header: bytes, filename: str) -> int:
        if hdr.magic_of(header) in (hdr.MAGIC, hdr.VMDK3_MAGIC):
            return 100
        return 100 if vmdk_text_descriptor(header) else 0

    def references(self, path: str, checked=None) -> List[Tuple[str, str]]:
        """The extent files and the parent a VMDK names, as (kind, stored name), read from its
        descriptor without opening them (``vdisk inspect``)."""
        with HostFile(path, lock=False, checked=checked) as host:
            size = host.size()
            head = host.pread(min(size, SECTOR), 0)
            if hdr.magic_of(head) == hdr.MAGIC:
                h = hdr.SparseHeader.unpack(head.ljust(SECTOR, b"\0"))
                at = h.descriptor_offset * SECTOR
                if not h.descriptor_offset or not h.descriptor_size or h.descriptor_offset == hdr.GD_AT_END or at >= size:
                    return []
                raw = host.pread(min(h.descriptor_size * SECTOR, hdr.MAX_DESCRIPTOR, size - at), at)
                own = h.capacity != 0       # a sparse extent with data: its descriptor's extent line is itself
            elif size <= hdr.MAX_DESCRIPTOR:
                raw, own = host.pread(size, 0), False
            else:
                return []
        desc = hdr.parse_descriptor(raw, path)
        out = [] if own else [("extent", e.filename) for e in desc.extents if e.type != "ZERO" and e.filename]
        return out + ([("backing file", desc.parent_hint)] if desc.parent_hint else [])

    # -- create ----------------------------------------------------------------------------
    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        """A new image at *path*, its extent files (split and flat subformats) beside it."""
        self.create_staged(path, path, size, options, sync)

    def create_staged(self, path: str, final_path: str, size: int, options: Dict[str, Any],
                      sync: bool = True) -> None:
        """A new image written at *path* that will be named *final_path* (convert's temporary output):
        the descriptor names the extents, and the extent files are named, after *final_path*."""
        s = self._settings(final_path, size, options)
        final = os.path.basename(final_path)
        if s.subformat in ("monolithicSparse", "streamOptimized"):
            text = self._descriptor(s, ['RW %d SPARSE "%s"\n' % (s.size // SECTOR, final)])
            build = self._sparse_image if s.subformat == "monolithicSparse" else self._stream_image
            self._write_file(path, *build(s.size, s.zeroed, text), sync=sync)
            return
        pieces = self._extent_files(final, s)
        text = self._descriptor(s, [('RW %d FLAT "%s" 0\n' if s.flat else 'RW %d SPARSE "%s"\n')
                                    % (psize // SECTOR, name) for name, psize in pieces])
        if len(text) > hdr.MAX_DESCRIPTOR:
            raise InvalidOption("descriptor too large", path=final_path, field="backing_file")
        directory = os.path.dirname(os.path.abspath(final_path))
        out = AtomicOutput(path)    # first: a descriptor a running VM holds is refused before any extent is replaced
        try:
            for name, psize in pieces:
                parts, length = ([], psize) if s.flat else self._sparse_image(psize, s.zeroed, None)
                self._write_file(os.path.join(directory, name), parts, length, sync)
            self._write_file(path, [(0, text)], 0, sync, out)
        except BaseException:
            out.abort()
            raise

    def _settings(self, path: str, size: int, options: Dict[str, Any]) -> "_Settings":
        """The create options checked as qemu-img checks them, with its messages."""
        sub = options.get("subformat") or "monolithicSparse"
        if sub not in hdr.SUBFORMATS:
            raise InvalidOption("Unknown subformat: %s" % sub, path=path, field="subformat")
        adapter = options.get("adapter_type") or "ide"
        if adapter not in hdr.ADAPTER_TYPES:
            raise InvalidOption("Unknown adapter type: '%s'" % adapter, path=path, field="adapter_type")
        compat6 = bool(options.get("compat6"))
        hwversion = options.get("hwversion")
        if hwversion == "undefined":
            hwversion = None
        if compat6 and hwversion:
            raise InvalidOption("compat6 cannot be enabled with hwversion set", path=path, field="compat6")
        zeroed = bool(options.get("zeroed_grain"))
        flat = sub in ("monolithicFlat", "twoGbMaxExtentFlat")
        if flat and zeroed:
            raise InvalidOption("Flat image can't enable zeroed grain", path=path, field="zeroed_grain")
        backing = options.get("backing_file") or None
        bfmt = options.get("backing_fmt")
        if bfmt and bfmt != "vmdk":
            raise InvalidOption("Invalid backing file format: %s. Must be vmdk" % bfmt, path=path,
                                field="backing_fmt")
        parent_cid = self._parent_cid(path, backing) if backing else 0xFFFFFFFF
        size = -(-size // SECTOR) * SECTOR
        if size == 0:
            # qemu-img 7.2 writes such an image but cannot open it (a sparse file of capacity 0 reads as
            # a descriptor; a descriptor without extents trips an assertion): refused here
            raise InvalidOption("a vmdk image cannot be empty (size 0)", path=path, field="size")
        return _Settings(sub, adapter, "6" if compat6 else (hwversion or "4"), zeroed, flat,
                         options.get("toolsversion") or DEFAULT_TOOLS_VERSION, backing, parent_cid, size)

    @staticmethod
    def _descriptor(s: "_Settings", extent_lines: List[str]) -> bytes:
        """The descriptor of a new image, with a fresh random CID."""
        return hdr.build_descriptor(random.getrandbits(32), s.parent_cid, s.subformat, s.backing, extent_lines,
                                    s.hwversion, s.size, s.adapter_type, s.toolsversion)

    @staticmethod
    def _extent_files(final: str, s: "_Settings") -> List[Tuple[str, int]]:
        """``(name, bytes)`` of the extent files of a split or flat image called *final*, named as
        qemu-img names them (``NAME-flat.vmdk``, ``NAME-f001.vmdk``, ``NAME-s001.vmdk``)."""
        stem, dot, ext = final.rpartition(".")
        prefix, postfix = (stem, "." + ext) if dot else (final, "")
        if s.subformat == "monolithicFlat":
            return [("%s-flat%s" % (prefix, postfix), s.size)]
        letter = "f" if s.flat else "s"
        count = max(1, -(-s.size // hdr.TWO_GB))
        return [("%s-%s%03d%s" % (prefix, letter, i + 1, postfix), min(hdr.TWO_GB, s.size - i * hdr.TWO_GB))
                for i in range(count)]

    def _parent_cid(self, path: str, backing: str) -> int:
        full = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(os.path.abspath(path)), backing)
        if not os.path.exists(full):
            raise ImageError("Could not open backing file '%s': No such file or directory" % full, path=path,
                             field="backing_file")
        with open(full, "rb") as f:
            head = f.read(4096)
        if not self.probe(head, full):
            raise InvalidOption("Invalid backing file format: %s. Must be vmdk" % "raw", path=path,
                                field="backing_file")
        policy = Policy(allowed_dirs=(os.path.dirname(os.path.realpath(full)),))
        with self.open(full, False, policy) as parent:
            return parent.cid

    @staticmethod
    def _write_file(path: str, parts: List[Tuple[int, bytes]], length: int, sync: bool,
                    out: Optional[AtomicOutput] = None) -> None:
        """A new file of *length* bytes (holes) holding *parts* ``(offset, bytes)``, renamed into place
        (through *out* when the caller made it)."""
        out = out or AtomicOutput(path)
        try:
            with HostFile(out.tmp_path, writable=True) as host:
                for off, data in parts:
                    host.pwrite(data, off)
                if length > max([off + len(data) for off, data in parts] or [0]):
                    host.truncate(length)
            out.commit(sync)
        except BaseException:
            out.abort()
            raise

    @staticmethod
    def _sparse_image(size: int, zeroed: bool, text: Optional[bytes]):
        """A hosted sparse extent as qemu-img lays it out (header, descriptor area, redundant directory
        and its tables, directory and its tables, the first grain at a grain boundary)."""
        capacity = size // SECTOR
        rgd, gd, overhead, gd_sectors = hdr.sparse_layout(capacity)
        h = hdr.SparseHeader(version=2 if zeroed else 1,
                             flags=hdr.FLAG_NL_DETECT | hdr.FLAG_RGD | (hdr.FLAG_ZERO_GRAIN if zeroed else 0),
                             capacity=capacity, descriptor_offset=hdr.DESC_OFFSET, descriptor_size=hdr.DESC_SECTORS,
                             rgd_offset=rgd, gd_offset=gd, overhead=overhead)
        gt_count = h.gd_entries
        gt_sectors = -(-h.gt_bytes // SECTOR)
        parts = [(0, h.pack())]
        if text is not None:
            if len(text) > hdr.DESC_SECTORS * SECTOR:
                raise InvalidOption("descriptor too large for the embedded descriptor area", field="backing_file")
            parts.append((SECTOR, text))
        for base in (rgd, gd):
            first = base + gd_sectors
            parts.append((base * SECTOR, _pack32(range(first, first + gt_count * gt_sectors, gt_sectors))))
        return parts, overhead * SECTOR

    @staticmethod
    def _stream_image(size: int, zeroed: bool, text: bytes):
        """An empty stream-optimized extent as VMware writes one: header (directory at the end), the
        descriptor, then at the first grain boundary an empty directory, the footer, end of stream."""
        capacity = size // SECTOR
        overhead = hdr.DEFAULT_GRAIN_SECTORS
        flags = hdr.FLAG_NL_DETECT | hdr.FLAG_COMPRESS | hdr.FLAG_MARKER | (hdr.FLAG_ZERO_GRAIN if zeroed else 0)
        h = hdr.SparseHeader(version=3, flags=flags, capacity=capacity, descriptor_offset=hdr.DESC_OFFSET,
                             descriptor_size=hdr.DESC_SECTORS, rgd_offset=0, gd_offset=hdr.GD_AT_END, overhead=overhead,
                             compress_algorithm=hdr.COMPRESSION_DEFLATE)
        if len(text) > hdr.DESC_SECTORS * SECTOR:
            raise InvalidOption("descriptor too large for the embedded descriptor area", field="backing_file")
        gd_sectors = -(-h.gd_entries * 4 // SECTOR)
        footer = h.footer(overhead + 1)
        tail = (hdr.pack_marker(gd_sectors, hdr.MARKER_GD) + bytes(gd_sectors * SECTOR)
                + hdr.pack_marker(1, hdr.MARKER_FOOTER) + footer.pack() + hdr.pack_marker(0, hdr.MARKER_EOS))
        return [(0, h.pack()), (SECTOR, text), (overhead * SECTOR, tail)], 0


class _Settings(NamedTuple):
    """The checked create options of a new image."""
    subformat: str
    adapter_type: str
    hwversion: str
    zeroed: bool
    flat: bool
    toolsversion: str
    backing: Optional[str]
    parent_cid: int
    size: int                   # rounded up to a sector


DRIVER = VmdkDriver()
