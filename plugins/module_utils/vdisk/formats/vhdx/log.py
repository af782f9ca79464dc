"""The VHDX metadata log: finding the active sequence of a dirty log and replaying it.

References: MS-VHDX 2.3 "Log" (entry header, zero and data descriptors, data sectors, the circular
buffer, replay); QEMU 7.2 block/vhdx-log.c for which entries it accepts: it scans the log sector
by sector, a valid entry (signature, length a multiple of 4 KiB within the log, non-zero sequence
number, the header's log GUID, descriptors fitting the entry, CRC-32C over the whole entry) starts
a sequence that later entries continue with consecutive sequence numbers, and the sequence whose
first entry has the highest number is replayed: data sectors are written (8 leading and 4
trailing bytes come from the descriptor), zero descriptors write zeros, the file is extended to
the entry's LastFileOffset. A descriptor with a bad signature, sequence number or alignment in an
otherwise valid entry makes QEMU refuse the image; so does FlushedFileOffset past the end of file.
Unlike QEMU, writes are confined to the file outside the header section and the log, and zero
ranges to the file's size, so a hostile log cannot grow the file without bound.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

from ...errors import CorruptImage
from . import header as hdr
from .crc32c import crc32c

SECTOR = hdr.LOG_SECTOR
Descriptor = Union[hdr.ZeroDescriptor, hdr.DataDescriptor]


@dataclass
class Entry:
    position: int                    # byte offset inside the log
    header: hdr.LogEntryHeader
    descriptors: List[Descriptor]
    data: List[bytes]                # the data sectors' raw 4 KiB, in descriptor order


class Log:
    """The log region ``[offset, offset+length)`` of an image read through *pread(length, offset)*."""

    def __init__(self, pread: Callable[[int, int], bytes], offset: int, length: int, log_guid: bytes,
                 path: Optional[str] = None):
        self.pread = pread
        self.offset = offset
        self.length = length
        self.log_guid = log_guid
        self.path = path

    def _sectors(self, pos: int, count: int) -> Tuple[bytes, int]:
        """*count* sectors from log position *pos*, wrapping around the circular buffer."""
        parts = []
        for dummy in range(count):
            parts.append(self.pread(SECTOR, self.offset + pos))
            pos = (pos + SECTOR) % self.length
        return b"".join(parts), pos

    def _header_ok(self, h: hdr.LogEntryHeader) -> bool:
        return (h.signature == hdr.LOG_SIGNATURE and h.entry_length <= self.length and h.entry_length % SECTOR == 0
                and h.entry_length > 0 and h.sequence_number != 0 and h.log_guid == self.log_guid
                and h.descriptor_count * hdr.DataDescriptor.SIZE <= h.entry_length)

    def read_entry(self, pos: int, prev_seq: int) -> Tuple[Optional[Entry], int]:
        """The entry at *pos* if valid (continuing *prev_seq* when non-zero), and the position after
        what was read (one sector on for a bad header, as QEMU moves on)."""
        if pos + hdr.LogEntryHeader.SIZE > self.length:
            pos = 0
        h = hdr.parse_log_header(self.pread(hdr.LogEntryHeader.SIZE, self.offset + pos))
        if not self._header_ok(h) or (prev_seq and h.sequence_number != prev_seq + 1):
            return None, (pos + SECTOR) % self.length
        nd = hdr.desc_sectors(h.descriptor_count)
        total = h.entry_length // SECTOR
        if nd > total:
            return None, (pos + SECTOR) % self.length
        head, after = self._sectors(pos, nd)
        descs = []
        for i in range(h.descriptor_count):
            d = hdr.parse_descriptor(head, i)
            bad = d.zero_length % SECTOR if isinstance(d, hdr.ZeroDescriptor) else d.data_signature != hdr.DESC_SIGNATURE
            if d.sequence_number != h.sequence_number or d.file_offset % SECTOR or bad:
                raise CorruptImage("log entry %d at log offset 0x%x has an invalid descriptor %d"
                                   % (h.sequence_number, pos, i), path=self.path, field="log")
            descs.append(d)
        rest, after = self._sectors(after, total - nd)
        # the CRC-32C of the whole entry, its checksum field counted as zeros
        at = hdr.LogEntryHeader.offset("checksum")
        crc = crc32c(rest, crc32c(head[at + 4:], crc32c(bytes(4), crc32c(head[:at]))))
        if crc != h.checksum:
            return None, after
        data = [rest[i * SECTOR:(i + 1) * SECTOR] for i in range(total - nd)]
        return Entry(pos, h, descs, data), after

    def active_sequence(self) -> List[Entry]:
        """The entries to replay (empty when none is valid), scanning the log as QEMU 7.2 does."""
        best: List[Entry] = []
        pos = 0
        while True:
            tail = pos
            entry, pos = self.read_entry(pos, 0)
            if entry is not None:
                seq = [entry]
                prev = 0             # QEMU accepts any valid entry as the second one
                while True:
                    nxt, after = self.read_entry(pos, prev)
                    if nxt is None or len(seq) * SECTOR > self.length:
                        pos = after
                        break
                    seq.append(nxt)
                    pos = after
                    prev = nxt.header.sequence_number
                if not best or seq[0].header.sequence_number > best[0].header.sequence_number:
                    best = seq
            if pos <= tail:
                return best


def replay_plan(entries: List[Entry], file_size: int, log_range: Tuple[int, int],
                path: Optional[str] = None) -> Tuple[List[Tuple[int, Optional[bytes], int]], int]:
    """``([(file offset, 4 KiB data or None for zeros, length)], new file size)`` of a replay, each
    write checked against the header section, the log and the file's reach."""
    writes = []
    size = file_size
    total = 0
    for e in entries:
        h = e.header
        if h.flushed_file_offset > file_size:
            raise CorruptImage("log entry %d: FlushedFileOffset %d is past the end of the file (%d); the image "
                               "has been truncated" % (h.sequence_number, h.flushed_file_offset, file_size),
                               path=path, field="log")
        limit = max(file_size, h.last_file_offset)
        data = iter(e.data)
        for d in e.descriptors:
            if isinstance(d, hdr.ZeroDescriptor):
                length = d.zero_length
                payload = None
            else:
                sector = next(data, None)
                s = None if sector is None else hdr.DataSector.unpack(sector)
                if s is None or s.data_signature != hdr.DATA_SIGNATURE or s.sequence_number != d.sequence_number:
                    raise CorruptImage("log entry %d has a data sector that does not match its descriptor"
                                       % h.sequence_number, path=path, field="log")
                length = SECTOR
                payload = d.leading_bytes + s.data + d.trailing
            end = d.file_offset + length
            if d.file_offset < hdr.HEADER_SECTION_END or end > limit or \
                    hdr.overlaps(d.file_offset, length, log_range[0], log_range[1]):
                raise CorruptImage("log entry %d writes 0x%x bytes at 0x%x: outside the file's metadata and data"
                                   % (h.sequence_number, length, d.file_offset), path=path, field="log")
            writes.append((d.file_offset, payload, length))
            total += length
            if total > 2 * limit + hdr.MiB:
                # a real log rewrites a few metadata sectors; zero descriptors over and over are hostile
                raise CorruptImage("log replay would write %d bytes into a %d-byte file" % (total, limit),
                                   path=path, field="log")
        if size < h.last_file_offset and h.last_file_offset % hdr.MiB:
            size = -(-h.last_file_offset // hdr.MiB) * hdr.MiB
    return writes, size
