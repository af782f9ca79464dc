"""cloop, bochs, dmg and iso against qemu-img 7.2: reading, info, probing, bad input, mutations.

Images come from the tools that make them where Debian packages them (create_compressed_fs from
cloop-utils, bximage, genisoimage, xorriso: a missing tool skips its test with the package to
install), from spec-faithful writers in ``readonly_util`` otherwise (cloop v2, Bochs growing v1 and
v2, DMG with raw/zero/ignore/zlib/bzip2/lzfse chunks in XML-plist and resource-fork variants), and
from QEMU's samples. ``vdisk convert -O raw`` must equal ``qemu-img convert -O raw`` byte for byte
(qemu-img 7.2 here has no dmg-bz2 module, so bzip2 chunks are checked against the written data).
"""
import json
import os
import struct

import pytest

import helpers
import imgfmt_util as u
import readonly_util as r
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.info import image_info, render_json
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import probe_file

SIZE = 3 * MiB
ZEROS = [(MiB, 300 * 1024), (2 * MiB, 64 * 1024)]          # sectors 2048..2647 and 4096..4223
DMG_LAYOUT = [(r.UDZO, 2048), (r.UDZE, 600), (r.UDRW, 1448), (r.UDIG, 128), (r.UDZO, 1920)]


def pairs(values, fast):
    """Tuple parameters: those in *fast* run by default, the others only with ``-m slow``."""
    return [v if v in fast else pytest.param(*v, marks=pytest.mark.slow) for v in values]


@pytest.fixture(scope="module")
def data():
    return r.pattern_data(SIZE, ZEROS)


def vdisk_raw(path, tmp_path, fmt=None, name="mine.raw"):
    out = os.path.join(str(tmp_path), name)
    helpers.vdisk_cli("convert", *(["-f", fmt] if fmt else []), "-O", "raw", path, out, check=True)
    with open(out, "rb") as f:
        return f.read()


def qemu_raw(path, tmp_path, fmt):
    return u.qemu_raw(path, fmt, tmp_path, name="qemu.raw")


def assert_reads_like_qemu(path, fmt, tmp_path, qfmt=None, cli=True):
    """vdisk converts to the bytes qemu-img converts to: the engine with the format given, and
    (with *cli*) ``vdisk convert`` probing it."""
    ref = qemu_raw(path, tmp_path, qfmt or fmt)
    assert u.read_all(path, fmt) == ref
    if cli:
        assert vdisk_raw(path, tmp_path, None, "probed.raw") == ref
    return ref


def vdisk_info(path, *args):
    return json.loads(helpers.vdisk_cli("info", "--output=json", *args, path, check=True).stdout)


def engine_info(path, fmt=None):
    """What ``vdisk info --output=json`` prints, computed in-process (the CLI only renders it)."""
    img = open_image(path, fmt)
    try:
        return json.loads(render_json(image_info(img)))
    finally:
        close_chain(img)


def engine_error(path, fmt):
    with pytest.raises(errors.ImageError) as exc:
        close_chain(open_image(path, fmt))
    text = str(exc.value)
    assert "\n" not in text
    return text


def qemu_info(path, fmt):
    return json.loads(helpers.run("qemu-img", "info", "--output=json", "-f", fmt, path).stdout)


def cli_error(*args):
    proc = helpers.vdisk_cli(*args)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vdisk: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- QEMU's samples -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,fmt", [("simple-pattern.cloop", "cloop"), ("empty.bochs", "bochs"),
                                      ("simple-dmg.dmg", "dmg"), ("grub_mbr.raw", "raw")])
def test_samples_read_like_qemu(tmp_path, name, fmt):
    path = u.sample(name, tmp_path)
    assert_reads_like_qemu(path, fmt, tmp_path)
    assert probe_file(path) == fmt
    assert engine_info(path) == qemu_info(path, fmt)
    assert helpers.vdisk_cli("map", "--output=json", path, check=True).stdout.split() == \
        helpers.run("qemu-img", "map", "--output=json", "-f", fmt, path).stdout.decode().split()


# -- images made by the real tools -------------------------------------------------------------------
def test_cloop_from_create_compressed_fs(tmp_path, data):
    r.need_tool("create_compressed_fs")
    src = r.write(tmp_path / "src.raw", data)
    img = str(tmp_path / "disk.cloop")
    helpers.run("create_compressed_fs", "-q", "-B", "65536", src, img)
    ref = assert_reads_like_qemu(img, "cloop", tmp_path)
    assert ref == data                                      # a whole number of 64 KiB blocks
    assert vdisk_info(img) == qemu_info(img, "cloop")


def test_bochs_from_bximage(tmp_path, data):
    r.need_tool("bximage")
    src = r.write(tmp_path / "src.raw", data)
    img = str(tmp_path / "disk.bochs")
    helpers.run("bximage", "-func=convert", "-imgmode=growing", "-q", src, img)
    assert assert_reads_like_qemu(img, "bochs", tmp_path) == data
    assert vdisk_info(img) == qemu_info(img, "bochs")


@pytest.mark.parametrize("tool", ["genisoimage", "xorriso"])
def test_iso_from_mastering_tools(tmp_path, tool):
    r.need_tool(tool)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_bytes(b"hello\n" * 1000)
    img = str(tmp_path / "cd.img")                          # not named .iso: found by its content
    args = ["-as", "mkisofs"] if tool == "xorriso" else []
    helpers.run(tool, *args, "-quiet", "-V", "VDISKTEST", "-o", img, str(tree))
    assert probe_file(img) == "iso"
    ref = assert_reads_like_qemu(img, "iso", tmp_path, qfmt="raw")
    with open(img, "rb") as f:
        assert ref == f.read()
    # qemu-img's info, plus what was found
    info = vdisk_info(img)
    assert info.pop("format-specific") == {"type": "iso", "data": {"filesystem": "iso9660",
                                                                    "volume-id": "VDISKTEST"}}
    assert info == qemu_info(img, "raw")
    assert "format-specific" not in vdisk_info(img, "-f", "raw")   # -f always wins
    # installer images are never changed on a guess: writing needs -f raw
    assert "read-only" in cli_error("resize", img, "+1M")
    helpers.vdisk_cli("resize", "-f", "raw", img, "+1M", check=True)


# -- images made by the writers here ---------------------------------------------------------------
@pytest.mark.parametrize("block_size", u.cells([512, 64 * 1024, 1024 * 1024], (64 * 1024,)))
def test_cloop_written_here(tmp_path, data, block_size):
    img = r.write(tmp_path / "disk.img", r.make_cloop(data, block_size))
    assert assert_reads_like_qemu(img, "cloop", tmp_path, cli=block_size == 64 * 1024)[:SIZE] == data
    assert engine_info(img) == qemu_info(img, "cloop")


@pytest.mark.parametrize("version,extent", pairs([(v, e) for v in (1, 2) for e in (512, 32 * 1024, 0x800000)],
                                                   ((1, 32 * 1024), (2, 512))))
def test_bochs_written_here(tmp_path, data, version, extent):
    size = SIZE - 1536                                      # not a whole extent
    img = r.write(tmp_path / "disk.img", r.make_bochs(data[:size], extent, version))
    assert assert_reads_like_qemu(img, "bochs", tmp_path, cli=False) == data[:size]
    assert engine_info(img) == qemu_info(img, "bochs")


@pytest.mark.parametrize("xml,tables", pairs([(x, t) for x in (True, False) for t in (1, 3)],
                                               ((True, 3), (False, 1))))
def test_dmg_written_here(tmp_path, data, xml, tables):
    img = r.write(tmp_path / "disk.img", r.make_dmg(data, DMG_LAYOUT, xml, tables))
    assert assert_reads_like_qemu(img, "dmg", tmp_path, cli=xml) == data
    assert engine_info(img) == qemu_info(img, "dmg")


def test_dmg_bzip2_chunks(tmp_path, data):
    layout = [(r.UDBZ, 2048), (r.UDZE, 600), (r.UDBZ, 1448), (r.UDIG, 128), (r.UDBZ, 1920)]
    img = r.write(tmp_path / "disk.dmg", r.make_dmg(data, layout))
    assert u.read_all(img, "dmg") == data


@pytest.mark.parametrize("kind,name", [(r.ULFO, "lzfse"), (r.UDCO, "adc")])
def test_dmg_chunks_without_a_decoder(tmp_path, data, kind, name):
    layout = [(r.UDZO, 2048), (r.UDZE, 600), (kind, 1448), (r.UDIG, 128), (r.UDZO, 1920)]
    img = r.write(tmp_path / "disk.dmg", r.make_dmg(data, layout))
    assert engine_info(img)["virtual-size"] == SIZE         # info works; reading that chunk does not
    line = cli_error("convert", "-O", "raw", img, str(tmp_path / "out.raw"))
    assert "unsupported chunk type %s" % name in line
    assert "at sector 2648" in line


# -- bad headers: QEMU's checks and messages -----------------------------------------------------------
def _poke(blob, offset, fmt, value):
    b = bytearray(blob)
    b[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(b)


BAD = [
    ("cloop", 128, ">I", 1000, "block_size 1000 must be a multiple of 512"),
    ("cloop", 128, ">I", 0, "block_size cannot be zero"),
    ("cloop", 128, ">I", 128 * MiB, "block_size 134217728 must be 64 MB or less"),
    ("cloop", 132, ">I", 0xFFFFFFFF, "n_blocks 4294967295 must be 536870911 or less"),
    ("cloop", 132, ">I", 0x10000000, "image requires too many offsets, try increasing block size"),
    ("cloop", 136 + 8 * 2, ">Q", 10, "offsets not monotonically increasing at index 2, image file is corrupt"),
    ("cloop", 136 + 8 * 3, ">Q", 1 << 40, "invalid compressed block size at index 3, image file is corrupt"),
    ("bochs", 72, "<I", 0x100001, "Catalog size is too large"),
    ("bochs", 80, "<I", 256, "Extent size must be at least 512"),
    ("bochs", 80, "<I", 3 * 512, "Extent size 1536 is not a power of two"),
    ("bochs", 80, "<I", 0x1000000, "Extent size 16777216 is too large"),
    ("bochs", 72, "<I", 2, "Catalog size is too small for this disk size"),
    ("bochs", 64, "<I", 0x30000, "Image not in Bochs format"),
]


@pytest.mark.parametrize("fmt,offset,pack,value,message", BAD, ids=[b[4][:30] for b in BAD])
def test_bad_headers_as_qemu(tmp_path, data, fmt, offset, pack, value, message):
    good = r.make_cloop(data[:MiB], 64 * 1024) if fmt == "cloop" else r.make_bochs(data[:MiB])
    img = r.write(tmp_path / "bad.img", _poke(good, offset, pack, value))
    assert message in engine_error(img, fmt)
    qemu = helpers.run("qemu-img", "info", "-f", fmt, img, check=False)
    assert qemu.returncode == 1
    assert message in qemu.stderr.decode()


def test_bad_dmg(tmp_path, data):
    good = r.make_dmg(data, DMG_LAYOUT, xml=False, tables=1)
    mish = good.index(b"mish")
    # the sector count of the first (zlib) chunk and the length of the second: QEMU's caps
    for field, value, message in ((204 + 16, 131073, "sector count 131073 for chunk 0 is larger than max (131072)"),
                                  (204 + 40 + 32, 64 * MiB + 1, "length 67108865 for chunk 1 is larger than max")):
        img = r.write(tmp_path / "bad.dmg", _poke(good, mish + field, ">Q", value))
        assert message in engine_error(img, "dmg")
    img = r.write(tmp_path / "bad.dmg", good[:-512] + bytes(512))
    assert "Could not locate UDIF trailer" in cli_error("info", "-f", "dmg", img)
    assert probe_file(img) == "raw"


# -- read-only: one-line errors for every write ----------------------------------------------------------
@pytest.mark.parametrize("fmt", ["cloop", "bochs", "dmg", "iso"])
def test_writes_are_refused(tmp_path, data, fmt):
    assert "does not support image creation" in cli_error("create", "-f", fmt, str(tmp_path / "new"), "1M")
    blob = {"cloop": lambda: r.make_cloop(data[:MiB]), "bochs": lambda: r.make_bochs(data[:MiB]),
            "dmg": lambda: r.make_dmg(data[:MiB], [(r.UDZO, 2048)], tables=1),
            "iso": lambda: bytes(32768) + b"\x01CD001\x01" + bytes(MiB)}[fmt]()
    img = r.write(tmp_path / ("disk." + fmt), blob)
    before = open(img, "rb").read()
    assert "read-only" in cli_error("resize", img, "+1M")
    if fmt == "dmg":
        assert cli_error("snapshot", "-c", "s1", img)
        assert cli_error("amend", "-o", "size=4M", img)
    with pytest.raises(errors.ReadOnlyImage, match="read-only"):
        open_image(img, fmt, writable=True)
    assert open(img, "rb").read() == before


# -- probing ------------------------------------------------------------------------------------------
def _images(data):
    return {"cloop": r.make_cloop(data[:MiB]), "bochs": r.make_bochs(data[:MiB]),
            "dmg": r.make_dmg(data[:MiB], [(r.UDZO, 2048)], tables=1),
            "iso": bytes(32768) + b"\x01CD001\x01" + bytes(2041) + b"\xffCD001\x01" + bytes(8192)}


@pytest.mark.parametrize("fmt", ["cloop", "bochs", "dmg", "iso"])
def test_probing_by_content_not_name(tmp_path, data, fmt):
    blob = _images(data)[fmt]
    for name in ("disk." + fmt, "renamed.qcow2", "no-extension", "disk.raw"):
        img = r.write(tmp_path / name, blob)
        assert probe_file(img) == fmt
        if name == "renamed.qcow2":
            out = helpers.vdisk_cli("info", img, check=True).stdout
            # an ISO is read as raw and called raw, as qemu-img calls it; the finding is shown too
            assert ("file format: raw\n" in out and "filesystem: iso9660" in out) if fmt == "iso" else \
                "file format: %s\n" % fmt in out
        os.unlink(img)


def _crafted(data):
    """Raw files that begin (or end) with another format's magic but lack its structure."""
    cloop = bytearray(r.make_cloop(data[:MiB]))
    cloop[128:132] = b"\0\0\0\0"                                # block size 0
    bochs = bytearray(r.make_bochs(data[:MiB]))
    bochs[48:64] = b"Undoable".ljust(16, b"\0")               # a redolog, but not a growing one
    dmg = bytearray(r.make_dmg(data[:MiB], [(r.UDZO, 2048)], tables=1))
    dmg[-508:-504] = b"\0\0\0\x03"                             # koly version 3
    iso = b"\x01CD001\x01" + bytes(40000)                      # the identifier, at the wrong place
    stray = r.CLOOP_MAGIC[:40] + bytes(4096)                   # a cut preamble
    return {"cloop-bs0": bytes(cloop), "bochs-undoable": bytes(bochs), "dmg-v3": bytes(dmg), "iso-at-0": iso,
            "cloop-cut": stray}


@pytest.mark.parametrize("case", ["cloop-bs0", "bochs-undoable", "dmg-v3", "iso-at-0", "cloop-cut"])
def test_crafted_raw_files_stay_raw(tmp_path, data, case):
    img = r.write(tmp_path / "guest.img", _crafted(data)[case])
    assert probe_file(img) == "raw"
    assert engine_info(img)["format"] == "raw"
    with open(img, "rb") as f:
        assert u.read_all(img, None) == f.read()


def test_grub_mbr_probes_raw(tmp_path):
    assert probe_file(u.sample("grub_mbr.raw", tmp_path)) == "raw"


def test_polyglot_iso_with_a_qcow2_header_is_refused(tmp_path):
    img = str(tmp_path / "cd.iso")
    helpers.run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    with open(img, "r+b") as f:                                 # cluster 0 is unused past the header
        f.seek(32768)
        f.write(b"\x01CD001\x01")
    with pytest.raises(errors.FormatError, match="more than one format"):
        probe_file(img)
    assert "give its format with -f" in cli_error("info", img)
    assert vdisk_info(img, "-f", "qcow2")["format"] == "qcow2"


def test_iso_with_a_bochs_header_reads_as_bochs(tmp_path, data):
    # neither names other files: the more specific format (signature at offset 0) wins
    blob = bytearray(r.make_bochs(data[:64 * 1024]).ljust(40000, b"\0"))
    blob[32768:32775] = b"\x01CD001\x01"
    img = r.write(tmp_path / "both.img", bytes(blob))
    assert probe_file(img) == "bochs"


# -- mutations ------------------------------------------------------------------------------------------
def _mutation_cases(data):
    cloop = r.make_cloop(data[:MiB], 64 * 1024)
    bochs = r.make_bochs(data[:MiB], 32 * 1024, reverse=True)
    dmg_r = r.make_dmg(data[:MiB], [(r.UDZO, 600), (r.UDZE, 100), (r.UDRW, 500), (r.UDBZ, 848)], xml=False)
    dmg_x = r.make_dmg(data[:MiB], [(r.UDZO, 600), (r.UDZE, 100), (r.UDRW, 500), (r.UDBZ, 848)], xml=True)
    m = dmg_r.index(b"mish")
    x = dmg_x.index(b"<?xml")
    return {
        "cloop": (cloop, [(0, 160), (128, 8), (136, 17 * 8), (136 + 17 * 8, 2000)]),
        "bochs": (bochs, [(64, 36), (512, 128), (640, 1024)]),
        "dmg-rsrc": (dmg_r, [(len(dmg_r) - 512, 512), (len(dmg_r) - 512 + 0x18, 32), (m, 400), (m - 300, 300)]),
        "dmg-plist": (dmg_x, [(len(dmg_x) - 512 + 0xd8, 16), (x, len(dmg_x) - 512 - x)]),
        "iso": (bytes(32768) + b"\x01CD001\x01" + bytes(4096), [(32768, 64)]),
    }


# (refused, accepted) of the 40 mutants of each seed: the seed fixes the flips, so a different split
# means a check was added to or lost from the format's parser
SPLITS = {
    "cloop": {1: (36, 4), 2: (34, 6), 3: (35, 5)},
    "bochs": {1: (17, 23), 2: (10, 30), 3: (6, 34)},
    "dmg-rsrc": {1: (21, 19), 2: (21, 19), 3: (20, 20)},
    "dmg-plist": {1: (31, 9), 2: (37, 3), 3: (34, 6)},
    "iso": {1: (0, 40), 2: (0, 40), 3: (0, 40)},
}


@pytest.mark.parametrize("case", list(SPLITS))
@pytest.mark.parametrize("seed", u.cells([1, 2, 3], (1,)))
def test_mutations(tmp_path, data, case, seed):
    blob, regions = _mutation_cases(data)[case]
    fmt = case.split("-")[0]
    good = r.write(tmp_path / "good.img", blob)
    out = u.mutation_run(good, fmt, regions, seed, 40, tmp_path, cli_every=40)
    refused, accepted = SPLITS[case][seed]
    assert out == {"error": refused, "clean": accepted}


@pytest.mark.parametrize("fmt,offset,pack,value", [
    ("cloop", 132, ">I", 0x0FFFFFFE),            # 2 GiB of offsets claimed, 2 KiB present
    ("bochs", 72, "<I", 0x100000),               # the largest catalog, past the end of the file
    ("bochs", 68, "<I", 0xFFFFFE00),             # catalog at 4 GiB: reads as zeros
])
def test_hostile_sizes_cost_no_memory(tmp_path, data, fmt, offset, pack, value):
    good = r.make_cloop(data[:MiB]) if fmt == "cloop" else r.make_bochs(data[:MiB])
    img = r.write(tmp_path / "h.img", _poke(good, offset, pack, value))
    proc, took = u.cli_limited("convert", "-f", fmt, "-O", "raw", img, str(tmp_path / "o.raw"))
    u.assert_clean_cli(proc)
    assert took < 20


def test_offsets_past_what_a_file_can_hold(tmp_path, data):
    # monotonic cloop offsets near 2^63, a dmg chunk at 2^64 - 5: an error, never an overflow
    blob = bytearray(r.make_cloop(data[:MiB]))
    for i in range(17):
        blob[136 + 8 * i:144 + 8 * i] = struct.pack(">Q", (1 << 63) - 3 + i)
    img = r.write(tmp_path / "h.cloop", bytes(blob))
    assert "does not inflate" in cli_error("convert", "-f", "cloop", "-O", "raw", img, str(tmp_path / "o.raw"))
    image = open_image(img, "cloop")
    try:
        with pytest.raises(errors.CorruptImage, match="beyond the largest file offset"):
            image.read(15 * 65536, 512)
    finally:
        close_chain(image)
    blob = bytearray(r.make_dmg(data[:MiB], [(r.UDZO, 2048)], xml=False, tables=1))
    m = blob.index(b"mish")
    blob[m + 204 + 24:m + 204 + 32] = struct.pack(">Q", (1 << 64) - 5)
    img = r.write(tmp_path / "h.dmg", bytes(blob))
    with pytest.raises(errors.CorruptImage, match="beyond the largest file offset"):
        u.read_all(img, "dmg")
