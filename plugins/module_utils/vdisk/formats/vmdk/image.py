"""An open VMDK image: a descriptor (embedded in a sparse extent, or a text file) and its extents.

References: VMware "Virtual Disk Format 1.1" ("The Descriptor File", "Extent Descriptions");
QEMU 7.2 block/vmdk.c (vmdk_open, vmdk_open_desc_file, vmdk_parse_extents) for what qemu-img opens
and its messages.  Extent files are named relative to the descriptor's directory: a name that
resolves (after symlinks) outside that directory tree and the policy's allowed directories, or
one that is not a regular file, is refused (DESIGN.md section 6) before anything is opened.
"""
import random
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...driver import DATA, UNALLOCATED, ZERO, CheckResult, Extent, Image, Policy, ResolvedPath
from ...errors import CorruptImage, FormatError, ImageError, UnsupportedFeature
from ...io import HostFile
from ...structure import Record
from . import header as hdr
from .extent import FlatExtent, SparseExtent, ZeroExtent, compress_grain

SECTOR = hdr.SECTOR


def extent_path(descriptor_path: str, name: str, policy: Policy) -> ResolvedPath:
    """Extent *name* of the descriptor at *descriptor_path*, resolved and checked by the one path rule
    (``Policy.resolve``: inside the descriptor's directory or an allowed directory, after symlinks as
    the kernel follows them, and a regular file); open ``display`` with ``checked=`` the result."""
    ref = policy.resolve(name, descriptor_path, "extent")
    if ref.ident is None:
        raise ImageError("Could not open '%s': No such file or directory" % ref.display, path=descriptor_path,
                         field="extent")
    return ref


def _hex(value: Optional[int]) -> str:
    return "(none)" if value is None else "%x" % value


class _DescriptorFile(HostFile):
    """The file the user named; its "disk size" counts the extent files too, as qemu-img's does."""
    others: List[HostFile] = []

    def allocated_bytes(self) -> int:
        return super().allocated_bytes() + sum(h.allocated_bytes() for h in self.others if h.fd >= 0)


class VmdkImage(Image):
    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self.policy = policy
        self.lock = policy.locks(writable)
        self.host = _DescriptorFile(path, writable=writable, lock=self.lock, sync=policy.sync,
                                    checked=policy.checked(path))
        self.exts: List[Tuple[int, Any]] = []       # (guest start, extent)
        self._desc_raw: Optional[bytes] = None      # the descriptor as read, where, and its room (None: a file)
        self._desc_at = 0
        self._desc_room: Optional[int] = None
        self._cid_updated = False
        self._cid_checked = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------------
    def _open(self) -> None:
        size = self.host.size()
        if size < 4:
            raise FormatError("File is too small, not a valid image", path=self.path)
        head = self.host.pread(min(size, SECTOR), 0)
        magic = hdr.magic_of(head)
        if magic == hdr.VMDK3_MAGIC:
            raise UnsupportedFeature("VMDK3 (COWD) sparse extents are not supported", path=self.path, field="magic")
        if magic == hdr.MAGIC:
            h = hdr.SparseHeader.unpack(head.ljust(SECTOR, b"\0"))
            if h.capacity == 0 and h.descriptor_offset and h.gd_offset != hdr.GD_AT_END:
                # a sparse file that only carries a descriptor
                self._open_descriptor(self._embedded_descriptor(h, size, strict=True))
            else:
                ext = SparseExtent(self.host, self.path, self.path, h, self.writable)
                if ext.version == 3 and self.writable and not ext.compressed:
                    raise UnsupportedFeature("VMDK version 3 must be read only", path=self.path, field="version")
                self.exts.append((0, ext))
                desc = self._embedded_descriptor(h, size)
                self.desc = desc
                ctype = desc.create_type if desc is not None else None
                self.create_type = "streamOptimized" if ext.compressed else (ctype or "monolithicSparse")
        else:
            # a descriptor file, of which QEMU reads at most MAX_DESCRIPTOR bytes: a file that is no
            # descriptor at all is "invalid" as in QEMU; a real one that is longer is refused whole
            raw = self.host.pread(min(size, hdr.MAX_DESCRIPTOR), 0)
            if not hdr.names_create_type(raw):
                raise FormatError("invalid VMDK image descriptor", path=self.path)
            if size > hdr.MAX_DESCRIPTOR:
                raise FormatError("descriptor file too large (%d bytes, at most %d)" % (size, hdr.MAX_DESCRIPTOR),
                                  path=self.path, field="descriptor")
            self._desc_raw, self._desc_at, self._desc_room = raw, 0, None
            self._open_descriptor(hdr.parse_descriptor(raw, self.path))
        self.virtual_size = sum(e.size for dummy, e in self.exts)
        self.host.others = [e.host for dummy, e in self.exts if e.host is not None and e.host is not self.host]
        first = self.exts[0][1] if self.exts else None
        self.cluster_size = first.cluster_bytes if first is not None else None
        self.allocation_unit = self.cluster_size
        d = self.desc
        self.cid = d.cid("CID") if d is not None else 0
        self.parent_cid = d.cid("parentCID") if d is not None and d.get("parentCID") else 0xFFFFFFFF
        hint = d.parent_hint if d is not None else None
        if hint:
            self.backing_filename = hint
            self.backing_format = "vmdk"
        sparse = [e for dummy, e in self.exts if e.kind == "SPARSE"]
        self.compression_unit = self.cluster_size or 0
        self.stream = bool(sparse) and all(e.compressed for e in sparse)

    def _embedded_descriptor(self, h: hdr.SparseHeader, size: int, strict: bool = False
                             ) -> Optional[hdr.Descriptor]:
        """The descriptor inside a sparse extent; one outside the file is only an error when the
        image is nothing but that descriptor (QEMU takes only CIDs and the parent from it)."""
        if not h.descriptor_offset or not h.descriptor_size or h.descriptor_offset == hdr.GD_AT_END:
            if strict:
                raise FormatError("invalid VMDK image descriptor", path=self.path, field="descriptorOffset")
            return None
        n = min(h.descriptor_size * SECTOR, hdr.MAX_DESCRIPTOR, max(0, size - h.descriptor_offset * SECTOR))
        if h.descriptor_offset * SECTOR >= size:
            if not strict:
                return None
            raise CorruptImage("descriptor (sector %d, %d sectors) lies beyond the end of the file"
                               % (h.descriptor_offset, h.descriptor_size), path=self.path, field="descriptorOffset")
        self._desc_raw, self._desc_at, self._desc_room = self.host.pread(n, h.descriptor_offset * SECTOR), h.descriptor_offset * SECTOR, n
        return hdr.parse_descriptor(self._desc_raw, self.path)

    def _open_descriptor(self, desc: hdr.Descriptor) -> None:
        self.desc = desc
        ctype = desc.create_type
        if ctype is None:
            raise FormatError("invalid VMDK image descriptor", path=self.path)
        if ctype not in hdr.DESCRIPTOR_TYPES:
            raise UnsupportedFeature("Unsupported image type '%s'" % ctype, path=self.path, field="createType")
        self.create_type = ctype
        if not desc.extents:
            raise CorruptImage("the descriptor names no extents", path=self.path, field="extent")
        start = 0
        for line in desc.extents:
            if line.sectors <= 0 or line.sectors >= (1 << 63) // SECTOR - start // SECTOR:
                raise CorruptImage("extent of %d sectors is invalid" % line.sectors, path=self.path, field="extent")
            if line.type == "ZERO":
                ext = ZeroExtent(line.filename or "", line.sectors * SECTOR)
            else:
                ref = extent_path(self.path, line.filename or "", self.policy)
                full = ref.display      # named as QEMU names it; the checked real path is what is opened
                host = HostFile(full, writable=self.writable, lock=self.lock, sync=self.policy.sync, checked=ref)
                try:
                    if line.type in ("FLAT", "VMFS"):
                        if (line.offset + line.sectors) * SECTOR >= 1 << 63:
                            raise CorruptImage("extent offset %d is invalid" % line.offset, path=self.path,
                                               field="extent")
                        ext = FlatExtent(host, full, line.offset * SECTOR, line.sectors * SECTOR)
                    else:
                        fsize = host.size()
                        head = host.pread(SECTOR, 0)
                        if fsize < SECTOR or hdr.magic_of(head) != hdr.MAGIC:
                            raise FormatError("extent file %r is not a VMDK sparse extent" % line.filename,
                                              path=self.path, field="extent")
                        ext = SparseExtent(host, full, full, hdr.SparseHeader.unpack(head), self.writable)
                        if ext.version == 3 and self.writable and not ext.compressed:
                            raise UnsupportedFeature("VMDK version 3 must be read only", path=full, field="version")
                except BaseException:
                    host.close()
                    raise
            ext.desc_type = line.type
            self.exts.append((start, ext))
            start += ext.size

    # -- mapping -----------------------------------------------------------------------------
    def _parts(self, offset: int, length: int) -> Iterator[Tuple[int, int, Any, int]]:
        """``(guest offset, length, extent, offset in the extent)``."""
        end = offset + length
        for start, ext in self.exts:
            stop = start + ext.size
            if stop <= offset:
                continue
            if start >= end:
                break
            a = max(offset, start)
            b = min(end, stop)
            yield a, b - a, ext, a - start

    def _pieces(self, offset: int, length: int) -> Iterator[Tuple[int, int, str, Any, Optional[int], int]]:
        for guest, n, ext, local in self._parts(offset, length):
            for loff, ln, kind, host in ext.pieces(local, n):
                yield guest + loff - local, ln, kind, ext, host, loff

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, view: memoryview) -> None:
        self._check_range(offset, len(view))
        view = view.cast("B") if view.format != "B" else view
        for guest, n, kind, ext, host, local in self._pieces(offset, len(view)):
            part = view[guest - offset:guest - offset + n]
            if kind == DATA:
                ext.read_data(host, n, part, local)
            elif kind == ZERO:
                part[:] = bytes(n)
            else:
                part[:] = self.read_backing(guest, n)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self._extent_end(offset, length)
        if end <= offset:
            return
        yield from self._merge(self._runs(offset, end - offset))

    def _runs(self, offset: int, length: int):
        for guest, n, kind, ext, host, dummy in self._pieces(offset, length):
            if kind == DATA and ext.kind == "FLAT":
                done = 0
                for hoff, hn, is_data in ext.host.data_extents(host, n):
                    yield guest + hoff - host, hn, ("flat", ext, is_data, hoff)
                    done = hoff + hn - host
                if done < n:       # past the end of the flat file: zeros
                    yield guest + done, n - done, ("flat", ext, False, host + done)
            elif kind == DATA:
                yield guest, n, ("sparse", ext, host, ext.compressed)
            else:
                yield guest, n, kind

    @staticmethod
    def _merge(runs) -> Iterator[Extent]:
        cur = None
        for guest, n, m in runs:
            if m == UNALLOCATED or m == ZERO:
                e = Extent(guest, n, m)
            elif m[0] == "flat":
                e = Extent(guest, n, DATA, m[3], reads_zero=not m[2])
            else:
                e = Extent(guest, n, DATA, None if m[3] or m[2] < 0 else m[2], compressed=m[3])
            if cur is not None and cur.kind == e.kind and cur.offset + cur.length == e.offset and (
                    e.kind != DATA or (cur.reads_zero == e.reads_zero and cur.compressed == e.compressed
                                       and (cur.host_offset is None and e.host_offset is None and e.compressed
                                            or cur.host_offset is not None and e.host_offset is not None
                                            and cur.host_offset + cur.length == e.host_offset))):
                cur = cur._replace(length=cur.length + e.length)
                continue
            if cur is not None:
                yield cur
            cur = e
        if cur is not None:
            yield cur

    # -- writing -----------------------------------------------------------------------------
    def _backing_reader(self, ext_start: int):
        if self.backing is None:
            return None
        return lambda off, n: self._padded_backing(ext_start + off, n)

    def _padded_backing(self, offset: int, n: int) -> bytes:
        avail = max(0, min(n, self.virtual_size - offset))
        data = self.read_backing(offset, avail) if avail else b""
        return data + bytes(n - len(data))

    def read_backing(self, offset: int, length: int) -> bytes:
        """Guest data from the parent, once its CID is checked against ``parentCID``: QEMU refuses
        to read through a parent whose content changed after this image was made."""
        if self.backing is not None and not self._cid_checked:
            parent_cid = getattr(self.backing, "cid", None)
            if parent_cid != self.parent_cid:
                raise CorruptImage("the parent's CID %s does not match parentCID %s: the backing file changed "
                                   "after this image was made" % (_hex(parent_cid), _hex(self.parent_cid)),
                                   path=self.path, field="parentCID")
            self._cid_checked = True
        return super().read_backing(offset, length)

    def write(self, offset: int, data) -> None:
        self._check_writable()
        self._new_cid()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        for guest, n, ext, local in self._parts(offset, len(view)):
            start = guest - local
            ext.write(local, view[guest - offset:guest - offset + n], self._backing_reader(start))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_writable()
        self._new_cid()
        self._check_range(offset, length)
        for guest, n, ext, local in self._parts(offset, length):
            if ext.kind == "SPARSE":
                ext.write_zeroes(local, n, self._backing_reader(guest - local), self.backing is not None)
            elif ext.kind == "FLAT":
                pos = 0
                while pos < n:
                    k = min(n - pos, 4 << 20)
                    ext.write(local + pos, bytes(k), None)
                    pos += k

    def _new_cid(self) -> None:
        """A new content ID in the descriptor before the first change, as QEMU writes one (children
        made against the old content then no longer match their ``parentCID``)."""
        if self._cid_updated or self._desc_raw is None:
            return
        self._cid_updated = True
        raw = self._desc_raw.split(b"\0", 1)[0]
        cid = random.getrandbits(32)
        new, count = re.subn(rb"(?m)^(\s*CID\s*=\s*)[0-9a-fA-F]*", b"CID=%x" % cid, raw, count=1)
        if not count:
            return
        if self._desc_room is None:
            self.host.pwrite(new, 0)
            if len(new) < len(self._desc_raw):
                self.host.truncate(len(new))
        elif len(new) <= self._desc_room:
            self.host.pwrite(new + bytes(max(0, len(raw) - len(new))), self._desc_at)
        else:
            return
        self._desc_raw = new
        self.cid = cid

    # compressed output (convert -c): only a stream-optimized image compresses, as with qemu-img
    def compress_block(self, data: bytes) -> Optional[bytes]:
        if not self.stream:
            return None
        return compress_grain(data, self.cluster_size)

    def write_compressed(self, offset: int, blocks) -> None:
        self._check_writable()
        self._new_cid()
        g_off = offset
        for data, payload in blocks:
            if payload is None or not self.stream:
                self.write(g_off, data)
            else:
                self._check_range(g_off, len(data))
                for dummy_guest, dummy_n, ext, local in self._parts(g_off, len(data)):
                    ext.start_writing()
                    ext.flush_pending(0)
                    ext.append_grain(local // ext.gb, payload)
            g_off += len(data)

    # -- metadata ----------------------------------------------------------------------------
    def structures(self) -> List[Tuple[str, int, Record]]:
        """The first sparse extent's header (and footer), as stored in that extent's file."""
        for dummy, ext in self.exts:
            if ext.kind == "SPARSE":
                own = ext.filename == self.path
                return [(title if own else "%s of %s" % (title, ext.filename), offset, rec)
                        for title, offset, rec in ext.structures()]
        return []

    def info(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.cluster_size:
            out["cluster-size"] = self.cluster_size
        extents = []
        for dummy, ext in self.exts:
            e: Dict[str, Any] = {}
            if ext.compressed:
                e["compressed"] = True
            e["virtual-size"] = ext.size
            e["filename"] = ext.filename
            if ext.cluster_bytes:
                e["cluster-size"] = ext.cluster_bytes
            e["format"] = ext.desc_type
            extents.append(e)
        out["format-specific"] = {"type": "vmdk", "data": {"cid": self.cid, "parent-cid": self.parent_cid,
                                                           "create-type": self.create_type, "extents": extents}}
        return out

    def referenced_files(self) -> List[Tuple[str, str]]:
        out = super().referenced_files()
        for dummy, ext in self.exts:
            if ext.filename and ext.filename != self.path:
                out.append(("extent", ext.filename))
        return out

    def check(self, repair: Optional[str] = None) -> CheckResult:
        """qemu-img's vmdk check: every allocated grain must lie inside its extent file.  Like
        qemu-img, the check stops at the first one that does not ("Check failed", exit 1)."""
        if repair:
            raise UnsupportedFeature("vmdk images cannot be repaired", path=self.path, field="-r")
        result = CheckResult(self.path, "vmdk")
        for start, ext in self.exts:
            if ext.kind != "SPARSE":
                continue
            seen = set()        # a table several directory entries share is checked once: bounded by the file
            for gdi in range(len(ext.gd)):
                if ext.gd[gdi] in seen:
                    continue
                table = ext.gt(gdi)
                if table is None:
                    continue
                seen.add(ext.gd[gdi])
                for idx, e in enumerate(table):
                    dummy, host = ext.classify(e)
                    if host is not None and host >= ext.file_size:
                        sector = (start + (gdi * ext.gtes + idx) * ext.gb) // SECTOR
                        raise CorruptImage("Check failed: cluster offset for sector %d points after EOF" % sector,
                                           path=self.path, field="grain table")
        return result

    def flush(self) -> None:
        if self.writable:
            for dummy, ext in self.exts:
                if ext.kind == "SPARSE":
                    ext.flush_pending(0)
                    ext.flush_out()
                if ext.host is not None:
                    ext.host.flush()
            self.host.flush()

    def close(self) -> None:
        if self.host.fd < 0:
            return
        try:
            if self.writable:
                for dummy, ext in self.exts:
                    if ext.kind == "SPARSE":
                        ext.finish()
                for dummy, ext in self.exts:
                    if ext.host is not None:
                        ext.host.flush()
                self.host.flush()
        finally:
            for dummy, ext in self.exts:
                if ext.host is not self.host:
                    ext.close()
                elif ext.kind == "SPARSE" and ext.pool is not None:
                    ext.pool.shutdown(wait=False, cancel_futures=True)
            self.host.close()
