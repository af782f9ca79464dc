"""The qcow2 snapshot table (docs/interop/qcow2.txt "Snapshots"): parsing and packing.

An entry is a fixed part (:class:`Snapshot`, QEMU's names for its fields), then extra data (of
which QEMU defines the first fields, :class:`SnapshotExtra`; the rest is kept as stored), the id,
the name and padding to 8 bytes.
"""
from typing import List

from ...driver import MAX_SNAPSHOT_NAME
from ...errors import CorruptImage
from ...structure import Record, disk, record
from ...structure import extra as extra_field        # this module's Snapshot has a field named extra
from .header import unpack_present

MAX_TABLE_SIZE = 64 * 1024 * 1024
MAX_EXTRA_DATA = 1024


@record(">")
class SnapshotExtra(Record):
    """The fields QEMU defines in a snapshot's extra data; an entry may store fewer of them (the
    absent ones then take the values of the fixed part, the image, or -1) or more bytes."""
    vm_state_size_large: int = disk("Q")
    disk_size: int = disk("Q")
    icount: int = disk("q", -1)               # -1: not recorded


@record(">")
class Snapshot(Record):
    """One snapshot table entry: the fixed part, then what follows it (not declared on disk: its
    sizes are), decoded.  ``pack`` gives the whole entry and sets the size fields to match it."""
    l1_table_offset: int = disk("Q", 0, shown="hex")
    l1_size: int = disk("I")
    id_str_size: int = disk("H")
    name_size: int = disk("H")
    date_sec: int = disk("I")
    date_nsec: int = disk("I")
    vm_clock_nsec: int = disk("Q")
    vm_state_size: int = disk("I")            # as stored: the whole size is in the extra data
    extra_data_size: int = disk("I")
    id: str = ""
    name: str = ""
    extra_fields: SnapshotExtra = extra_field(default_factory=SnapshotExtra)
    extra: bytes = b""          # the whole extra-data area, preserved (may hold fields we do not know)
    # id and name as stored: bytes that are not UTF-8 (shown as U+FFFD) are written back unchanged
    raw_id: bytes = b""
    raw_name: bytes = b""

    @property
    def disk_size(self) -> int:
        """The virtual disk size when the snapshot was taken."""
        return self.extra_fields.disk_size

    def stored_id(self) -> bytes:
        return _stored(self.raw_id, self.id)

    def stored_name(self) -> bytes:
        return _stored(self.raw_name, self.name)

    def to_info(self) -> dict:
        """SnapshotInfo with qemu-img's keys."""
        extra = self.extra_fields
        info = {"id": self.id, "name": self.name, "vm-state-size": extra.vm_state_size_large,
                "date-sec": self.date_sec, "date-nsec": self.date_nsec,
                "vm-clock-sec": self.vm_clock_nsec // 1000000000,
                "vm-clock-nsec": self.vm_clock_nsec % 1000000000}
        if extra.icount >= 0:
            info["icount"] = extra.icount
        return info

    def pack(self) -> bytes:
        """The whole entry as stored (id, name and unknown extra data preserved), padded to 8.
        The fields vdisk knows are refreshed in the extra data; a new entry gets QEMU's 24 bytes."""
        ident, name = self.stored_id(), self.stored_name()
        known = self.extra_fields.pack()
        extra = bytearray(self.extra) if self.extra else bytearray(len(known))
        n = min(len(extra), len(known))
        extra[:n] = known[:n]
        self.id_str_size, self.name_size, self.extra_data_size = len(ident), len(name), len(extra)
        self.vm_state_size = min(self.extra_fields.vm_state_size_large, 0xFFFFFFFF)
        out = Record.pack(self) + extra + ident + name
        return out + bytes(-len(out) % 8)

    @property
    def entry_size(self) -> int:
        """Bytes the entry takes in the table, as its size fields say."""
        size = self.SIZE + self.extra_data_size + self.id_str_size + self.name_size
        return size + (-size % 8)


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
        if off + Snapshot.SIZE > len(data):
            raise CorruptImage("snapshot table truncated at entry %d" % index, path=path, field="snapshots")
        s = Snapshot.unpack(data, off)
        off += Snapshot.SIZE
        if s.extra_data_size > MAX_EXTRA_DATA:
            raise CorruptImage("Too much extra metadata in snapshot table entry %d" % index, path=path,
                               field="snapshots")
        s.extra = bytes(data[off:off + s.extra_data_size])
        off += s.extra_data_size
        s.raw_id = bytes(data[off:off + s.id_str_size])
        off += s.id_str_size
        s.raw_name = bytes(data[off:off + s.name_size])
        off += s.name_size
        if off > len(data):
            raise CorruptImage("snapshot table truncated at entry %d" % index, path=path, field="snapshots")
        off = (off + 7) & ~7
        s.id, s.name = s.raw_id.decode("utf-8", "replace"), s.raw_name.decode("utf-8", "replace")
        s.extra_fields = unpack_present(SnapshotExtra, s.extra, len(s.extra),
                                        vm_state_size_large=s.vm_state_size, disk_size=virtual_size)
        out.append(s)
    return out


def pack_snapshot_table(snaps: List[Snapshot]) -> bytes:
    """Serialize snapshot entries (id, name and unknown extra data preserved), each padded to 8."""
    return b"".join(s.pack() for s in snaps)
