"""vhdx against qemu-img 7.2: what is specific to vhdx (the shared tests are in test_format_conformance):
CRC-32C, logged writes, log replay, the dirty-log sample, the BAT, hostile logs, 4Kn disks.

Allocating writes go through the log as QEMU's do; a BAT update interrupted after its log entry is
replayed by qemu-img and vdisk alike, also after the log wrapped to a new sequence; the image with a
dirty log reads like ``qemu-img convert -O raw`` after ``check -r all``; mutated logs, and mutated
headers, region tables, BATs and metadata with their checksums made right again, give one-line
errors; a power cut before any write of a session leaves an image ``check -r all`` makes whole.
"""
import json
import os
import random
import shutil
import struct
import time

import pytest

import helpers
import imgfmt_util as u
from conformance import BY_NAME, Cell
from helpers import MiB, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vhdx import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vhdx.crc32c import checksum, crc32c

FMT = "vhdx"
SUBFORMATS = ["dynamic", "fixed"]
DIRTY = "iotest-dirtylog-10G-4M.vhdx"
VHDX = BY_NAME[FMT]
qemu_create, vdisk_create, info_json = VHDX.qemu_create, VHDX.vdisk_create, VHDX.info


def read_at(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# -- CRC-32C ----------------------------------------------------------------------------------------------
def test_crc32c():
    assert crc32c(b"123456789") == 0xE3069283                 # the Castagnoli check value
    data = bytes(range(256)) * 40
    assert crc32c(data[1000:], crc32c(data[:1000])) == crc32c(data)
    start = time.time()
    crc32c(bytes(1 << 20))
    assert time.time() - start < 1.0


# -- logged writes ------------------------------------------------------------------------------------------
def test_interrupted_bat_update_replayed_by_qemu(tmp_path):
    """A crash after the log entry is stable but before the BAT is written: the log holds the
    update, qemu-img's (and vdisk's) replay brings the data back."""
    path = vdisk_create(tmp_path / "v.vhdx", 20 * MiB, block_size="1M")
    img = u.open_image(path, FMT, writable=True)
    bat_offset = img.bat_region.file_offset
    real = img.host.pwrite

    def crash(data, offset):
        if offset == bat_offset:
            raise KeyboardInterrupt("power cut")
        real(data, offset)
    img.host.pwrite = crash
    with pytest.raises(KeyboardInterrupt):
        img.write(3 * MiB + 512, pattern(3 * MiB + 512, 5000))
    img.host.pwrite = real
    img.close()                                          # the pending entry stays in the log
    copy = str(tmp_path / "copy.vhdx")
    shutil.copyfile(path, copy)
    proc = u.vdisk("info", "-f", FMT, path)
    assert proc.returncode == 1
    assert "check -r all" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    q = helpers.qemu_img("info", "-f", FMT, path)
    assert q.returncode == 1
    assert b"needs to be replayed" in q.stderr
    helpers.run("qemu-img", "check", "-r", "all", "-f", FMT, copy)
    assert u.vdisk("check", "-r", "all", "-f", FMT, path).returncode == 0
    for p in (copy, path):
        assert u.read_all(p, FMT)[3 * MiB + 512:3 * MiB + 5512] == pattern(3 * MiB + 512, 5000)
        assert helpers.qemu_check(p, FMT)["rc"] == 0


def test_writes_go_through_the_log(tmp_path):
    path = vdisk_create(tmp_path / "v.vhdx", 10 * MiB, block_size="1M")
    img = u.open_image(path, FMT, writable=True)
    try:
        seen = []
        real = img.host.pwrite

        def logged(data, offset):
            seen.append((offset, bytes(data[:4])))
            real(data, offset)
        img.host.pwrite = logged
        img.write(MiB, b"x" * 4096)
        img.write(MiB + 4096, b"y" * 4096)            # allocated already: no log
        img.write(5 * MiB, b"z" * 4096)               # the next entry of the same sequence
        heads = [hdr.parse_header(read_at(path, o, hdr.HEADER_SIZE)) for o in (hdr.HEADER1_OFFSET,
                                                                               hdr.HEADER2_OFFSET)]
        assert heads[0].log_guid == heads[1].log_guid != hdr.ZERO_GUID
    finally:
        img.close()
    log_offset = hdr.HEADER_SECTION_END
    bat = img.bat_region.file_offset
    kinds = [("log%d" % (o - log_offset) if log_offset <= o < 2 * MiB else "BAT" if o == bat else
              "header" if o in (hdr.HEADER1_OFFSET, hdr.HEADER2_OFFSET) else "data") for o, dummy in seen]
    # data-write GUID (both headers), data, log GUID set (both), entry, BAT sector; data, data, entry,
    # BAT sector; log GUID cleared at close (both)
    assert kinds == ["header", "header", "data", "header", "header", "log0", "BAT", "data", "data", "log8192",
                     "BAT", "header", "header"], kinds
    assert seen[5][1] == b"loge"
    assert seen[9][1] == b"loge"
    heads = [hdr.parse_header(read_at(path, o, hdr.HEADER_SIZE)) for o in (hdr.HEADER1_OFFSET, hdr.HEADER2_OFFSET)]
    assert heads[0].log_guid == heads[1].log_guid == hdr.ZERO_GUID
    assert helpers.qemu_check(path, FMT)["rc"] == 0


def test_log_wraps_to_a_new_sequence(tmp_path):
    """More new blocks than the 1 MiB log holds entries: the log is retired and restarted; a crash in
    the second round replays only the second round's entries (qemu-img agrees)."""
    path = vdisk_create(tmp_path / "v.vhdx", 300 * MiB, block_size="1M")
    img = u.open_image(path, FMT, writable=True)
    try:
        for k in range(140):                         # 127 two-sector entries fit in the log
            img.write(k * MiB + 7, bytes([k + 1]) * 100)
    finally:
        img.host.close()                             # a crash: the log still holds the second round
    copy = str(tmp_path / "copy.vhdx")
    shutil.copyfile(path, copy)
    helpers.run("qemu-img", "check", "-r", "all", "-f", FMT, copy)
    assert u.vdisk("check", "-r", "all", "-f", FMT, path).returncode == 0
    for p in (path, copy):
        img = u.open_image(p, FMT)
        try:
            for k in range(140):
                assert img.read(k * MiB, MiB) == bytes(7) + bytes([k + 1]) * 100 + bytes(MiB - 107)
        finally:
            img.close()
    assert helpers.qemu_check(path, FMT)["rc"] == 0


# -- the dirty log ---------------------------------------------------------------------------------------
def test_dirty_log_sample(tmp_path):
    path = u.sample(DIRTY, tmp_path)
    before = u.sha(path)
    proc = u.vdisk("info", "-f", FMT, path)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1
    assert "contains a log that needs to be replayed" in proc.stderr
    assert "check -r all" in proc.stderr
    assert u.vdisk("convert", "-O", "raw", path, tmp_path / "x.raw").returncode == 1
    assert u.sha(path) == before
    copy = str(tmp_path / "qemu-copy.vhdx")
    shutil.copyfile(path, copy)
    q = helpers.qemu_img("check", "-f", FMT, copy)        # read-only: qemu-img refuses too
    assert q.returncode == 1
    assert b"needs to be replayed" in q.stderr
    helpers.run("qemu-img", "check", "-r", "all", "-f", FMT, copy)
    proc = u.vdisk("check", "-r", "all", "--output=json", "-f", FMT, path)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["corruptions-fixed"] == 1
    assert json.loads(u.vdisk("check", "--output=json", "-f", FMT, path, check=True).stdout) == {
        "filename": str(path), "format": FMT, "check-errors": 0}
    assert helpers.qemu_check(path, FMT)["rc"] == 0
    assert helpers.qemu_compare(path, copy, FMT, FMT)
    u.assert_same_as_qemu(path, FMT, tmp_path)
    assert info_json(path, "vdisk") == info_json(copy, "qemu")


def test_bat_past_eof_and_partially_present(tmp_path):
    path = qemu_create(tmp_path / "q.vhdx", 20 * MiB, block_size="1M")
    helpers.qemu_io(FMT, path, "write -P 1 0 4k")
    bat = hdr.parse_region_table(read_at(path, hdr.REGION1_OFFSET, hdr.REGION_TABLE_SIZE))[0].file_offset
    u.poke(path, bat + 8, struct.pack("<Q", (1 << 40) | hdr.PAYLOAD_BLOCK_FULLY_PRESENT))
    q = helpers.qemu_img("info", "-f", FMT, path)
    v = u.vdisk("info", "-f", FMT, path)
    assert q.returncode == 1
    assert b"points after end of file" in q.stderr
    assert v.returncode == 1
    assert "points after end of file" in v.stderr
    assert len(v.stderr.splitlines()) == 1
    q = helpers.qemu_check(path, FMT)
    v = u.vdisk("check", "-r", "all", "--output=json", "-f", FMT, path)
    assert q["corruptions"] == json.loads(v.stdout)["corruptions"] == 1
    u.poke(path, bat + 8, struct.pack("<Q", hdr.PAYLOAD_BLOCK_PARTIALLY_PRESENT))
    img = u.open_image(path, FMT)
    try:
        assert img.read(0, 4096) == b"\x01" * 4096
        with pytest.raises(errors.CorruptImage):
            img.read(MiB, 512)
    finally:
        img.close()


# -- mutations ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub", SUBFORMATS)
@pytest.mark.parametrize("seed", u.cells([1, 2, 3], (1,)))
def test_mutations_with_checksums_fixed(tmp_path, sub, seed):
    """Byte flips in the headers, region table, BAT and metadata table, their checksums made right
    again so that the flips reach the parsers behind them (the flips alone: test_format_conformance)."""
    good, regions = VHDX.mutation_image(tmp_path, Cell({"subformat": sub}))
    rng = random.Random(seed)
    for case in range(16):
        path = str(tmp_path / ("crc-%d" % case))
        shutil.copyfile(good, path)
        u.flip_bytes(path, rng, regions[:5], rng.randint(1, 3))
        VHDX.fix_checksums(path)
        before = u.sha(path)
        start = time.time()
        exc = u.exercise(path, FMT)
        assert time.time() - start < 10
        assert exc is None or "\n" not in str(exc), str(exc)
        if case % 16 == 5:
            proc, took = u.cli_limited("info", "-f", FMT, path)
            assert took < 20
            u.assert_clean_cli(proc)
        assert u.sha(path) == before
        os.unlink(path)


@pytest.mark.parametrize("seed", u.cells([1, 2], (1,)))
def test_log_mutations(tmp_path, seed):
    """Flips in the dirty sample's log entries: a read-only open refuses or reads, a replay succeeds
    or gives one line, always in bounded time and memory."""
    good = u.sample(DIRTY, tmp_path)
    rng = random.Random(seed)
    regions = [(hdr.HEADER_SECTION_END + k * 8192, 8192) for k in range(7)]
    for case in range(8):
        path = str(tmp_path / ("log-%d" % case))
        shutil.copyfile(good, path)
        u.flip_bytes(path, rng, regions, rng.randint(1, 3))
        if case % 2:
            # keep the entries' CRC right, so descriptors and data sectors are what is tested
            with open(path, "r+b") as f:
                for k in range(7):
                    f.seek(hdr.HEADER_SECTION_END + k * 8192)
                    entry = bytearray(f.read(8192))
                    f.seek(hdr.HEADER_SECTION_END + k * 8192 + 4)
                    f.write(struct.pack("<I", checksum(entry, 4)))
        before = u.sha(path)
        exc = u.exercise(path, FMT)
        assert exc is None or "\n" not in str(exc)
        assert u.sha(path) == before
        if case % 2 == 0:
            proc, took = u.cli_limited("check", "-r", "all", "-f", FMT, path)
            assert took < 20
            u.assert_clean_cli(proc, allow_multiline=True)
        else:
            # in-process: the replay (or its refusal) and the reads after it
            try:
                img = u.open_image(path, FMT, writable=True, policy=u.Policy(repair=True))
            except errors.ImageError as exc:
                assert "\n" not in str(exc)
            else:
                u.close_chain(img)
                exc = u.exercise(path, FMT)
                assert exc is None or "\n" not in str(exc)
        os.unlink(path)


@pytest.mark.slow
def test_crash_at_every_write(tmp_path):
    """A power cut before each file write of a session that allocates blocks (header updates, data,
    log entries, BAT sectors, the log's retirement): after ``check -r all`` the image passes
    ``qemu-img check`` and every guest write reads either wholly new or as before (zeros)."""
    good = vdisk_create(tmp_path / "good.vhdx", 12 * MiB, block_size="1M")
    writes = [(MiB + 100, b"\x11" * 5000), (3 * MiB - 10, b"\x22" * 20), (9 * MiB, b"\x33" * 4096)]
    k = 0
    while True:
        path = str(tmp_path / ("crash-%d.vhdx" % k))
        shutil.copyfile(good, path)
        img = u.open_image(path, FMT, writable=True)
        real = img.host.pwrite
        count = [0]

        def cut(data, offset, count=count, real=real, k=k):
            if count[0] == k:
                raise KeyboardInterrupt("power cut")
            count[0] += 1
            real(data, offset)
        img.host.pwrite = cut
        try:
            for offset, data in writes:
                img.write(offset, data)
            img.close()
            done = True
        except KeyboardInterrupt:
            img.host.close()
            done = False
        img = u.open_image(path, FMT, writable=True, policy=u.Policy(repair=True))    # replays the log
        try:
            assert img.check("all").exit_code() == 0
        finally:
            img.close()
        assert helpers.qemu_check(path, FMT)["rc"] == 0
        data = u.read_all(path, FMT)
        for offset, new in writes:
            assert data[offset:offset + len(new)] in (new, bytes(len(new))), (k, offset)
        os.unlink(path)
        if done:
            assert k > 10
            break
        k += 1


def _dirty(path, entry):
    """Put *entry* at the log's start and its GUID (from the entry) in both headers."""
    guid = entry[32:48]
    for at in (hdr.HEADER1_OFFSET, hdr.HEADER2_OFFSET):
        h = hdr.parse_header(read_at(path, at, hdr.HEADER_SIZE))
        h.log_guid = guid
        u.poke(path, at, h.pack())
    u.poke(path, hdr.HEADER_SECTION_END, entry)


def _zero_entry(guid, offset, length, file_size):
    buf = bytearray(hdr.LOG_SECTOR)
    hdr.LOG_HEADER.pack_into(buf, 0, hdr.LOG_SIGNATURE, 0, hdr.LOG_SECTOR, 0, 1, 1, 0, guid, file_size, file_size)
    hdr.LOG_DESC.pack_into(buf, hdr.LOG_HEADER.size, hdr.ZERO_SIGNATURE, 0, struct.pack("<Q", length), offset, 1)
    struct.pack_into("<I", buf, 4, checksum(buf, 4))
    return bytes(buf)


@pytest.mark.parametrize("case,message", [
    ("into the headers", "outside the file's metadata and data"),
    ("zeros past the end", "outside the file's metadata and data"),
    ("zeros over and over", "log replay would write"),
    ("truncated file", "has been truncated"),
])
def test_hostile_log_entries_refused(tmp_path, case, message):
    path = vdisk_create(tmp_path / "v.vhdx", 20 * MiB)
    size = os.path.getsize(path)
    guid = bytes(range(1, 17))
    bat = hdr.parse_region_table(read_at(path, hdr.REGION1_OFFSET, hdr.REGION_TABLE_SIZE))[0].file_offset
    if case == "into the headers":
        entry = hdr.pack_log_entry(1, 0, guid, size, [(hdr.HEADER1_OFFSET, b"\xff" * hdr.LOG_SECTOR)])
    elif case == "zeros past the end":
        entry = _zero_entry(guid, bat, 1 << 40, size)
    elif case == "zeros over and over":
        buf = bytearray(_zero_entry(guid, bat, size - bat - 4096, size))
        struct.pack_into("<I", buf, 24, 100)                # 100 descriptors, all zeroing most of the file
        for i in range(1, 100):
            buf[64 + 32 * i:96 + 32 * i] = buf[64:96]
        buf = buf + bytes(hdr.LOG_SECTOR)                    # the descriptors need two sectors
        struct.pack_into("<I", buf, 8, len(buf))
        struct.pack_into("<I", buf, 4, checksum(buf, 4))
        entry = bytes(buf)
    else:
        entry = hdr.pack_log_entry(1, 0, guid, size + MiB, [(bat, bytes(hdr.LOG_SECTOR))])
    _dirty(path, entry)
    before = u.sha(path)
    proc, took = u.cli_limited("check", "-r", "all", "-f", FMT, path)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert u.sha(path) == before
    assert took < 20


def test_sector_bitmap_entries_interleaved(tmp_path):
    """With 1 MiB blocks a sector bitmap entry follows every 4096 payload entries: blocks past the
    first chunk map through the right BAT entries both ways."""
    size = 5 * 1024 * MiB
    path = qemu_create(tmp_path / "q.vhdx", size, block_size="1M")
    helpers.qemu_io(FMT, path, "write -P 0x61 %d 4k" % (4096 * MiB - 4096), "write -P 0x62 %d 4k" % (4096 * MiB),
                    "write -P 0x63 %d 512" % (size - 512))
    u.write_engine(path, FMT, [(4097 * MiB + 5, b"\x64" * 3000), (4095 * MiB, b"\x65" * 512)])
    helpers.qemu_io(FMT, path, "read -P 0x61 %d 4k" % (4096 * MiB - 4096), "read -P 0x62 %d 4k" % (4096 * MiB),
                    "read -P 0x64 %d 3000" % (4097 * MiB + 5), "read -P 0x65 %d 512" % (4095 * MiB),
                    "read -P 0x63 %d 512" % (size - 512))
    img = u.open_image(path, FMT)
    try:
        assert img.ratio == 4096
        assert len(img.bat) == 5120 + 1
        assert img.read(4096 * MiB - 4096, 8192) == b"\x61" * 4096 + b"\x62" * 4096
        assert img.read(size - 512, 512) == b"\x63" * 512
    finally:
        img.close()
    assert helpers.qemu_check(path, FMT)["rc"] == 0


def test_qemu_writes_into_vdisk_image(tmp_path):
    for sub in SUBFORMATS:
        path = vdisk_create(tmp_path / ("v-%s.vhdx" % sub), 10 * MiB + 512, subformat=sub, block_state_zero="off")
        helpers.qemu_io(FMT, path, "write -P 0x71 0 64k", "write -P 0x72 %d 512" % (10 * MiB))
        data = u.read_all(path, FMT)
        assert data[:65536] == b"\x71" * 65536
        assert data[10 * MiB:] == b"\x72" * 512
        assert data == u.qemu_raw(path, FMT, tmp_path)


def test_4k_logical_sectors(tmp_path):
    """A 4Kn disk (Hyper-V makes them; qemu-img 7.2 refuses to open them): the chunk ratio follows
    the logical sector size, and vdisk reads back what it wrote."""
    path = vdisk_create(tmp_path / "k.vhdx", 20 * MiB, block_size="1M")
    meta = hdr.parse_region_table(read_at(path, hdr.REGION1_OFFSET, hdr.REGION_TABLE_SIZE))[1].file_offset
    u.poke(path, meta + hdr.METADATA_TABLE_SIZE + 32, struct.pack("<II", 4096, 4096))
    assert helpers.qemu_img("info", "-f", FMT, path).returncode == 1
    u.write_engine(path, FMT, [(5 * MiB + 3, b"\x44" * 10000), (20 * MiB - 4096, b"\x45" * 4096)])
    img = u.open_image(path, FMT)
    try:
        assert img.ratio == 32768
        assert img.md.logical_sector_size == 4096
        data = img.read(0, 20 * MiB)
    finally:
        img.close()
    assert data[5 * MiB + 3:5 * MiB + 10003] == b"\x44" * 10000
    assert data[-4096:] == b"\x45" * 4096
    assert data.count(0) == 20 * MiB - 14096
    u.poke(path, meta + hdr.METADATA_TABLE_SIZE + 32, struct.pack("<I", 1024))
    v = u.vdisk("info", "-f", FMT, path)
    assert v.returncode == 1
    assert "logical sector size 1024" in v.stderr
