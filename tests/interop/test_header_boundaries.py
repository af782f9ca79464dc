"""Header-boundary tests in the style of QEMU's iotest 080: every integer field of each format's
header (offsets from the format's on-disk header struct) is overwritten with boundary values --
0xffffffff, 0x7fffffff, 0, the original value plus one (misaligned), a huge value -- and vdisk
``info`` and ``convert -O raw`` (and ``map`` in the slow cells) must each end in success or a one-line ``vdisk:`` error,
within time and memory limits (forked children, tests/fuzz/fuzz.py), leaving the file unchanged;
and when ``qemu-img info`` refuses the damaged image, vdisk refuses it too.

Checksummed headers (VHD footer and dynamic header, VHDX headers and region table) get their
checksum recomputed after the damage, so the value reaches the parser instead of the checksum
test. One test per (format, value): it walks every field and reports all failures at once.
The default run covers 0xffffffff and misaligned; the other values are marked slow.
"""
import os
import shutil
import struct
import sys

import pytest

import helpers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz"))
import fuzz  # noqa: E402  (tests/fuzz is not a package)

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vhdx.crc32c import checksum as crc_sum  # noqa: E402

KiB = 1024
WALL = 15.0


def _vpc_sum(buf, at):
    return ~(sum(buf) - sum(buf[at:at + 4])) & 0xFFFFFFFF


# field tables: (name, offset in the structure, width, endianness); structure base per format below
QCOW2 = [("version", 4, 4), ("backing_file_offset", 8, 8), ("backing_file_size", 16, 4), ("cluster_bits", 20, 4),
         ("size", 24, 8), ("crypt_method", 32, 4), ("l1_size", 36, 4), ("l1_table_offset", 40, 8),
         ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4), ("nb_snapshots", 60, 4),
         ("snapshots_offset", 64, 8), ("incompatible_features", 72, 8), ("compatible_features", 80, 8),
         ("autoclear_features", 88, 8), ("refcount_order", 96, 4), ("header_length", 100, 4)]
QED = [("cluster_size", 4, 4), ("table_size", 8, 4), ("header_size", 12, 4), ("features", 16, 8),
       ("compat_features", 24, 8), ("autoclear_features", 32, 8), ("l1_table_offset", 40, 8), ("image_size", 48, 8),
       ("backing_filename_offset", 56, 4), ("backing_filename_size", 60, 4)]
VDI = [("signature", 64, 4), ("version", 68, 4), ("header_size", 72, 4), ("image_type", 76, 4),
       ("image_flags", 80, 4), ("offset_bmap", 340, 4), ("offset_data", 344, 4), ("cylinders", 348, 4),
       ("heads", 352, 4), ("sectors", 356, 4), ("sector_size", 360, 4), ("disk_size", 368, 8),
       ("block_size", 376, 4), ("block_extra", 380, 4), ("blocks_in_image", 384, 4), ("blocks_allocated", 388, 4)]
VPC_FOOTER = [("features", 8, 4), ("version", 12, 4), ("data_offset", 16, 8), ("orig_size", 40, 8),
              ("current_size", 48, 8), ("cylinders", 56, 2), ("heads", 58, 1), ("sectors", 59, 1), ("disk_type", 60, 4)]
VPC_DYN = [("dyn.data_offset", 8, 8), ("dyn.table_offset", 16, 8), ("dyn.version", 24, 4),
           ("dyn.max_table_entries", 28, 4), ("dyn.block_size", 32, 4)]
PARALLELS = [("version", 16, 4), ("heads", 20, 4), ("cylinders", 24, 4), ("tracks", 28, 4), ("bat_entries", 32, 4),
             ("nb_sectors", 36, 8), ("inuse", 44, 4), ("data_off", 48, 4), ("flags", 52, 4), ("ext_off", 56, 8)]
VMDK = [("version", 4, 4), ("flags", 8, 4), ("capacity", 12, 8), ("granularity", 20, 8), ("desc_offset", 28, 8),
        ("desc_size", 36, 8), ("num_gtes_per_gt", 44, 4), ("rgd_offset", 48, 8), ("gd_offset", 56, 8),
        ("overhead", 64, 8), ("compress_algorithm", 77, 2)]
VHDX_HEADER = [("hdr.sequence", 8, 8), ("hdr.log_version", 64, 2), ("hdr.version", 66, 2), ("hdr.log_length", 68, 4),
               ("hdr.log_offset", 72, 8)]
VHDX_REGION = [("rt.entry_count", 8, 4), ("rt.bat_offset", 32, 8), ("rt.bat_length", 40, 4), ("rt.bat_required", 44, 4),
               ("rt.meta_offset", 64, 8), ("rt.meta_length", 72, 4)]


def _fields(fmt, path):
    """[(name, absolute offset, width, endian, fix-up)] for the image at *path*."""
    size = os.path.getsize(path)
    if fmt == "qcow2":
        return [(n, o, w, ">", None) for n, o, w in QCOW2]
    if fmt == "qed":
        return [(n, o, w, "<", None) for n, o, w in QED]
    if fmt == "vdi":
        return [(n, o, w, "<", None) for n, o, w in VDI]
    if fmt == "parallels":
        return [(n, o, w, "<", None) for n, o, w in PARALLELS]
    if fmt == "vmdk":
        return [(n, o, w, "<", None) for n, o, w in VMDK]
    if fmt == "vpc":
        def fix_footer(buf, base):
            struct.pack_into(">I", buf, base + 64, _vpc_sum(buf[base:base + 512], 64))
        with open(path, "rb") as f:
            dyn = struct.unpack(">Q", f.read(24)[16:24])[0]
        out = [("copy." + n, o, w, ">", lambda b: fix_footer(b, 0)) for n, o, w in VPC_FOOTER]
        out += [("end." + n, size - 512 + o, w, ">", lambda b: fix_footer(b, size - 512)) for n, o, w in VPC_FOOTER]

        def fix_dyn(buf):
            struct.pack_into(">I", buf, dyn + 36, _vpc_sum(buf[dyn:dyn + 1024], 36))
        out += [(n, dyn + o, w, ">", fix_dyn) for n, o, w in VPC_DYN]
        return out
    if fmt == "vhdx":
        def fix(base, length):
            def fixer(buf):
                struct.pack_into("<I", buf, base + 4, crc_sum(bytes(buf[base:base + length])))
            return fixer
        out = []
        for base in (64 * KiB, 128 * KiB):
            out += [("%s@%dK" % (n, base // KiB), base + o, w, "<", fix(base, 4 * KiB)) for n, o, w in VHDX_HEADER]
        out += [(n, 192 * KiB + o, w, "<", fix(192 * KiB, 64 * KiB)) for n, o, w in VHDX_REGION]
        return out
    raise AssertionError(fmt)


MAKERS = {
    "qcow2": ["-o", "cluster_size=4096"], "qed": [], "vdi": [], "vpc": [], "parallels": [], "vmdk": [],
    "vhdx": ["-o", "block_size=1M,log_size=1M"],
}


def _committed(fmt):
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import DRIVERS
    return fmt in DRIVERS


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """One small image per format with data in it (qemu-img create + qemu-io writes)."""
    d = tmp_path_factory.mktemp("seeds")
    out = {}
    for fmt, opts in MAKERS.items():
        path = str(d / ("seed." + fmt))
        helpers.run("qemu-img", "create", "-q", "-f", fmt, *opts, path, "2M")
        helpers.qemu_io(fmt, path, "write -P 0x5a 0 64k", "write -P 0xa5 1M 4k")
        out[fmt] = path
    return out


def _boundary(kind, old, width):
    mask = (1 << (8 * width)) - 1
    return {"0xffffffff": 0xFFFFFFFF, "0x7fffffff": 0x7FFFFFFF, "zero": 0, "misaligned": old + 1,
            "huge": (1 << 62) if width == 8 else (1 << (8 * width - 1))}[kind] & mask


DEFAULT = ("0xffffffff", "misaligned")
KINDS = [(fmt, k) if k in DEFAULT else pytest.param(fmt, k, marks=pytest.mark.slow)
         for fmt in MAKERS for k in ("0xffffffff", "misaligned", "0x7fffffff", "zero", "huge")]


@pytest.mark.parametrize("fmt,kind", KINDS)
def test_header_boundaries(fmt, kind, seeds, tmp_path):
    if not _committed(fmt):
        pytest.skip("no %s driver" % fmt)
    fuzz.preload([fmt])
    with open(seeds[fmt], "rb") as f:
        original = f.read()
    work = tmp_path / "img"
    scratch = tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    path = str(work / "img")
    problems = []
    # map only in the slow cells: info and convert between them read every table
    commands = ("info", "convert") if kind in DEFAULT else ("info", "map", "convert")
    for name, off, width, endian, fixup in _fields(fmt, seeds[fmt]):
        code = endian + {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
        buf = bytearray(original)
        old = struct.unpack_from(code, buf, off)[0]
        new = _boundary(kind, old, width)
        if new == old:
            continue
        struct.pack_into(code, buf, off, new)
        if fixup:
            fixup(buf)
        with open(path, "wb") as f:
            f.write(buf)
        before = fuzz.tree_hash(str(work), ["img"])
        statuses = []
        for cmd in commands:
            status, stderr, dummy = fuzz.run_child(fuzz._command(cmd, fmt, path, str(scratch), False), str(scratch),
                                                   wall=WALL)
            statuses.append(status)
            problem = fuzz.verdict(cmd, status, stderr)
            if problem:
                problems.append("%s=%#x: %s %s" % (name, new, cmd, problem))
            out = scratch / "out.raw"
            if out.exists():
                out.unlink()
        if fuzz.tree_hash(str(work), ["img"]) != before:
            problems.append("%s=%#x: the image changed" % (name, new))
        # qemu-img refuses the damaged header: vdisk must not accept it silently
        if all(s == 0 for s in statuses) and helpers.run("qemu-img", "info", "-f", fmt, path,
                                                        check=False).returncode != 0:
            problems.append("%s=%#x: qemu-img info refuses it, vdisk %s accept it" % (name, new, " and ".join(commands)))
    shutil.rmtree(str(work), ignore_errors=True)
    assert not problems, "\n".join(problems)


# -- table entries ------------------------------------------------------------------------------
VHDX_BAT_GUID = bytes.fromhex("6677c22d23f600429d64115e9bfd4a08")


def _u(buf, code, off):
    return struct.unpack_from(code, buf, off)[0]


def _tables(fmt, buf):
    """[(name, offset of the first entry, entry width, endian)]: each format's tables, found
    through the header as a reader finds them."""
    out = []
    if fmt == "qcow2":
        l1 = _u(buf, ">Q", 40)
        out += [("l1", l1, 8, ">"), ("reftable", _u(buf, ">Q", 48), 8, ">")]
        l2 = _u(buf, ">Q", l1) & 0x00FFFFFFFFFFFE00
        if l2:
            out.append(("l2", l2, 8, ">"))
    elif fmt == "qed":
        l1 = _u(buf, "<Q", 40)
        out.append(("l1", l1, 8, "<"))
        if _u(buf, "<Q", l1):
            out.append(("l2", _u(buf, "<Q", l1), 8, "<"))
    elif fmt == "vdi":
        out.append(("bmap", _u(buf, "<I", 340), 4, "<"))
    elif fmt == "vpc":
        dyn = _u(buf, ">Q", 16)
        out.append(("bat", _u(buf, ">Q", dyn + 16), 4, ">"))
    elif fmt == "parallels":
        out.append(("bat", 64, 4, "<"))
    elif fmt == "vmdk":
        gd = _u(buf, "<Q", 56) * 512
        out += [("gd", gd, 4, "<"), ("gt", _u(buf, "<I", gd) * 512, 4, "<")]
    elif fmt == "vhdx":
        base = 192 * KiB
        for i in range(_u(buf, "<I", base + 8)):
            entry = base + 16 + 32 * i
            if bytes(buf[entry:entry + 16]) == VHDX_BAT_GUID:
                out.append(("bat", _u(buf, "<Q", entry + 16), 8, "<"))
    return out


@pytest.mark.parametrize("fmt", list(MAKERS))
def test_table_entries(fmt, seeds, tmp_path):
    """The first two entries of every table (L1/L2/refcount, block maps, BATs, grain directories)
    set to 0xffffffff, a huge value, and their value plus one (misaligned)."""
    if not _committed(fmt):
        pytest.skip("no %s driver" % fmt)
    fuzz.preload([fmt])
    with open(seeds[fmt], "rb") as f:
        original = f.read()
    work = tmp_path / "img"
    scratch = tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    path = str(work / "img")
    problems = []
    tables = _tables(fmt, original)
    assert tables, "no table found in the %s seed" % fmt
    for name, base, width, endian in tables:
        code = endian + {4: "I", 8: "Q"}[width]
        for index in (0, 1):
            off = base + index * width
            old = _u(original, code, off)
            for new in sorted({0xFFFFFFFF, (1 << (8 * width - 2)) | 0x10000, (old + 1) & ((1 << (8 * width)) - 1)}):
                buf = bytearray(original)
                struct.pack_into(code, buf, off, new)
                with open(path, "wb") as f:
                    f.write(buf)
                before = fuzz.tree_hash(str(work), ["img"])
                for cmd in ("info", "convert", "check"):
                    status, stderr, dummy = fuzz.run_child(fuzz._command(cmd, fmt, path, str(scratch), False),
                                                           str(scratch), wall=WALL)
                    problem = fuzz.verdict(cmd, status, stderr)
                    if problem:
                        problems.append("%s[%d]=%#x: %s %s" % (name, index, new, cmd, problem))
                    out = scratch / "out.raw"
                    if out.exists():
                        out.unlink()
                if fuzz.tree_hash(str(work), ["img"]) != before:
                    problems.append("%s[%d]=%#x: the image changed" % (name, index, new))
    assert not problems, "\n".join(problems)


# -- the VMDK descriptor ------------------------------------------------------------------------
# (pattern, replacement) pairs applied to the embedded descriptor of a monolithicSparse image
VMDK_DESCRIPTOR = [
    (r"RW \d+ SPARSE", "RW 4294967295 SPARSE"), (r"RW \d+ SPARSE", "RW 2147483647 SPARSE"),
    (r"RW \d+ SPARSE", "RW 0 SPARSE"), (r"RW \d+ SPARSE", "RW 9223372036854775807 SPARSE"),
    (r"RW \d+ SPARSE", "RW 4097 SPARSE"), (r"RW \d+ SPARSE", "RW -1 SPARSE"),
    (r"SPARSE \"[^\"]*\"", "SPARSE \"img\" 4294967295"), (r"SPARSE", "FLAT"), (r"SPARSE", "ZERO"),
    (r"SPARSE \"[^\"]*\"", "SPARSE \"\""), (r"\"monolithicSparse\"", "\"vmfs\""),
    (r"version=1", "version=4294967295"), (r"parentCID=\w+", "parentCID=0"), (r"CID=\w+", "CID=ffffffffff"),
    (r"cylinders = \"\d+\"", "cylinders = \"4294967295\""), (r"heads = \"\d+\"", "heads = \"0\""),
    (r"# Extent description\n", "# Extent description\n" + "RW 1 ZERO\n" * 200),
]


def test_vmdk_descriptor_fields(seeds, tmp_path):
    """Numbers in the embedded VMDK descriptor set to boundary values, extent types swapped."""
    import re
    if not _committed("vmdk"):
        pytest.skip("no vmdk driver")
    fuzz.preload(["vmdk"])
    with open(seeds["vmdk"], "rb") as f:
        original = f.read()
    desc_off, desc_size = struct.unpack_from("<QQ", original, 28)
    start, end = desc_off * 512, (desc_off + desc_size) * 512
    text = original[start:end].rstrip(b"\0").decode()
    work = tmp_path / "img"
    scratch = tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    path = str(work / "img")
    problems = []
    for pattern, repl in VMDK_DESCRIPTOR:
        new_text, count = re.subn(pattern, lambda m, r=repl: r, text, count=1)
        assert count == 1, pattern
        blob = new_text.encode()
        assert len(blob) <= end - start, pattern
        buf = bytearray(original)
        buf[start:end] = blob.ljust(end - start, b"\0")
        with open(path, "wb") as f:
            f.write(buf)
        before = fuzz.tree_hash(str(work), ["img"])
        statuses = []
        for cmd in ("info", "convert"):
            status, stderr, dummy = fuzz.run_child(fuzz._command(cmd, "vmdk", path, str(scratch), False),
                                                   str(scratch), wall=WALL)
            statuses.append(status)
            problem = fuzz.verdict(cmd, status, stderr)
            if problem:
                problems.append("%r: %s %s" % (repl, cmd, problem))
            out = scratch / "out.raw"
            if out.exists():
                out.unlink()
        if fuzz.tree_hash(str(work), ["img"]) != before:
            problems.append("%r: the image changed" % repl)
        if all(s == 0 for s in statuses) and helpers.run("qemu-img", "info", "-f", "vmdk", path,
                                                        check=False).returncode != 0:
            problems.append("%r: qemu-img info refuses it, vdisk info and convert accept it" % repl)
    assert not problems, "\n".join(problems)


# -- qcow2 snapshot table and header extensions (iotest 080's other cases) ----------------------
SNAPSHOT_FIELDS = [("snap.l1_table_offset", 0, 8), ("snap.l1_size", 8, 4), ("snap.id_str_size", 12, 2),
                   ("snap.name_size", 14, 2), ("snap.vm_state_size", 32, 4), ("snap.extra_data_size", 36, 4),
                   ("snap.vm_state_size_large", 40, 8), ("snap.disk_size", 48, 8)]
BITMAP_EXT_FIELDS = [("bitmaps.nb_bitmaps", 0, 4), ("bitmaps.directory_size", 8, 8), ("bitmaps.directory_offset", 16, 8)]


def _qcow2_substructures(buf):
    """[(name, absolute offset, width)] of the first snapshot entry, every extension's length and
    the bitmaps extension's fields."""
    out = [(n, _u(buf, ">Q", 64) + o, w) for n, o, w in SNAPSHOT_FIELDS]
    off = _u(buf, ">I", 100)
    while off + 8 <= 4096:
        kind, length = struct.unpack_from(">II", buf, off)
        if kind == 0:
            break
        out.append(("ext.%08x.length" % kind, off + 4, 4))
        if kind == 0x23852875:
            out += [(n, off + 8 + o, w) for n, o, w in BITMAP_EXT_FIELDS]
        off += 8 + (length + 7) // 8 * 8
    return out


@pytest.mark.parametrize("kind", [k if k in DEFAULT else pytest.param(k, marks=pytest.mark.slow)
                                  for k in ("0xffffffff", "misaligned", "0x7fffffff", "zero", "huge")])
def test_qcow2_snapshot_and_extensions(kind, tmp_path):
    path0 = str(tmp_path / "seed.qcow2")
    helpers.run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path0, "2M")
    helpers.qemu_io("qcow2", path0, "write -P 0x5a 0 64k")
    helpers.run("qemu-img", "snapshot", "-c", "s1", path0)
    helpers.run("qemu-img", "bitmap", "--add", path0, "b0")
    fuzz.preload(["qcow2"])
    with open(path0, "rb") as f:
        original = f.read()
    work = tmp_path / "img"
    scratch = tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    path = str(work / "img")
    problems = []
    fields = _qcow2_substructures(original)
    assert any(n.startswith("bitmaps.") for n, dummy, dummy2 in fields)
    for name, off, width in fields:
        code = ">" + {2: "H", 4: "I", 8: "Q"}[width]
        old = _u(original, code, off)
        new = _boundary(kind, old, width)
        if new == old:
            continue
        buf = bytearray(original)
        struct.pack_into(code, buf, off, new)
        with open(path, "wb") as f:
            f.write(buf)
        before = fuzz.tree_hash(str(work), ["img"])
        statuses = []
        for cmd in ("info", "convert", "check"):
            status, stderr, dummy = fuzz.run_child(fuzz._command(cmd, "qcow2", path, str(scratch), False),
                                                   str(scratch), wall=WALL)
            statuses.append(status)
            problem = fuzz.verdict(cmd, status, stderr)
            if problem:
                problems.append("%s=%#x: %s %s" % (name, new, cmd, problem))
            out = scratch / "out.raw"
            if out.exists():
                out.unlink()
        if fuzz.tree_hash(str(work), ["img"]) != before:
            problems.append("%s=%#x: the image changed" % (name, new))
        if statuses[0] == 0 and helpers.run("qemu-img", "info", "-f", "qcow2", path, check=False).returncode != 0:
            problems.append("%s=%#x: qemu-img info refuses it, vdisk info accepts it" % (name, new))
    assert not problems, "\n".join(problems)
