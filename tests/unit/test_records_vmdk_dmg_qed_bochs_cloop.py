"""The vmdk, dmg, qed, bochs and cloop on-disk structures as declared records (structure.py): their
layouts are the specifications', records read from qemu-img's (or the reference writers') images
pack back to the same bytes, ``vdisk inspect --dump`` shows each format's headers, the qed check
and image share their table helpers without an import cycle, and a vmdk created under a temporary
name (convert's output) names its extents after the name it will have."""
import ast
import inspect
import os
import sys

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.bochs import header as bochs
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.cloop import header as cloop
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.dmg import header as dmg
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qed import check as qed_check
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qed import header as qed
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qed import image as qed_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vmdk import header as vmdk
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.inspect import dump_structures
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "interop"))
import readonly_util as r  # noqa: E402

MiB = 1024 * 1024

# (field, offset, width) of each structure, from its specification
SPEC = [
    (vmdk.SparseHeader, [("magic_number", 0, 4), ("version", 4, 4), ("flags", 8, 4), ("capacity", 12, 8),
                         ("grain_size", 20, 8), ("descriptor_offset", 28, 8), ("descriptor_size", 36, 8),
                         ("num_gtes_per_gt", 44, 4), ("rgd_offset", 48, 8), ("gd_offset", 56, 8), ("overhead", 64, 8),
                         ("unclean_shutdown", 72, 1), ("single_end_line_char", 73, 1), ("non_end_line_char", 74, 1),
                         ("double_end_line_char1", 75, 1), ("double_end_line_char2", 76, 1),
                         ("compress_algorithm", 77, 2), ("pad", 79, 433)]),
    (vmdk.Marker, [("val", 0, 8), ("size", 8, 4), ("type", 12, 4), ("pad", 16, 496)]),
    (vmdk.GrainMarker, [("lba", 0, 8), ("size", 8, 4)]),
    (dmg.Koly, [("signature", 0, 4), ("version", 4, 4), ("header_size", 8, 4), ("flags", 12, 4),
                ("running_data_fork_offset", 16, 8), ("data_fork_offset", 24, 8), ("data_fork_length", 32, 8),
                ("rsrc_fork_offset", 40, 8), ("rsrc_fork_length", 48, 8), ("segment_number", 56, 4),
                ("segment_count", 60, 4), ("segment_id", 64, 16), ("data_checksum_type", 80, 4),
                ("data_checksum_size", 84, 4), ("data_checksum", 88, 128), ("xml_offset", 216, 8),
                ("xml_length", 224, 8), ("reserved1", 232, 120), ("checksum_type", 352, 4), ("checksum_size", 356, 4),
                ("checksum", 360, 128), ("image_variant", 488, 4), ("sector_count", 492, 8), ("reserved2", 500, 4),
                ("reserved3", 504, 4), ("reserved4", 508, 4)]),
    (dmg.BlkxTable, [("signature", 0, 4), ("version", 4, 4), ("sector_number", 8, 8), ("sector_count", 16, 8),
                     ("data_offset", 24, 8), ("buffers_needed", 32, 4), ("block_descriptors", 36, 4),
                     ("reserved", 40, 24), ("checksum_type", 64, 4), ("checksum_size", 68, 4), ("checksum", 72, 128),
                     ("number_of_block_chunks", 200, 4)]),
    (dmg.BlkxChunkEntry, [("entry_type", 0, 4), ("comment", 4, 4), ("sector_number", 8, 8), ("sector_count", 16, 8),
                          ("compressed_offset", 24, 8), ("compressed_length", 32, 8)]),
    (dmg.ResourceForkHeader, [("data_offset", 0, 4), ("map_offset", 4, 4), ("data_length", 8, 4), ("map_length", 12, 4)]),
    (qed.Header, [("magic", 0, 4), ("cluster_size", 4, 4), ("table_size", 8, 4), ("header_size", 12, 4),
                  ("features", 16, 8), ("compat_features", 24, 8), ("autoclear_features", 32, 8),
                  ("l1_table_offset", 40, 8), ("image_size", 48, 8), ("backing_filename_offset", 56, 4),
                  ("backing_filename_size", 60, 4)]),
    (bochs.Header, [("magic", 0, 32), ("type", 32, 16), ("subtype", 48, 16), ("version", 64, 4), ("header", 68, 4),
                    ("catalog", 72, 4), ("bitmap", 76, 4), ("extent", 80, 4), ("reserved", 84, 4), ("disk", 88, 8),
                    ("padding", 96, 416)]),
    (bochs.HeaderV1, [("magic", 0, 32), ("type", 32, 16), ("subtype", 48, 16), ("version", 64, 4), ("header", 68, 4),
                      ("catalog", 72, 4), ("bitmap", 76, 4), ("extent", 80, 4), ("disk", 84, 8), ("padding", 92, 420)]),
    (cloop.Header, [("preamble", 0, 128), ("block_size", 128, 4), ("n_blocks", 132, 4)]),
]


def test_layouts_are_the_specifications():
    for cls, fields in SPEC:
        assert cls.LAYOUT.names == [name for name, dummy, dummy in fields], cls.__name__
        for name, offset, width in fields:
            assert (cls.offset(name), cls.LAYOUT.structs[name].size) == (offset, width), (cls.__name__, name)
        assert cls.SIZE == fields[-1][1] + fields[-1][2]
    assert vmdk.SparseHeader.SIZE == vmdk.Marker.SIZE == dmg.KOLY_SIZE == bochs.HEADER_SIZE == 512
    assert (dmg.CHUNKS_START, dmg.MISH_MIN_SIZE, qed.HEADER_SIZE, cloop.OFFSETS_START) == (204, 244, 64, 136)


def qemu_create(tmp_path, fmt, name, size, *options):
    path = str(tmp_path / name)
    helpers.qemu_img("create", "-q", "-f", fmt, *options, path, size, check=True)
    with open(path, "rb") as f:
        return path, f.read()


def vdisk_create(tmp_path, name, size, **options):
    path = str(tmp_path / name)
    driver = get_driver("vmdk")
    driver.create(path, size, driver.parse_options(options))
    with open(path, "rb") as f:
        return path, f.read()


def test_qemu_img_s_headers_pack_back_to_their_bytes(tmp_path):
    helpers.make_raw(str(tmp_path / "base.raw"), MiB)
    path, data = qemu_create(tmp_path, "qed", "a.qed", "5M", "-o", "backing_file=base.raw,backing_fmt=raw")
    h = qed.parse_header(data, path, lambda off, n: data[off:off + n])
    assert h.pack() == data[:qed.HEADER_SIZE] and h.backing_file == "base.raw"
    path, data = qemu_create(tmp_path, "vmdk", "a.vmdk", "5M")
    assert vmdk.SparseHeader.unpack(data).pack() == data[:512]
    path, data = qemu_create(tmp_path, "vmdk", "q.vmdk", "5M", "-o", "subformat=streamOptimized")
    assert vmdk.SparseHeader.unpack(data).pack() == data[:512]
    path, data = vdisk_create(tmp_path, "s.vmdk", 5 * MiB, subformat="streamOptimized")   # directory at the end
    footer = vmdk.parse_footer(data[-1536:], path)
    assert footer.pack() == data[-1024:-512] and footer.gd_offset != vmdk.GD_AT_END
    assert vmdk.Marker.unpack(data, len(data) - 1536).pack() == data[-1536:-1024] == vmdk.pack_marker(1, vmdk.MARKER_FOOTER)
    assert vmdk.Marker.unpack(data, len(data) - 512).type == vmdk.MARKER_EOS


def test_reference_writers_headers_pack_back_to_their_bytes():
    data = r.pattern_data(MiB)
    for version, cls in ((2, bochs.Header), (1, bochs.HeaderV1)):
        blob = r.make_bochs(data, version=version)
        h = bochs.parse_header(blob, "x")
        assert type(h) is cls
        assert h.pack() == blob[:512]
        assert h.virtual_size == MiB
    blob = r.make_cloop(data)
    h = cloop.parse_header(blob, "x")
    assert h.pack() == blob[:cloop.OFFSETS_START] and h.virtual_size == MiB
    blob = r.make_dmg(data, [(r.UDRW, 1024), (r.UDZO, 1024)], xml=False, tables=1)
    at = len(blob) - 512
    k = dmg.parse_koly(blob[at:], at, "x")
    assert k.pack() == blob[at:] and k.sector_count == 2048
    fork = dmg.ResourceForkHeader.unpack(blob, k.rsrc_fork_offset)
    table = blob[k.rsrc_fork_offset + fork.data_offset + 4:]
    assert dmg.BlkxTable.unpack(table).pack() == table[:dmg.BlkxTable.SIZE]
    entry = dmg.BlkxChunkEntry.unpack(table, dmg.CHUNKS_START + dmg.BlkxChunkEntry.SIZE)
    assert (entry.entry_type, entry.sector_number, entry.sector_count) == (r.UDZO, 1024, 1024)


def titles(lines):
    return [line for line in lines if not line.startswith(" ")]


def test_dump_shows_each_format_s_headers(tmp_path):
    path, dummy = qemu_create(tmp_path, "qed", "a.qed", "5M")
    lines = dump_structures(path, "qed")
    assert titles(lines) == ["header (Header, 64 bytes at 0x0):"]
    assert "  0x0        magic                    0x444551" in lines
    path, data = vdisk_create(tmp_path, "s.vmdk", 5 * MiB, subformat="streamOptimized")
    lines = dump_structures(path, "vmdk")
    assert titles(lines) == ["sparse extent header (SparseHeader, 512 bytes at 0x0):",
                             "footer (SparseHeader, 512 bytes at 0x%x):" % (len(data) - 1024)]
    assert "  0x38       gd_offset                %d" % vmdk.GD_AT_END in lines
    path, dummy = qemu_create(tmp_path, "vmdk", "t.vmdk", "5M", "-o", "subformat=twoGbMaxExtentSparse")
    assert titles(dump_structures(path, "vmdk")) == [
        "sparse extent header of %s (SparseHeader, 512 bytes at 0x0):" % str(tmp_path / "t-s001.vmdk")]
    path, dummy = qemu_create(tmp_path, "vmdk", "f.vmdk", "5M", "-o", "subformat=monolithicFlat")
    assert dump_structures(path, "vmdk") == ["%s: no structures declared for format vmdk" % path]

    data = r.pattern_data(MiB)
    path = r.write(tmp_path / "a.bochs", r.make_bochs(data, version=1))
    lines = dump_structures(path, "bochs")
    assert titles(lines) == ["header (HeaderV1, 512 bytes at 0x0):"]
    assert "  0x0        magic                    'Bochs Virtual HD Image'" in lines
    path = r.write(tmp_path / "a.cloop", r.make_cloop(data))
    lines = dump_structures(path, "cloop")
    assert titles(lines) == ["header (Header, 136 bytes at 0x0):"]
    assert "  0x84       n_blocks                 16" in lines
    blob = r.make_dmg(data, [(r.UDRW, 2048)], xml=False, tables=1)
    path = r.write(tmp_path / "a.dmg", blob)
    k = dmg.Koly.unpack(blob, len(blob) - 512)
    assert titles(dump_structures(path, "dmg")) == [
        "koly trailer (Koly, 512 bytes at 0x%x):" % (len(blob) - 512),
        "resource fork header (ResourceForkHeader, 16 bytes at 0x%x):" % k.rsrc_fork_offset]


def _imports(module):
    """The modules *module* imports, at any depth of its source (function-local ones too)."""
    names = []
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_qed_check_and_image_share_the_table_helpers_without_a_cycle():
    assert ".image" not in _imports(qed_check)
    assert _imports(qed_image).count(".check") == 1
    assert qed_check.unpack_table is qed_image.unpack_table and qed_check.pack_table is qed_image.pack_table


def test_vmdk_created_under_a_temporary_name_names_its_extents_after_its_final_name(tmp_path):
    final = str(tmp_path / "disk.vmdk")
    staged = str(tmp_path / ".staging-123")
    driver = get_driver("vmdk")
    driver.create_staged(staged, final, 3 * MiB, driver.parse_options({"subformat": "twoGbMaxExtentFlat"}))
    assert sorted(os.listdir(str(tmp_path))) == [".staging-123", "disk-f001.vmdk"]
    with open(staged, "rb") as f:
        assert 'RW 6144 FLAT "disk-f001.vmdk" 0' in f.read().decode()
    driver.create_staged(staged, final, 3 * MiB, driver.parse_options({}))
    with open(staged, "rb") as f:
        assert b'RW 6144 SPARSE "disk.vmdk"' in f.read()
