"""An open VHDX image: headers, log, region table, metadata and BAT; reads and logged writes.

References: MS-VHDX; QEMU 7.2 block/vhdx.c and vhdx-log.c for behaviour. Open validates, in
QEMU's order, the file identifier, both headers (the current one is the valid one with the higher
sequence number), the log (a dirty log is replayed on a read-write open and refused read-only
with QEMU's advice), the region table, the metadata and the BAT; every table is bounded by the
file's size before it is read. Payload blocks in the states NOT_PRESENT, UNDEFINED, ZERO and
UNMAPPED read as zeros, FULLY_PRESENT ones from the file; PARTIALLY_PRESENT needs a parent, which
QEMU and vdisk do not support. Writes allocate a block as QEMU does (at the end of the file
rounded up to 1 MiB, the file extended by one block, so the rest of the block reads as zeros),
write and flush the data, and then update the BAT through the log: a log GUID set in both
headers (once per session), the log entry written and flushed, the BAT sectors written; the GUID
is cleared when the log is full (after a flush) and at close. QEMU sets and clears a GUID around
every entry (four header writes per new block); keeping one sequence per session is what the
specification describes and what Hyper-V does. An interruption leaves either the old BAT (an
unreferenced block at the end of the file) or a log whose replay (by vdisk or qemu-img) gives
the new one. The first guest-visible write sets a new DataWriteGuid, as the specification asks.
"""
import array
import sys
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ...block_table import BlockTableImage
from ...driver import CheckResult, Policy
from ...errors import CorruptImage, FormatError, ImageError, UnsupportedFeature
from ...structure import Record
from . import header as hdr
from .log import Log, replay_plan

MiB = hdr.MiB


class VhdxImage(BlockTableImage):
    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self.policy = policy
        self.session_guid = uuid.uuid4().bytes
        self.first_visible_write = True
        self.log_replayed = False
        self.log_sequence = 1
        self.log_guid: Optional[bytes] = None    # set in the headers by this session's writes
        self.log_pos = 0                         # where the next entry goes inside the log
        self.log_pending = False                 # an entry is written but its BAT sectors are not
        self._open_host(policy)

    # -- open -----------------------------------------------------------------------------
    def _open(self) -> None:
        file_size = self.host.size()
        if hdr.FileIdentifier.unpack(self.host.pread(hdr.FileIdentifier.SIZE, 0)).signature != hdr.FILE_SIGNATURE:
            raise FormatError("not a VHDX image (no 'vhdxfile' signature)", path=self.path, field="file identifier")
        h1 = hdr.parse_header(self.host.pread(hdr.HEADER_SIZE, hdr.HEADER1_OFFSET))
        h2 = hdr.parse_header(self.host.pread(hdr.HEADER_SIZE, hdr.HEADER2_OFFSET))
        self.cur = hdr.pick_header(h1, h2, self.path)
        self.headers = [h1 or h2, h2 or h1]
        h = self.header
        if h.log_offset < hdr.HEADER_SECTION_END or h.log_offset % MiB:
            raise CorruptImage("log offset 0x%x is not a multiple of 1 MiB past the header section" % h.log_offset,
                               path=self.path, field="log_offset")
        if h.log_version != 0:
            raise CorruptImage("log version %d is not supported (only 0)" % h.log_version, path=self.path,
                               field="log_version")
        if h.log_length % MiB:
            raise CorruptImage("log length %d is not a multiple of 1 MiB" % h.log_length, path=self.path,
                               field="log_length")
        self.log_range = (h.log_offset, h.log_length)
        if h.log_guid != hdr.ZERO_GUID and h.log_length:
            self._parse_log(file_size)
            file_size = self.host.size()
        bat, meta = hdr.parse_region_table(self.host.pread(hdr.REGION_TABLE_SIZE, hdr.REGION1_OFFSET), self.path)
        for r in (bat, meta):
            if hdr.overlaps(r.file_offset, r.length, h.log_offset, h.log_length):
                raise CorruptImage("the %s region overlaps the log" % ("BAT" if r is bat else "metadata"),
                                   path=self.path, field="region table")
        self.bat_region, self.meta_region = bat, meta
        self.md = self._parse_metadata(meta, file_size)
        self.bs = self.md.block_size
        self.cluster_size = self.bs
        # a new block's zero ranges are holes of the grown file: convert need not write them
        self.allocation_unit = 4096
        self.virtual_size = self.md.virtual_disk_size
        self.ratio = hdr.chunk_ratio(self.bs, self.md.logical_sector_size)
        entries = hdr.bat_entries(self.virtual_size, self.bs, self.ratio)
        if entries * 8 > bat.length:
            raise CorruptImage("the BAT region (%d bytes) is too small for %d entries" % (bat.length, entries),
                               path=self.path, field="BAT")
        # only the entries that map blocks are held (QEMU 7.2 counts ~8 Mi entries for a 0-byte image)
        self.blocks = -(-self.virtual_size // self.bs)
        used = hdr.bat_index(self.blocks - 1, self.ratio) + 1 if self.blocks else 0
        if bat.file_offset + used * 8 > file_size:
            raise CorruptImage("the BAT (%d entries at 0x%x) extends past the end of the file (%d bytes)"
                               % (used, bat.file_offset, file_size), path=self.path, field="BAT")
        self.bat = array.array("Q", bytes(8)) * used     # read in place: one copy of the table in memory
        if used:
            self.host.pread_into(memoryview(self.bat).cast("B"), bat.file_offset)
        if sys.byteorder != "little":
            self.bat.byteswap()
        self.bat_errors = self._check_bat(file_size)
        if self.bat_errors and not (self.policy.repair or self.policy.check):
            raise CorruptImage(self.bat_errors[0], path=self.path, field="BAT")

    @property
    def header(self) -> hdr.Header:
        return self.headers[self.cur]

    def _parse_log(self, file_size: int) -> None:
        h = self.header
        if h.log_offset + h.log_length > file_size:
            raise CorruptImage("the log (0x%x bytes at 0x%x) extends past the end of the file"
                               % (h.log_length, h.log_offset), path=self.path, field="log")
        entries = Log(self.host.pread, h.log_offset, h.log_length, h.log_guid, self.path).active_sequence()
        if not entries:
            return
        if not self.writable:
            raise CorruptImage("VHDX image file '%s' opened read-only, but contains a log that needs to be replayed; "
                               "to replay the log, run: vdisk check -r all '%s' (qemu-img check -r all)"
                               % (self.path, self.path), field="log")
        writes, new_size = replay_plan(entries, file_size, self.log_range, self.path)
        self._user_visible_write()
        for offset, data, length in writes:
            if data is None:
                self.host.write_zeroes_full(offset, length)
            else:
                self.host.pwrite(data, offset)
        if new_size > self.host.size():
            self.host.truncate(new_size)
        self.host.flush()
        self._update_headers(False, hdr.ZERO_GUID)
        self.log_replayed = True

    def _parse_metadata(self, meta: hdr.RegionTableEntry, file_size: int) -> hdr.Metadata:
        if meta.file_offset + hdr.METADATA_TABLE_SIZE > file_size:
            raise CorruptImage("the metadata region at 0x%x is past the end of the file" % meta.file_offset,
                               path=self.path, field="metadata")
        items = hdr.parse_metadata_table(self.host.pread(hdr.METADATA_TABLE_SIZE, meta.file_offset), meta.length,
                                         self.path)
        raw = {guid: self.host.pread(min(length, 64), meta.file_offset + offset)
               for guid, (offset, length) in items.items()}
        return hdr.parse_metadata_items(raw, hdr.PARENT_LOCATOR_GUID in items, self.path)

    def _check_bat(self, file_size: int) -> List[str]:
        """QEMU's checks of present blocks: inside the file, clear of the header section, log, BAT and
        metadata; one message per bad entry."""
        errors = []
        regions = [(0, hdr.HEADER_SECTION_END), self.log_range,
                   (self.bat_region.file_offset, self.bat_region.length),
                   (self.meta_region.file_offset, self.meta_region.length)]
        for i in self._present_entries():
            offset = self.bat[i] & hdr.BAT_OFFSET_MASK
            block = i - i // (self.ratio + 1)
            length = min(self.bs, self.virtual_size - block * self.bs)
            if (i + 1) % (self.ratio + 1) == 0:
                continue                       # a sector bitmap entry: no payload
            if offset >= file_size:
                errors.append("VHDX BAT entry %d start offset %d points after end of file (%d). Image has probably "
                              "been truncated." % (i, offset, file_size))
            elif offset + length > file_size:
                errors.append("VHDX BAT entry %d end offset %d points after end of file (%d). Image has probably "
                              "been truncated." % (i, offset + length - 1, file_size))
            elif any(hdr.overlaps(offset, self.bs, a, n) for a, n in regions):
                errors.append("VHDX BAT entry %d offset %d overlaps the image's metadata" % (i, offset))
        return errors

    def _present_entries(self) -> Iterator[int]:
        """Indices of FULLY_PRESENT entries; all-zero stretches of the BAT are skipped at C speed."""
        raw = memoryview(self.bat).cast("B")
        chunk = 8192
        zeros = bytes(8 * chunk)
        for start in range(0, len(self.bat), chunk):
            part = raw[8 * start:8 * (start + chunk)].tobytes()    # bytes compare with memcmp
            if part == zeros[:len(part)]:
                continue
            for i in range(start, min(start + chunk, len(self.bat))):
                if self.bat[i] & hdr.BAT_STATE_MASK == hdr.PAYLOAD_BLOCK_FULLY_PRESENT:
                    yield i

    # -- mapping ------------------------------------------------------------------------------
    def _block_host(self, index: int) -> Optional[int]:
        """Host offset of payload block *index*, None when it reads as zeros."""
        e = self.bat[hdr.bat_index(index, self.ratio)]
        state = e & hdr.BAT_STATE_MASK
        if state == hdr.PAYLOAD_BLOCK_FULLY_PRESENT:
            return e & hdr.BAT_OFFSET_MASK
        if state in hdr.ZERO_STATES:
            return None
        raise CorruptImage("payload block %d has state %d (%s), which needs a parent image" % (
            index, state, "PARTIALLY_PRESENT" if state == hdr.PAYLOAD_BLOCK_PARTIALLY_PRESENT else "invalid"),
            path=self.path, field="BAT")

    # -- writes ------------------------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        view = self._write_view(offset, data)
        if not len(view):
            return
        self._user_visible_write()
        end = offset + len(view)
        pos = offset
        changed: List[int] = []
        try:
            while pos < end:
                block = pos // self.bs
                stop = min(end, (block + 1) * self.bs)
                chunk = view[pos - offset:stop - offset]
                host = self._block_host(block)
                if host is None:
                    host = self._allocate(block)
                    changed.append(hdr.bat_index(block, self.ratio))
                self.host.pwrite(chunk, host + pos % self.bs)
                pos = stop
        finally:
            if changed:
                self._log_bat(changed)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Blocks that read as zeros stay as they are; present ranges get zero bytes."""
        self._check_writable()
        self._check_range(offset, length)
        for dummy, n, host in self._runs(offset, length):
            if host is None:
                continue
            self._user_visible_write()
            self.host.write_zeroes_full(host, n)

    def _allocate(self, block: int) -> int:
        """A new block at the end of the file (1 MiB aligned); the file grows by the block, so all of
        it reads as zeros. The BAT entry changes in memory only: the caller logs it."""
        if self.header.log_length < 2 * hdr.LOG_SECTOR:
            raise UnsupportedFeature("the image has no log, so its BAT cannot be updated safely", path=self.path,
                                     field="log_length")
        start = -(-self.host.size() // MiB) * MiB
        if start >> 64:
            raise ImageError("the image file cannot grow further", path=self.path, field="BAT")
        self.host.truncate(start + self.bs)
        self.bat[hdr.bat_index(block, self.ratio)] = start | hdr.PAYLOAD_BLOCK_FULLY_PRESENT
        return start

    def _log_bat(self, indices: List[int]) -> None:
        """Write the BAT sectors holding *indices* through the log, as QEMU does for each entry."""
        base = self.bat_region.file_offset
        sectors = sorted({(i * 8) // hdr.LOG_SECTOR for i in indices})
        # one entry must leave a sector of the circular log free: header sector + data sectors
        per_entry = max(1, min(126, self.header.log_length // hdr.LOG_SECTOR - 2))
        for k in range(0, len(sectors), per_entry):
            batch = []
            for s in sectors[k:k + per_entry]:
                buf = bytearray(self.host.pread(hdr.LOG_SECTOR, base + s * hdr.LOG_SECTOR))
                first = s * hdr.LOG_SECTOR // 8
                part = self.bat[first:first + hdr.LOG_SECTOR // 8]
                if sys.byteorder != "little":
                    part.byteswap()
                raw = part.tobytes()
                buf[:len(raw)] = raw
                batch.append((base + s * hdr.LOG_SECTOR, bytes(buf)))
            self._log_write(batch)

    def _log_write(self, sectors: List[Tuple[int, bytes]]) -> None:
        """One log entry for *sectors*, then the sectors themselves. The log GUID stays set while the
        image is open and entries follow each other (sequence numbers +1, tail 0: one sequence from
        the log's start), so a crash replays all of them, in order, to the same result; when the log
        is full, or at close, the applied entries are retired by clearing the GUID (a new GUID
        invalidates every older entry, so stale entries are never mistaken for a sequence)."""
        h = self.header
        size = (hdr.desc_sectors(len(sectors)) + len(sectors)) * hdr.LOG_SECTOR
        if self.log_guid is not None and self.log_pos + size > h.log_length - hdr.LOG_SECTOR:
            self._retire_log()
        self.host.flush()                      # the data blocks are stable before the log refers to them
        if self.log_guid is None:
            self.log_guid = uuid.uuid4().bytes
            self.log_pos = 0
            self._update_headers(False, self.log_guid)
        entry = hdr.pack_log_entry(self.log_sequence, 0, self.log_guid, self.host.size(), sectors)
        self.log_sequence += 1
        self.log_pending = True
        self.host.pwrite(entry, h.log_offset + self.log_pos)
        self.host.flush()
        self.log_pos += size
        for offset, data in sectors:
            self.host.pwrite(data, offset)
        self.log_pending = False

    def _retire_log(self) -> None:
        """Make the applied entries stable and clear the log GUID: the log is empty again."""
        self.host.flush()
        self._update_headers(False, hdr.ZERO_GUID)
        self.log_guid = None

    def _user_visible_write(self) -> None:
        if self.first_visible_write:
            self.first_visible_write = False
            self._update_headers(True, None)

    def _update_headers(self, new_data_guid: bool, log_guid: Optional[bytes]) -> None:
        """Both headers in turn, as the specification asks: the inactive one gets the next sequence
        number and becomes current."""
        for dummy in range(2):
            idx = 1 - self.cur
            active = self.header
            new = active.replace(sequence_number=(active.sequence_number + 1) & 0xFFFFFFFFFFFFFFFF,
                                 file_write_guid=self.session_guid)
            if new_data_guid:
                new.data_write_guid = uuid.uuid4().bytes
            if log_guid is not None:
                new.log_guid = log_guid
            at = hdr.HEADER2_OFFSET if idx else hdr.HEADER1_OFFSET
            # the reserved bytes after the fields, as this header slot holds them
            reserved = self.host.pread(hdr.HEADER_SIZE - hdr.Header.SIZE, at + hdr.Header.SIZE)
            self.host.pwrite(new.pack(reserved), at)
            self.host.flush()
            self.headers[idx] = new
            self.cur = idx

    # -- metadata -----------------------------------------------------------------------------
    def structures(self) -> List[Tuple[str, int, Record]]:
        """The file identifier, both headers, the first region table, the metadata table and its
        known items, as stored (an invalid header too: the dump shows what is there)."""
        out: List[Tuple[str, int, Record]] = [
            ("file identifier", 0, hdr.FileIdentifier.unpack(self.host.pread(hdr.FileIdentifier.SIZE, 0)))]
        for n, at in enumerate((hdr.HEADER1_OFFSET, hdr.HEADER2_OFFSET), 1):
            out.append(("header %d" % n, at, hdr.Header.unpack(self.host.pread(hdr.Header.SIZE, at))))
        out.extend(self._table_structures("region table", hdr.REGION1_OFFSET, hdr.REGION_TABLE_SIZE,
                                          hdr.RegionTableHeader, hdr.region_entries, hdr.region_entry_offset))
        meta = self.meta_region.file_offset
        tables = self._table_structures("metadata table", meta, hdr.METADATA_TABLE_SIZE, hdr.MetadataTableHeader,
                                        hdr.metadata_entries, hdr.metadata_entry_offset)
        out.extend(tables)
        for dummy, dummy2, entry in tables[1:]:
            name, rec = hdr.METADATA_ITEMS.get(entry.item_id, ("", None))
            if rec is not None:
                at = meta + entry.item_offset
                out.append(("metadata item: %s" % name, at, rec.unpack(self.host.pread(rec.SIZE, at))))
        return out

    def _table_structures(self, title: str, offset: int, size: int, head_type: Any,
                          entries: Callable[[bytes, int], List[Any]],
                          entry_offset: Callable[[int], int]) -> List[Tuple[str, int, Any]]:
        """A table's header and its entries (both tables hold at most 2047, checked at open)."""
        buf = self.host.pread(size, offset)
        head = head_type.unpack(buf)
        out = [(title, offset, head)]
        for i, entry in enumerate(entries(buf, min(head.entry_count, hdr.MAX_REGION_ENTRIES))):
            out.append(("%s entry %d" % (title, i), offset + entry_offset(i), entry))
        return out

    def info(self) -> Dict[str, Any]:
        return {"cluster-size": self.bs}

    def check(self, repair: Optional[str] = None) -> CheckResult:
        """QEMU's check: a replayed log counts as a fixed corruption, bad BAT entries as corruptions."""
        result = CheckResult(self.path, self.driver.name)
        if self.log_replayed:
            result.corruptions_fixed = 1
        errors = self._check_bat(self.host.size())
        result.corruptions = len(errors)
        result.messages.extend(errors)
        return result

    def _close_writes(self) -> None:
        # an entry whose sectors were not all written stays in the log, for the next open to replay
        if self.log_guid is not None and not self.log_pending:
            self._retire_log()
        self.host.flush()
