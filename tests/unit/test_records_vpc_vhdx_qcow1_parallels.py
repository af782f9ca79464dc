"""The vpc, vhdx, qcow (v1) and parallels on-disk structures as declared records (structure.py): their
layouts are the specifications', records read from qemu-img's images pack back to the same bytes,
checksums are computed over the packed bytes, partial writes land on the spec's offsets, a log
entry survives a round trip through the log reader, and ``vdisk inspect --dump`` shows a
qemu-written image of each format."""
import struct

import pytest

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.parallels import header as par
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow import header as qcow
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vhdx import header as vhdx
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vhdx.crc32c import checksum as crc
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vhdx.log import Log, replay_plan
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vpc import header as vpc
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.inspect import dump_structures

MiB = 1024 * 1024

# (field, offset, width) of each structure, from its specification
SPEC = [
    (vpc.Footer, [("cookie", 0, 8), ("features", 8, 4), ("file_format_version", 12, 4), ("data_offset", 16, 8),
                  ("time_stamp", 24, 4), ("creator_application", 28, 4), ("creator_version", 32, 4),
                  ("creator_host_os", 36, 4), ("original_size", 40, 8), ("current_size", 48, 8),
                  ("cylinders", 56, 2), ("heads", 58, 1), ("sectors_per_track", 59, 1), ("disk_type", 60, 4),
                  ("checksum", 64, 4), ("unique_id", 68, 16), ("saved_state", 84, 1), ("reserved", 85, 427)]),
    (vpc.DynHeader, [("cookie", 0, 8), ("data_offset", 8, 8), ("table_offset", 16, 8), ("header_version", 24, 4),
                     ("max_table_entries", 28, 4), ("block_size", 32, 4), ("checksum", 36, 4),
                     ("parent_unique_id", 40, 16), ("parent_time_stamp", 56, 4), ("reserved", 60, 4),
                     ("parent_unicode_name", 64, 512), ("parent_locator_entries", 576, 192), ("reserved2", 768, 256)]),
    (vpc.ParentLocatorEntry, [("platform_code", 0, 4), ("platform_data_space", 4, 4), ("platform_data_length", 8, 4),
                              ("reserved", 12, 4), ("platform_data_offset", 16, 8)]),
    (vhdx.FileIdentifier, [("signature", 0, 8), ("creator", 8, 512)]),
    (vhdx.Header, [("signature", 0, 4), ("checksum", 4, 4), ("sequence_number", 8, 8), ("file_write_guid", 16, 16),
                   ("data_write_guid", 32, 16), ("log_guid", 48, 16), ("log_version", 64, 2), ("version", 66, 2),
                   ("log_length", 68, 4), ("log_offset", 72, 8)]),
    (vhdx.RegionTableHeader, [("signature", 0, 4), ("checksum", 4, 4), ("entry_count", 8, 4), ("reserved", 12, 4)]),
    (vhdx.RegionTableEntry, [("guid", 0, 16), ("file_offset", 16, 8), ("length", 24, 4), ("required", 28, 4)]),
    (vhdx.MetadataTableHeader, [("signature", 0, 8), ("reserved", 8, 2), ("entry_count", 10, 2),
                                ("reserved2", 12, 20)]),
    (vhdx.MetadataTableEntry, [("item_id", 0, 16), ("item_offset", 16, 4), ("length", 20, 4), ("flags", 24, 4),
                               ("reserved2", 28, 4)]),
    (vhdx.FileParameters, [("block_size", 0, 4), ("flags", 4, 4)]),
    (vhdx.ParentLocatorHeader, [("locator_type", 0, 16), ("reserved", 16, 2), ("key_value_count", 18, 2)]),
    (vhdx.ParentLocatorEntry, [("key_offset", 0, 4), ("value_offset", 4, 4), ("key_length", 8, 2),
                               ("value_length", 10, 2)]),
    (vhdx.LogEntryHeader, [("signature", 0, 4), ("checksum", 4, 4), ("entry_length", 8, 4), ("tail", 12, 4),
                           ("sequence_number", 16, 8), ("descriptor_count", 24, 4), ("reserved", 28, 4),
                           ("log_guid", 32, 16), ("flushed_file_offset", 48, 8), ("last_file_offset", 56, 8)]),
    (vhdx.ZeroDescriptor, [("zero_signature", 0, 4), ("reserved", 4, 4), ("zero_length", 8, 8),
                           ("file_offset", 16, 8), ("sequence_number", 24, 8)]),
    (vhdx.DataDescriptor, [("data_signature", 0, 4), ("trailing_bytes", 4, 4), ("leading_bytes", 8, 8),
                           ("file_offset", 16, 8), ("sequence_number", 24, 8)]),
    (vhdx.DataSector, [("data_signature", 0, 4), ("sequence_high", 4, 4), ("data", 8, 4084),
                       ("sequence_low", 4092, 4)]),
    (qcow.Header, [("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8), ("backing_file_size", 16, 4),
                   ("mtime", 20, 4), ("size", 24, 8), ("cluster_bits", 32, 1), ("l2_bits", 33, 1),
                   ("padding", 34, 2), ("crypt_method", 36, 4), ("l1_table_offset", 40, 8)]),
    (par.Header, [("magic", 0, 16), ("version", 16, 4), ("heads", 20, 4), ("cylinders", 24, 4), ("tracks", 28, 4),
                  ("nb_bat_entries", 32, 4), ("nb_sectors", 36, 8), ("in_use", 44, 4), ("data_off", 48, 4),
                  ("flags", 52, 4), ("ext_off", 56, 8)]),
    (par.ExtensionHeader, [("magic", 0, 8), ("check_sum", 8, 16)]),
    (par.FeatureHeader, [("magic", 0, 8), ("flags", 8, 8), ("data_size", 16, 4), ("unused32", 20, 4)]),
    (par.DirtyBitmapFeature, [("size", 0, 8), ("id", 8, 16), ("granularity", 24, 4), ("l1_size", 28, 4)]),
]


@pytest.mark.parametrize("cls, fields", SPEC, ids=[c.__module__.split(".")[-2] + "." + c.__name__ for c, f in SPEC])
def test_layout_is_the_spec_s(cls, fields):
    assert [(n, cls.offset(n), cls.LAYOUT.structs[n].size) for n in cls.LAYOUT.names] == fields
    assert cls.SIZE == fields[-1][1] + fields[-1][2]


def test_module_sizes_are_derived_from_the_records():
    assert (vpc.FOOTER_SIZE, vpc.DYN_HEADER_SIZE, qcow.HEADER_SIZE, par.HEADER_SIZE) == (512, 1024, 48, 64)
    assert (vhdx.HEADER.size, vhdx.LOG_HEADER.size, vhdx.LOG_DESC.size, vhdx.DataSector.SIZE) == (80, 64, 32, 4096)
    assert [vhdx.desc_sectors(n) for n in (0, 126, 127, 254)] == [1, 1, 2, 2]


@pytest.mark.parametrize("record", [
    vpc.Footer(current_size=10 * MiB, cylinders=300, heads=4, sectors_per_track=17, unique_id=bytes(range(16))),
    vpc.DynHeader(max_table_entries=5),
    vpc.ParentLocatorEntry(b"W2ku", 1, 40, 0, 0x1600),
    vhdx.RegionTableEntry(vhdx.BAT_GUID, 3 * MiB, MiB, 1),
    vhdx.MetadataTableEntry(vhdx.PAGE83_GUID, 0x10010, 16, vhdx.META_IS_REQUIRED),
    vhdx.ZeroDescriptor(zero_length=8192, file_offset=2 * MiB, sequence_number=7),
    vhdx.DataDescriptor(trailing_bytes=0xAABBCCDD, leading_bytes=b"12345678", file_offset=MiB, sequence_number=3),
    qcow.Header(size=5 * MiB, backing_file_offset=48, backing_file_size=8, l1_table_offset=56),
    par.Header(nb_bat_entries=9, nb_sectors=9 * 2048, in_use=par.INUSE_MAGIC, data_off=2048),
    par.DirtyBitmapFeature(2048, bytes(range(16)), 128, 1),
])
def test_records_round_trip(record):
    raw = record.pack()
    assert len(raw) == type(record).SIZE
    assert type(record).unpack(b"\xaa" + raw, 1) == record


def test_checksums_are_computed_over_the_packed_bytes():
    footer = vpc.new_footer(10 * MiB, (300, 4, 17), False, False)
    raw = footer.pack()
    assert vpc.checksum(raw, 64) == footer.checksum == struct.unpack_from(">I", raw, 64)[0]
    assert vpc.parse_footer(raw) == footer
    dyn = vpc.DynHeader(max_table_entries=5)
    raw = dyn.pack()
    assert vpc.checksum(raw, 36) == struct.unpack_from(">I", raw, 36)[0] == dyn.checksum
    h = vhdx.Header(sequence_number=3)
    raw = h.pack(b"\x01" * 16)
    assert len(raw) == vhdx.HEADER_SIZE and raw[80:96] == b"\x01" * 16
    assert crc(raw, 4) == h.checksum and vhdx.parse_header(raw) == h
    table = vhdx.pack_region_table([vhdx.RegionTableEntry(vhdx.BAT_GUID, 2 * MiB, MiB),
                                    vhdx.RegionTableEntry(vhdx.METADATA_GUID, 3 * MiB, MiB)])
    assert len(table) == vhdx.REGION_TABLE_SIZE and crc(table, 4) == struct.unpack_from("<I", table, 4)[0]
    assert [r.file_offset for r in vhdx.parse_region_table(table)] == [2 * MiB, 3 * MiB]


def test_parallels_in_use_is_written_at_its_spec_offset():
    h = par.Header(in_use=par.INUSE_MAGIC)
    assert h.pack_fields("in_use") == (struct.pack("<I", par.INUSE_MAGIC), 44)


def test_vpc_parent_locator_entries_inside_the_dynamic_header():
    entries = vpc.ParentLocatorEntry(b"W2ku", 1, 8, 0, 0x1600).pack() + bytes(24) * 6 + \
        vpc.ParentLocatorEntry(b"MacX", 1, 0, 0, 0x1800).pack()         # no data: not used
    dyn = vpc.DynHeader(parent_locator_entries=entries)
    (loc,) = dyn.parent_locators()
    assert (loc.platform_data_offset, loc.decode("a\0b\0".encode())) == (0x1600, "ab")
    assert vpc.DynHeader.locator_offset(1) == 576 + 24
    assert vpc.DynHeader.unpack(dyn.pack()).locator_entry(7).platform_code == b"MacX"


def test_log_entry_round_trip():
    """An entry packed by vdisk is found by the log reader, and its replay writes the sectors back
    (the 8 leading and 4 trailing bytes travel in the descriptor)."""
    guid = bytes(range(1, 17))
    sectors = [(3 * MiB, bytes(range(256)) * 16), (3 * MiB + 8192, b"\xee" * 4096)]
    entry = vhdx.pack_log_entry(5, 0, guid, 4 * MiB, sectors)
    assert len(entry) == 3 * vhdx.LOG_SECTOR and crc(entry, 4) == struct.unpack_from("<I", entry, 4)[0]
    log = bytearray(MiB)
    log[:len(entry)] = entry
    found = Log(lambda n, at: bytes(log[at:at + n]), 0, len(log), guid).active_sequence()
    assert [e.header.sequence_number for e in found] == [5]
    assert [type(d) for d in found[0].descriptors] == [vhdx.DataDescriptor] * 2
    writes, size = replay_plan(found, 4 * MiB, (MiB, MiB))
    assert writes == [(offset, data, 4096) for offset, data in sectors] and size == 4 * MiB


def test_log_zero_descriptor_is_read_as_one():
    buf = bytearray(vhdx.LOG_SECTOR)
    buf[vhdx.descriptor_offset(0):vhdx.descriptor_offset(1)] = vhdx.ZeroDescriptor(zero_length=4096).pack()
    assert vhdx.parse_descriptor(buf, 0) == vhdx.ZeroDescriptor(zero_length=4096)
    assert isinstance(vhdx.parse_descriptor(buf, 1), vhdx.DataDescriptor)


# -- qemu-img's images ----------------------------------------------------------------------------
def qemu_create(tmp_path, fmt, name, size, *options):
    path = str(tmp_path / name)
    helpers.qemu_img("create", "-q", "-f", fmt, *options, path, size, check=True)
    with open(path, "rb") as f:
        return path, f.read()


def test_vpc_records_pack_back_to_qemu_img_s_bytes(tmp_path):
    path, data = qemu_create(tmp_path, "vpc", "d.vhd", "10M")
    footer = vpc.parse_footer(data[:512])
    assert footer.pack() == data[:512] == data[-512:]
    dyn = vpc.parse_dyn_header(data[512:1536], footer.virtual_sectors)
    assert dyn.pack() == data[512:1536]
    path, data = qemu_create(tmp_path, "vpc", "f.vhd", "10M", "-o", "subformat=fixed")
    assert vpc.parse_footer(data[-512:]).pack() == data[-512:]


def test_vhdx_records_pack_back_to_qemu_img_s_bytes(tmp_path):
    path, data = qemu_create(tmp_path, "vhdx", "a.vhdx", "20M", "-o", "block_size=1M")
    for at in (vhdx.HEADER1_OFFSET, vhdx.HEADER2_OFFSET):
        block = data[at:at + vhdx.HEADER_SIZE]
        assert vhdx.parse_header(block).pack(block[vhdx.Header.SIZE:]) == block
    table = data[vhdx.REGION1_OFFSET:vhdx.REGION1_OFFSET + vhdx.REGION_TABLE_SIZE]
    entries = vhdx.region_entries(table, vhdx.RegionTableHeader.unpack(table).entry_count)
    assert vhdx.pack_region_table(entries) == table
    bat, meta = vhdx.parse_region_table(table)
    raw = data[meta.file_offset:meta.file_offset + vhdx.METADATA_TABLE_SIZE]
    entries = vhdx.metadata_entries(raw, vhdx.MetadataTableHeader.unpack(raw).entry_count)
    assert vhdx.pack_metadata_table(entries) == raw
    for e in entries:
        name, rec = vhdx.METADATA_ITEMS[e.item_id]
        item = data[meta.file_offset + e.item_offset:meta.file_offset + e.item_offset + e.length]
        assert rec.unpack(item).pack() == item, name


def test_qcow_and_parallels_headers_pack_back_to_qemu_img_s_bytes(tmp_path):
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    path, data = qemu_create(tmp_path, "qcow", "a.qcow", "5M", "-b", "base.raw", "-F", "raw")
    h = qcow.parse_header(data, path, lambda off, n: data[off:off + n])
    assert h.pack() == data[:qcow.HEADER_SIZE] and h.backing_file == "base.raw"
    path, data = qemu_create(tmp_path, "parallels", "a.hds", "5M")
    assert par.parse_header(data, path).pack() == data[:par.HEADER_SIZE]


def titles(lines):
    return [line for line in lines if not line.startswith(" ")]


def test_dump_of_qemu_written_images(tmp_path):
    path, data = qemu_create(tmp_path, "vpc", "d.vhd", "10M")
    lines = dump_structures(path, "vpc")
    assert titles(lines) == ["footer copy (Footer, 512 bytes at 0x0):", "dynamic header (DynHeader, 1024 bytes at 0x200):",
                             "footer (Footer, 512 bytes at 0x%x):" % (len(data) - 512)]
    assert "  0x0        cookie                   'conectix'" in lines
    assert "  0x220      block_size               0x200000" in lines
    path, data = qemu_create(tmp_path, "vpc", "f.vhd", "1M", "-o", "subformat=fixed")
    assert titles(dump_structures(path, "vpc")) == ["footer (Footer, 512 bytes at 0x%x):" % (len(data) - 512)]

    path, data = qemu_create(tmp_path, "vhdx", "a.vhdx", "20M", "-o", "block_size=1M")
    lines = dump_structures(path, "vhdx")
    got = titles(lines)
    assert got[:6] == ["file identifier (FileIdentifier, 520 bytes at 0x0):", "header 1 (Header, 80 bytes at 0x10000):",
                       "header 2 (Header, 80 bytes at 0x20000):",
                       "region table (RegionTableHeader, 16 bytes at 0x30000):",
                       "region table entry 0 (RegionTableEntry, 32 bytes at 0x30010):",
                       "region table entry 1 (RegionTableEntry, 32 bytes at 0x30030):"]
    assert "metadata item: logical sector size (LogicalSectorSize, 4 bytes at 0x%x):" \
        % (vhdx.parse_region_table(data[0x30000:0x40000])[1].file_offset + 0x10000 + 32) in got
    assert "  0x10000    signature                'head'" in lines

    path, data = qemu_create(tmp_path, "qcow", "a.qcow", "5M")
    lines = dump_structures(path, "qcow")
    assert titles(lines) == ["header (Header, 48 bytes at 0x0):"]
    assert "  0x0        magic                    0x514649fb" in lines

    path, data = qemu_create(tmp_path, "parallels", "a.hds", "5M")
    lines = dump_structures(path, "parallels")
    assert titles(lines) == ["header (Header, 64 bytes at 0x0):"]
    assert "  0x0        magic                    'WithouFreSpacExt'" in lines
    assert "  0x20       nb_bat_entries           5" in lines
