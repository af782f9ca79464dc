"""The qcow2 snapshot table (docs/interop/qcow2.txt "Snapshots"): parsing and packing."""
import struct
from dataclasses import dataclass
from typing import List

from ...driver import MAX_SNAPSHOT_NAME
from ...errors import CorruptImage

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")   # up to and including extra_data_size (40 bytes)
EXTRA = struct.Struct(">QQQ")                   # vm_state_size_large, disk_size, icount
MAX_TABLE_SIZE = 64 * 1024 * 1024
MAX_EXTRA_DATA = 1024


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int = -1
    extra: bytes = b""          # the whole extra-data area, preserved (may hold fields we do not know)
    # id and name as stored: bytes that are not UTF-8 (shown as U+FFFD) are written back unchanged
    raw_id: bytes = b""
    raw_name: bytes = b""

    def stored_id(self) -> bytes:
        return _stored(self.raw_id, self.id)

    def stored_name(self) -> bytes:
        return _stored(self.raw_name, self.name)

    def to_info(self) -> dict:
        """SnapshotInfo with qemu-img's keys."""
        info = {"id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
                "date-sec": self.date_sec, "date-nsec": self.date_nsec,
                "vm-clock-sec": self.vm_clock_nsec // 1000000000,
                "vm-clock-nsec": self.vm_clock_nsec % 1000000000}
        if self.icount >= 0:
            info["icount"] = self.icount
        return info


def _stored(raw: bytes, text: str) -> bytes:
    """The bytes to store for *text*: the bytes it was read from while it still reads as them."""
    if raw and raw.decode("utf-8", "replace") == text:
        return raw
    return text.encode("utf-8")


def name_bytes(name: str) -> bytes:
    """What a new snapshot named *name* stores: its first MAX_SNAPSHOT_NAME bytes, as qemu-img keeps
    them (pstrcpy into QEMUSnapshotInfo.name), also when that cuts a character in two (its first
    bytes then show as U+FFFD, in qemu-img as in vdisk).  A name from the command line holding
    bytes that are not UTF-8 (decoded with surrogateescape) keeps those bytes."""
    return name.encode("utf-8", "surrogateescape")[:MAX_SNAPSHOT_NAME]


def parse_snapshot_table(data: bytes, count: int, path: str, virtual_size: int) -> List[Snapshot]:
    """Parse *count* snapshot entries from *data* (the table's bytes, bounded by MAX_TABLE_SIZE)."""
    out = []
    off = 0
    for index in range(count):
        if off + SNAPSHOT_HEADER.size > len(data):
            raise CorruptImage("snapshot table truncated at entry %d" % index, path=path, field="snapshots")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = SNAPSHOT_HEADER.unpack_from(data, off)
        off += SNAPSHOT_HEADER.size
        if extra_size > MAX_EXTRA_DATA:
            raise CorruptImage("Too much extra metadata in snapshot table entry %d" % index, path=path,
                               field="snapshots")
        extra = data[off:off + extra_size]
        off += extra_size
        disk_size = virtual_size
        icount = -1
        if extra_size >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if extra_size >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_size >= 24:
            icount = struct.unpack_from(">q", extra, 16)[0]
        ident = data[off:off + id_len]
        off += id_len
        name = data[off:off + name_len]
        off += name_len
        if off > len(data):
            raise CorruptImage("snapshot table truncated at entry %d" % index, path=path, field="snapshots")
        off = (off + 7) & ~7
        out.append(Snapshot(l1_off, l1_size, ident.decode("utf-8", "replace"), name.decode("utf-8", "replace"),
                            date_sec, date_nsec, vm_clock, vm_state, disk_size, icount, bytes(extra),
                            bytes(ident), bytes(name)))
    return out
