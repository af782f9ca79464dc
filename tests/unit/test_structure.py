"""The declarative structure mechanism (structure.py): one field table gives the dataclass, the
packing, the offsets of partial writes, the range checks and the dump."""
import struct
from typing import List

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.structure import Record, disk, extra, record


@record(">")
class Sample(Record):
    magic: int = disk("I", 0x51464900, shown="hex")
    version: int = disk("H", 3)
    flags: int = disk("B")
    pad: bytes = disk("1s")
    size: int = disk("Q")
    name: bytes = disk("8s", b"disk", shown="text")
    blocks: List[int] = extra(default_factory=list)     # not on disk


def test_layout_is_derived_from_the_declaration_order():
    assert Sample.SIZE == struct.calcsize(">IHB1sQ8s") == 24
    assert [Sample.offset(n) for n in ("magic", "version", "flags", "pad", "size", "name")] == [0, 4, 6, 7, 8, 16]
    assert Sample.LAYOUT.names == ["magic", "version", "flags", "pad", "size", "name"]


def test_pack_and_unpack_round_trip():
    s = Sample(size=1 << 40, flags=5)
    raw = s.pack()
    assert raw == struct.pack(">IHB1sQ8s", 0x51464900, 3, 5, b"\0", 1 << 40, b"disk")
    back = Sample.unpack(b"xx" + raw, 2, blocks=[1])
    assert back.size == 1 << 40
    assert back.flags == 5
    assert back.name == b"disk\0\0\0\0"
    assert back.blocks == [1] and Sample.unpack(raw).blocks == []


def test_pack_fields_gives_the_bytes_and_offset_of_adjacent_fields():
    s = Sample(version=2, flags=1)
    assert s.pack_fields("version", "flags") == (struct.pack(">HB", 2, 1), 4)
    assert s.pack_fields("size") == (struct.pack(">Q", 0), 8)
    with pytest.raises(ValueError, match="not adjacent"):
        s.pack_fields("magic", "flags")


@pytest.mark.parametrize("name, value", [("flags", 256), ("version", -1), ("size", 1 << 64), ("magic", "x")])
def test_a_value_that_does_not_fit_names_its_field(name, value):
    s = Sample(**{name: value})
    with pytest.raises(ImageError) as exc:
        s.pack()
    assert exc.value.field == name
    assert "Sample.%s" % name in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ImageError):
        s.pack_fields(name)


def test_dump_shows_each_field_at_its_file_offset():
    lines = Sample(size=512).dump(base=0x1000)
    assert lines[0].split() == ["0x1000", "magic", "0x51464900"]
    assert lines[4].split() == ["0x1008", "size", "512"]
    assert lines[5].split() == ["0x1010", "name", "'disk'"]
    assert lines[3].split()[1:] == ["pad", "0", "x", "1", "bytes"]
