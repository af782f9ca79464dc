"""The FORMATS table of the format-conformance suite (``test_format_conformance.py``,
``test_format_model.py``): one entry per format, what the shared tests need to know about it.

An entry names the format as qemu-img does, says what it supports (qemu-img check, -o help's
options) and lists the cells of each shared test it takes part in: create options and sizes,
options qemu-img refuses, header edits, mutation seeds and what they give. A format leaves a
list empty to stay out of a test. The few things that differ in how a test looks at a format
(what of a new file must equal qemu-img's, how to damage or mutate one) are methods of its entry,
reading the files with the specifications' offsets, not through vdisk's own parsers.

A cell runs by default, or only with ``-m slow`` (``fast=False``): ``product`` marks a cell fast
when each of its values is among the fast ones of its dimension.
"""
import hashlib
import itertools
import json
import os
import re
import struct
import uuid

import helpers
import imgfmt_util as u
from helpers import MiB, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vhdx.crc32c import checksum as crc32c_checksum

KiB = 1024
GiB = 1024 * MiB
FIXED_UUIDS = bytes(range(1, 33))       # in place of the random ones qemu-img writes


class Cell:
    """One parameter set of a shared test: create options, a size, and whatever else the test
    reads from it (``seed``, ``message``, ...), as attributes."""

    def __init__(self, opts=None, size=None, fast=True, label=None, **more):
        self.opts = dict(opts or {})
        self.size = size
        self.fast = fast
        self.label = label
        self.seed = None
        self.how = None
        self.more_writes = []
        self.sample = None
        self.grow = 0
        self.args = ()
        self.__dict__.update(more)

    @property
    def id(self):
        if self.label:
            return self.label
        parts = ["%s=%s" % kv for kv in self.opts.items()]
        if self.size is not None:
            parts.append(str(self.size))
        if self.seed is not None:
            parts.append("seed=%d" % self.seed)
        if self.how:
            parts.append(self.how)
        return ",".join(parts) or "default"


CELL_FIELDS = ("size", "seed", "how", "args", "more_writes")


def product(**dims):
    """Cells over the product of the dimensions. A dimension is ``name=[values]`` (all run by default)
    or ``name=([values], [those that run by default])``; ``opts`` is a dict of options merged in, a
    name of CELL_FIELDS the cell's attribute, any other name a create option (``None``: not given)."""
    axes = []
    for name, spec in dims.items():
        values, fast = spec if isinstance(spec, tuple) else (spec, spec)
        axes.append([(name, v, v in fast) for v in values])
    cells = []
    for combo in itertools.product(*axes):
        opts, more = {}, {}
        for name, value, dummy in combo:
            if name == "opts":
                opts.update(value)
            elif name in CELL_FIELDS:
                more[name] = value
            elif value is not None:
                opts[name] = value
        cells.append(Cell(opts, fast=all(f for dummy, dummy2, f in combo), **more))
    return cells


def read_at(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def le32(path, offset):
    return struct.unpack("<I", read_at(path, offset, 4))[0]


def le64(path, offset):
    return struct.unpack("<Q", read_at(path, offset, 8))[0]


class Format:
    """What every entry defines; a subclass overrides what differs for its format."""
    name = None
    ext = None
    checkable = True            # qemu-img check works on it (else: exit 63, "does not support checks")
    help_names = frozenset()    # the options ``create -o help`` lists, each line as qemu-img's
    help_own_text = ()          # options whose help text is vdisk's own (only name and type as qemu-img's)
    create_cells = ()           # test_create_identical_to_qemu
    refused_cells = ()          # test_create_refused_like_qemu
    probe_cells = ()            # test_probe: (label, bytes from the header of a qemu-img image, score)
    written_cells = ()          # test_qemu_written_reads_identically
    map_like_qemu = True        # vdisk map --output=json prints what qemu-img map prints
    over_2g_cells = ()          # test_qemu_written_over_2g
    samples = ()                # test_samples_read_like_qemu (from VDISK_SAMPLES)
    convert_cells = ()          # test_vdisk_convert_passes_qemu
    writes_into_cells = ()      # test_vdisk_writes_into_qemu_image
    damage_cells = ()           # test_check_like_qemu: the ``how`` of ``damaged``
    check_stderr_like_qemu = True   # check's per-problem lines are qemu-img's
    unsupported_check_cells = ()    # test_check_unsupported_like_qemu
    bad_header_cells = ()       # test_bad_header_refused_like_qemu
    hostile_write_cells = ()    # test_hostile_entry_not_written
    bad_header_size = MiB
    bad_header_limited = False  # run vdisk under the memory and time limits of u.cli_limited
    mutation_cells = ()         # test_mutations: seeds and the (refused, accepted) split they give
    mutation_cases = 30
    mutation_cli_every = 15
    model_cells = ()            # test_format_model: a size, options, whether qemu-img check judges it

    def __repr__(self):
        return self.name

    # -- creating and comparing ---------------------------------------------------------------------
    def create(self, tool, path, size, opts):
        return u.create(tool, path, self.name, size, **opts)

    def qemu_create(self, path, size, **opts):
        return self.create("qemu", path, size, opts)

    def vdisk_create(self, path, size, **opts):
        return self.create("vdisk", path, size, opts)

    def layout(self, path):
        """What of a new image must equal qemu-img's for the same options: by default every byte."""
        return u.sha(path)

    def unopenable(self, cell):
        """The error qemu-img (and vdisk) give opening what qemu-img creates for *cell*, if it cannot."""
        return None

    def probed_as(self, cell):
        return self.name

    def check_created(self, path, cell):
        """Format-specific fields of a new vdisk image."""

    def info(self, path, tool):
        return u.info_json(path, self.name, tool)

    def virtual_size(self, tmp_path, size, opts):
        """The virtual size of an image made for *size* bytes: a whole number of sectors."""
        return -(-int(size) // 512) * 512

    def closed_cleanly(self, path):
        """What a cleanly closed image of this format shows (flags cleared, copies equal)."""

    # -- writing ------------------------------------------------------------------------------------
    def fill_block(self, opts):
        """The allocation unit qemu-img's fill crosses (a cluster, a block)."""
        return MiB

    def convert_block(self, opts):
        return MiB

    # -- damage -------------------------------------------------------------------------------------
    def damaged(self, tmp_path, how):
        raise NotImplementedError

    def apply_edits(self, path, cell):
        """Make the edits of a bad-header cell (and whatever keeps them from being caught earlier)."""
        for offset, value in cell.edits:
            u.poke(path, offset, value)

    def mutation_image(self, tmp_path, cell):
        """A good image and the ``(offset, length)`` regions of it the mutations flip bytes in."""
        raise NotImplementedError


def size_of(text):
    """Bytes of a qemu-img size (``4k``, ``1M``, ``1000``)."""
    text = str(text)
    units = {"k": KiB, "K": KiB, "M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def bad(label, message, *edits, qemu="same", fast=True, fix=True, **more):
    """Header edits ``(offset, bytes)`` vdisk refuses with *message* in one line; qemu-img gives the
    same message (``qemu="same"``), refuses with its own (``"refuses"``) or is not asked (``None``);
    *fix*: checksums are made right again, so that the edit itself is what is refused."""
    return Cell(more.pop("opts", None), more.pop("size", None), label=label, message=message, edits=list(edits),
                qemu=qemu, fast=fast, fix=fix, **more)


def refused(opts, size, message, qemu="same", fast=True):
    return Cell(opts, size, fast=fast, message=message, qemu=qemu)


def split(rows):
    """Mutation cells from ``(options, seed, refused, accepted, fast)`` rows."""
    return [Cell(opts, seed=seed, expected={"error": e, "clean": c}, fast=fast) for opts, seed, e, c, fast in rows]


def qemu_io_fill(path, fmt, size, at):
    """The three writes the mutation images hold: the start, *at*, the last 4 KiB."""
    helpers.qemu_io(fmt, path, "write -P 1 0 12k", "write -P 2 %d 8k" % at, "write -P 3 %d 4k" % (size - 4096))


# -- vdi --------------------------------------------------------------------------------------------------
class Vdi(Format):
    name = ext = "vdi"
    help_names = frozenset({"size", "static", "preallocation"})
    UUIDS = (392, 424)      # uuid_image and uuid_last_snap: random in every image
    STATIC = ["off", "on"]
    create_cells = (product(static=STATIC, size=([0, 12345, 1000000, 5 * MiB + 512, 3 * MiB], [1000000]))
                    + product(preallocation=(["falloc", "full"], ["full"]), size=[3 * MiB]))
    refused_cells = [
        refused({}, "5P", "Unsupported VDI image size (size is 0x14000000000000, max supported is 0x1fffff8000000)"),
        refused({"static": "maybe"}, "1M", "static", fast=False),
        refused({"cluster_size": "2M"}, "1M", "cluster_size", fast=False),
    ]
    probe_cells = [("short-header", lambda head: head[:511], 0)]        # QEMU wants a whole header
    written_cells = product(static=STATIC, size=([12345, 1000000, 5 * MiB + 512, 3 * MiB], [5 * MiB + 512]))
    over_2g_cells = product(static=(STATIC, ["off"]))
    convert_cells = product(static=STATIC, size=([5 * MiB + 512, 12345, 3 * MiB], [5 * MiB + 512]))
    writes_into_cells = product(static=STATIC, size=[4 * MiB + 1536])
    damage_cells = product(how=(["clean", "duplicate", "too-large", "count", "discarded"], ["duplicate", "too-large"]))
    unsupported_check_cells = [Cell(label="repair-leaks", args=("-r", "leaks"), fast=False),
                               Cell(label="repair-all", args=("-r", "all"))]
    bad_header_size = 3 * MiB
    bad_header_cells = [
        bad("signature", "Image not in VDI format (bad signature beda1070)", (64, struct.pack("<I", 0xBEDA1070))),
        bad("version", "unsupported VDI image (version 2.1)", (68, struct.pack("<I", 0x00020001))),
        bad("bmap-offset", "unaligned block map offset 0x201", (340, struct.pack("<I", 0x201)), fast=False),
        bad("data-offset", "unaligned data offset 0x401", (344, struct.pack("<I", 0x401)), fast=False),
        bad("sector-size", "sector size 4096 is not 512", (360, struct.pack("<I", 4096)), fast=False),
        bad("block-size", "block size 2097152 is not 1048576", (376, struct.pack("<I", 2 * MiB))),
        bad("bmap-too-small", "image bitmap has room for 1048576", (384, struct.pack("<I", 1)), fast=False),
        # with a disk so large that the map has room for it
        bad("too-many-blocks", "too many blocks 2147483647, max is 536870784", (384, struct.pack("<I", 0x7FFFFFFF)),
            (368, struct.pack("<Q", 1 << 40))),
        bad("disk-size", "Unsupported VDI image size", (368, struct.pack("<Q", 1 << 60))),
        bad("link-uuid", "non-NULL link UUID", (424, b"\x01"), fast=False),
        bad("parent-uuid", "non-NULL parent UUID", (440, b"\x01")),
    ]
    hostile_write_cells = [bad("data-offset-0", "", (344, struct.pack("<I", 0)), size=3 * MiB)]   # data on the header
    mutation_cells = split([
        ({"static": "off"}, 1, 12, 18, True), ({"static": "off"}, 2, 18, 12, False),
        ({"static": "off"}, 3, 12, 18, False), ({"static": "on"}, 1, 12, 18, False),
        ({"static": "on"}, 2, 18, 12, False), ({"static": "on"}, 3, 12, 18, False),
    ])
    model_cells = [Cell({}, 3 * MiB + 512, label="vdi-dynamic", checkable=True),
                   Cell({"static": "on"}, 2 * MiB, label="vdi-static", checkable=True)]
    BMAP = 0x200            # where qemu-img puts the block map
    DISCARDED = 0xFFFFFFFE

    def layout(self, path):
        with open(path, "rb") as f:
            data = bytearray(f.read())
        data[self.UUIDS[0]:self.UUIDS[1]] = bytes(self.UUIDS[1] - self.UUIDS[0])
        return hashlib.sha256(data).hexdigest()

    def check_created(self, path, cell):
        head = read_at(path, 0, 512)
        image, last_snap = (uuid.UUID(bytes_le=head[o:o + 16]) for o in (392, 408))
        # fresh version-4 UUIDs, stored in VirtualBox's byte order, as qemu-img writes them
        assert image.version == 4
        assert last_snap.version == 4
        assert image != last_snap
        assert struct.unpack_from("<IIII", head, 348) == (0, 0, 0, 512)    # no geometry; 512-byte sectors

    def damaged(self, tmp_path, how):
        path = self.create("qemu", tmp_path / "q.vdi", 4 * MiB, {})
        helpers.qemu_io(self.name, path, "write -P 1 0 1M", "write -P 2 2M 4k")
        edits = {"duplicate": (self.BMAP + 8, 0), "too-large": (self.BMAP + 4, 9), "count": (388, 5),
                 "discarded": (self.BMAP + 8, self.DISCARDED)}
        if how in edits:
            u.poke(path, edits[how][0], struct.pack("<I", edits[how][1]))
        return path

    def mutation_image(self, tmp_path, cell):
        good = self.create("qemu", tmp_path / "good.vdi", 6 * MiB, cell.opts)
        qemu_io_fill(good, self.name, 6 * MiB, 3 * MiB)
        u.poke(good, self.UUIDS[0], FIXED_UUIDS)        # the same bytes in every run, so the same split
        return good, [(0, 512), (64, 32), (336, 120), (512, 512)]


# -- qed ----------------------------------------------------------------------------------------------------
class Qed(Format):
    name = ext = "qed"
    help_names = frozenset({"backing_file", "backing_fmt", "cluster_size", "preallocation", "size", "table_size"})
    CLUSTERS = ["4k", "64k", "1M"]
    TABLES = ["2", "4", "16"]
    create_cells = (product(cluster_size=(CLUSTERS, ["4k", "64k"]), table_size=(TABLES + ["1"], ["1", "4"]),
                            size=[1000000])
                    + product(preallocation=(["off", "falloc", "full"], ["full"]), size=[3 * MiB]))
    refused_cells = [
        refused({"cluster_size": "2k"}, "1M", "QED cluster size must be within range [4096, 67108864] and power of 2"),
        refused({"cluster_size": "96k"}, "1M", "QED cluster size must be within range"),
        refused({"table_size": "3"}, "1M", "QED table size must be within range [1, 16] and power of 2"),
        refused({"table_size": "32"}, "1M", "QED table size must be within range"),
        refused({"cluster_size": "4k", "table_size": "1"}, "2049M",
                "QED image size must be a non-zero multiple of cluster size and less than 1073741824 bytes"),
    ]
    written_cells = product(cluster_size=(CLUSTERS, ["4k"]), table_size=(TABLES, ["2"]),
                            size=([1000000, 4 * MiB, 5 * MiB + 512], [1000000]))
    over_2g_cells = product(cluster_size=["4k"], table_size=["2"])
    convert_cells = product(cluster_size=(CLUSTERS, ["4k", "1M"]), table_size=(TABLES, ["2"]), size=[5 * MiB + 512])
    writes_into_cells = product(cluster_size=(CLUSTERS, ["4k"]), table_size=["2"], size=[9 * MiB + 1536],
                                more_writes=[[(8 * MiB + 5, 9)]])
    damage_cells = product(how=["leak", "bad-data", "unaligned-data", "bad-l2", "double"])
    check_stderr_like_qemu = False      # vdisk names each bad entry; qemu-img 7.2's qed check says nothing
    mutation_cells = split([({}, 1, 16, 9, True), ({}, 2, 18, 7, False)])
    mutation_cases = 25
    mutation_cli_every = 6
    model_cells = [Cell({"cluster_size": "4k", "table_size": "2"}, 9 * MiB, label="qed-4k-t2", checkable=True),
                   Cell({}, MiB, label="qed-64k", checkable=True)]
    NEED_CHECK = 0x02

    def unopenable(self, cell):
        # QEMU's table offset test refuses one-cluster tables: such images cannot be opened
        return "QED table offset is invalid" if cell.opts.get("table_size") == "1" else None

    def fill_block(self, opts):
        return size_of(opts.get("cluster_size", "64k"))

    def closed_cleanly(self, path):
        assert le64(path, 16) & self.NEED_CHECK == 0

    def tables(self, path):
        """The L1 table's offset and the first L2 table's."""
        l1 = le64(path, 40)
        return l1, le64(path, l1)

    def damaged(self, tmp_path, how):
        path = self.create("qemu", tmp_path / "q.qed", 8 * MiB, {"cluster_size": "4k", "table_size": "2"})
        helpers.qemu_io(self.name, path, "write -P 1 0 8k", "write -P 2 4M 4k")
        l1, l2 = self.tables(path)
        if how == "leak":
            os.truncate(path, os.path.getsize(path) + 8192)
        elif how == "bad-data":
            u.poke(path, l2 + 8, struct.pack("<Q", 0x7FFF000))
        elif how == "unaligned-data":
            u.poke(path, l2 + 8, struct.pack("<Q", 0x8800))
        elif how == "bad-l2":
            u.poke(path, l1 + 8, struct.pack("<Q", 0x123000000))
        elif how == "double":
            u.poke(path, l2 + 8, read_at(path, l2, 8))
        return path

    def mutation_image(self, tmp_path, cell):
        good = self.create("qemu", tmp_path / "good.qed", 8 * MiB, {"cluster_size": "4k", "table_size": "2"})
        qemu_io_fill(good, self.name, 8 * MiB, 4 * MiB)
        l1 = le64(good, 40)
        return good, [(0, 64), (l1, 32), (l1 + 8192, 16 * 8 * 3)]


# -- parallels ----------------------------------------------------------------------------------------------
class Parallels(Format):
    name = "parallels"
    ext = "prl"
    help_names = frozenset({"cluster_size", "preallocation", "size"})
    CLUSTERS = ["512", "1000", "4k", "64k", "1M"]       # 1000: qemu-img rounds it up to 1024
    create_cells = (product(cluster_size=(CLUSTERS, ["1000", "1M"]), size=[1000000, 5 * MiB + 512])
                    + product(preallocation=["off", "falloc", "full"], size=[3 * MiB]))
    refused_cells = [refused({"cluster_size": "0"}, "1M", "Image size is too large for this cluster size"),
                     refused({"cluster_size": "4G"}, "1M", "Cluster size is too large")]
    probe_cells = [("v2", lambda head: b"WithoutFreeSpace" + struct.pack("<I", 2) + bytes(44), 100),
                   ("v3", lambda head: b"WithoutFreeSpace" + struct.pack("<I", 3) + bytes(44), 0)]
    written_cells = product(cluster_size=(CLUSTERS, ["512", "64k"]),
                            size=([1000000, 4 * MiB, 5 * MiB + 512, 12345], [5 * MiB + 512, 12345]))
    over_2g_cells = product(cluster_size=["64k"])
    samples = ["parallels-v1", "parallels-v2", "parallels-with-bitmap", "fake.parallels"]
    convert_cells = product(cluster_size=(CLUSTERS, ["1000", "4k", "1M"]), preallocation=(["off", "full"], ["off"]),
                            size=[5 * MiB + 512])
    writes_into_cells = product(cluster_size=(CLUSTERS, ["512", "64k"]), size=[4 * MiB + 1536])
    damage_cells = product(how=["outside", "leak", "truncated", "outside-and-leak"])
    bad_header_cells = [
        # inside the format extension cluster: its MD5 no longer matches
        bad("extension-checksum", "Wrong checksum", (2 * MiB + 100, b"\xff"), sample="parallels-with-bitmap"),
    ]
    # 512-byte clusters: BAT entry 1 means host sector 1, inside the BAT (entries 0..2047 at 64..8256)
    hostile_write_cells = [bad("bat-entry-on-bat", "Preventing invalid write on metadata (overlaps with BAT)",
                               (64, struct.pack("<I", 1)), opts={"cluster_size": "512"}, size=MiB)]
    mutation_cells = split([({}, 1, 9, 16, True), ({}, 2, 18, 7, False)])
    mutation_cases = 25
    mutation_cli_every = 6
    model_cells = [Cell({"cluster_size": "4k"}, 256 * KiB + 512, label="parallels-4k", checkable=True),
                   Cell({"cluster_size": "1000"}, 64 * KiB, label="parallels-1000", checkable=True)]
    INUSE_MAGIC = 0x746F6E59        # "Ynot": not closed cleanly

    @staticmethod
    def bat_offset(index):
        return 64 + 4 * index

    def fill_block(self, opts):
        return {"1000": 1024}.get(opts.get("cluster_size"), size_of(opts.get("cluster_size", "1M")))

    def closed_cleanly(self, path):
        assert le32(path, 44) == 0          # the in-use flag is cleared on close

    def damaged(self, tmp_path, how):
        path = self.create("qemu", tmp_path / "q.prl", MiB, {"cluster_size": "64k"})
        helpers.qemu_io(self.name, path, "write -P 1 0 64k", "write -P 2 128k 4k", "write -P 3 512k 64k")
        if how == "outside":
            u.poke(path, self.bat_offset(2), struct.pack("<I", 64))
        elif how == "leak":
            os.truncate(path, os.path.getsize(path) + 100000)
        elif how == "truncated":
            os.truncate(path, os.path.getsize(path) - 30000)
        elif how == "duplicate":
            u.poke(path, self.bat_offset(8), struct.pack("<I", 1))
        elif how == "outside-and-leak":
            u.poke(path, self.bat_offset(2), struct.pack("<I", 1000))
            os.truncate(path, os.path.getsize(path) + 65536 * 3)
        return path

    def mutation_image(self, tmp_path, cell):
        good = self.create("qemu", tmp_path / "good.prl", 2 * MiB, {"cluster_size": "4k"})
        qemu_io_fill(good, self.name, 2 * MiB, MiB)
        return good, [(0, 64), (64, 4 * 512)]


# -- qcow (version 1) ---------------------------------------------------------------------------------------
class Qcow(Format):
    name = ext = "qcow"
    checkable = False
    help_names = frozenset({"size", "backing_file", "backing_fmt", "encryption", "encrypt.format",
                            "encrypt.key-secret", "preallocation"})
    BACKING = {"backing_file": "base.raw", "backing_fmt": "raw"}
    create_cells = (product(opts=[{}, BACKING], size=(["1000", "5243392", "3G", "2T"], ["1000", "3G"]))
                    + product(preallocation=["falloc", "full"], size=["1M"]))
    refused_cells = [
        refused({}, "0", "Image size is too small, cannot be zero length"),
        refused({"encryption": "on"}, "1M", "encryption is not supported", qemu="refuses"),
        refused({"encrypt.format": "aes"}, "1M", "encryption is not supported", qemu="refuses"),
        refused({}, "100P", "Image too large", qemu=None),      # qemu-img writes a 13 GB L1 table
    ]
    convert_cells = [Cell({}, 1000), Cell({}, 5 * MiB + 512)]
    unsupported_check_cells = [Cell(label="check", args=())]
    bad_header_cells = [
        bad("magic", "Image not in qcow format", (0, b"QFI\xfa")),
        bad("version", "does not support qcow version 2", (4, struct.pack(">I", 2))),
        bad("size-1", "Image size is too small (must be at least 2 bytes)", (24, struct.pack(">Q", 1))),
        bad("cluster-bits-8", "Cluster size must be between 512 and 64k", (32, b"\x08")),
        bad("cluster-bits-17", "Cluster size must be between 512 and 64k", (32, b"\x11")),
        bad("l2-bits-5", "L2 table size must be between 512 and 64k", (33, b"\x05")),
        bad("l2-bits-14", "L2 table size must be between 512 and 64k", (33, b"\x0e")),
        bad("crypt-method", "invalid encryption method in qcow header", (36, struct.pack(">I", 2))),
        bad("size-max", "Image too large", (24, struct.pack(">Q", (1 << 64) - 1))),
        bad("backing-name-long", "Backing file name too long", (8, struct.pack(">QI", 48, 2000))),
        bad("l1-offset", "L1 table offset 0x7ffffffffffffffc is invalid", (40, struct.pack(">Q", (1 << 63) - 4)),
            qemu=None),
        bad("backing-offset", "Invalid backing file offset", (8, struct.pack(">QI", (1 << 63) - 4, 8)), qemu=None),
    ]
    mutation_cells = split([
        ({}, 1, 14, 16, True), ({}, 2, 14, 16, False), ({}, 3, 17, 13, False),
        ({"compressed": "on"}, 1, 16, 14, True), ({"compressed": "on"}, 2, 15, 15, False),
        ({"compressed": "on"}, 3, 15, 15, False),
    ])
    model_cells = [Cell({}, 2 * MiB + 3 * 512, label="qcow", checkable=False)]   # past one L2 table; a short cluster

    @staticmethod
    def convert_c(src, dst):
        """``qemu-img convert -c -O qcow``: qemu-img 7.2 writes the whole image but exits 1 without a
        message (its final zero-length compressed write, which flushes qcow2's, is refused by qcow)."""
        helpers.run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow", src, dst, check=False)
        assert helpers.qemu_img("info", "-f", "qcow", dst).returncode == 0

    def mutation_image(self, tmp_path, cell):
        size = 3 * MiB
        raw = helpers.make_raw(tmp_path / "src.raw", size, [(0, 12 * KiB), (2 * MiB, 8 * KiB), (size - 4096, 4096)])
        good = str(tmp_path / "good.qcow")
        if cell.opts.get("compressed") == "on":
            self.convert_c(raw, good)
        else:
            helpers.run("qemu-img", "convert", "-f", "raw", "-O", self.name, raw, good)
        l2 = struct.unpack(">Q", read_at(good, 48, 8))[0]
        return good, [(0, 48), (8, 28), (48, 8), (l2, 4096), (l2, 64)]


# -- vpc (VHD) -----------------------------------------------------------------------------------------------
class Vpc(Format):
    name = "vpc"
    ext = "vhd"
    checkable = False
    help_names = frozenset({"size", "subformat", "force_size", "preallocation"})
    SUBFORMATS = ["dynamic", "fixed"]
    FORCE = ["off", "on"]
    # 1: the smallest geometry; 5222400: exactly 150x4x17; 10M: rounded up by CHS; 127G: the CHS table's
    # top; 130000M: past what CHS describes (the maximum geometry, the exact size)
    SIZES = [0, 1, 5222400, 10 * MiB, 3000000000, 127 * 1024 * MiB, 130000 * MiB]
    create_cells = (product(subformat=SUBFORMATS, force_size=FORCE, size=(SIZES, [10 * MiB]))
                    + product(preallocation=(["falloc", "full"], ["full"]), subformat=SUBFORMATS, size=[3 * MiB]))
    refused_cells = [
        refused({}, "2041G", "The image size is too large for file format 'vpc'"),
        refused({"force_size": "on"}, "3T", "The image size is too large for file format 'vpc'", fast=False),
        refused({"subformat": "foo"}, "1M", "subformat"),
        refused({"force_size": "maybe"}, "1M", "force_size", fast=False),
    ]
    written_cells = product(subformat=SUBFORMATS, force_size=FORCE,
                            size=([12345, 5222400, 10 * MiB + 512], [10 * MiB + 512]))
    over_2g_cells = product(subformat=(SUBFORMATS, ["dynamic"]))
    samples = ["d2v-zerofilled.vhd", "hyperv2012r2-dynamic.vhd", "virtualpc-dynamic.vhd"]
    convert_cells = product(subformat=SUBFORMATS, force_size=FORCE, size=[5 * MiB + 512])
    writes_into_cells = product(subformat=SUBFORMATS, size=[5222400])
    unsupported_check_cells = product(subformat=SUBFORMATS, args=[()])
    bad_header_size = 5222400
    bad_header_cells = [
        bad("footer-checksum", "Incorrect header checksum", (100, b"\x01"), fix=False),
        bad("block-size", "Invalid block size 1000", (512 + 32, struct.pack(">I", 1000))),
        bad("table-too-small", "Page table too small", (512 + 28, struct.pack(">I", 1)), fast=False),
        bad("table-too-large", "Max Table Entries too large (2147483647)", (512 + 28, struct.pack(">I", 0x7FFFFFFF))),
        bad("free-block-past-eof", "free_data_block_offset points after the end of file",
            (1536, struct.pack(">I", 0x100000))),
        bad("data-offset-far", "Invalid header magic", (16, struct.pack(">Q", 1 << 40)), fast=False),
        bad("data-offset-max", "Error reading dynamic VHD header", (16, struct.pack(">Q", (1 << 64) - 1))),
        bad("dyn-cookie", "Invalid header magic", (512, b"cxsparsf")),
        bad("file-too-large", "File too large", (28, b"win "), (48, struct.pack(">Q", 1 << 45))),
    ]
    # block 0 "lives" on the dynamic header (the file made long enough for the block)
    hostile_write_cells = [bad("bat-entry-on-header", "", (1536, struct.pack(">I", 1)), size=5222400, grow=3 * MiB)]
    mutation_cells = split([      # the fixed footer's checksum catches every flip
        ({"subformat": "dynamic"}, 1, 25, 5, True), ({"subformat": "dynamic"}, 2, 24, 6, False),
        ({"subformat": "dynamic"}, 3, 23, 7, False), ({"subformat": "fixed"}, 1, 30, 0, True),
        ({"subformat": "fixed"}, 2, 30, 0, False), ({"subformat": "fixed"}, 3, 30, 0, False),
    ])
    model_cells = [
        Cell({}, 5222400, label="vpc-dynamic", checkable=False),          # 150 x 4 x 17 sectors: no CHS rounding
        Cell({"subformat": "fixed"}, 5222400, label="vpc-fixed", checkable=False),
        Cell({"force_size": "on"}, 3 * MiB + 512, label="vpc-force-size", checkable=False),
    ]
    COOKIE = b"conectix"
    MASK = ((24, 28), (64, 68), (68, 84))      # timestamp, checksum, UUID: differ in every image
    FIXED, DYNAMIC = 2, 3

    def footers(self, path):
        """The footer copy at 0 (dynamic) and the footer at the end, random fields masked; the metadata
        between them (dynamic header, BAT) as is. Reads only the ends of a sparse file."""
        size = os.path.getsize(path)
        head = bytearray(read_at(path, 0, min(size, 1536 + 64 * KiB)))
        tail = bytearray(read_at(path, size - 512, 512))
        for buf in (head, tail):
            for at in range(0, len(buf), 512):
                if buf[at:at + 8] == self.COOKIE:
                    for a, b in self.MASK:
                        buf[at + a:at + b] = bytes(b - a)
        return bytes(head if head[:8] == self.COOKIE else b""), bytes(tail), size

    layout = footers

    def unopenable(self, cell):
        if cell.opts.get("subformat") == "fixed" and cell.size == 0:
            # only a footer, at offset 0: QEMU takes it for a dynamic disk's copy and cannot open it
            return "Error reading dynamic VHD header"
        return None

    def probed_as(self, cell):
        # QEMU looks only at offset 0: a fixed image probes as raw, unless it is all footer (size 0)
        return "raw" if cell.opts.get("subformat") == "fixed" and cell.size else self.name

    def check_created(self, path, cell):
        foot = read_at(path, os.path.getsize(path) - 512, 512)
        assert foot[28:32] == (b"qem2" if cell.opts.get("force_size") == "on" else b"qemu")
        assert struct.unpack_from(">I", foot, 60)[0] == (self.FIXED if cell.opts.get("subformat") == "fixed"
                                                          else self.DYNAMIC)

    def virtual_size(self, tmp_path, size, opts):
        """What qemu-img create gives for *size* (CHS rounding unless force_size)."""
        path = self.create("qemu", tmp_path / "size-of.vhd", size, opts)
        try:
            return helpers.qemu_info(path, self.name)["virtual-size"]
        finally:
            os.unlink(path)

    def closed_cleanly(self, path):
        head, tail, dummy = self.footers(path)
        if head:
            assert head[:512] == tail       # the footer copy at 0 and the one at the end agree (dynamic)

    def fill_block(self, opts):
        return 2 * MiB

    convert_block = fill_block

    @staticmethod
    def poke_footer(path, offset, value, at_end=False):
        """Change footer bytes and fix its checksum (so only the change itself is tested)."""
        where = os.path.getsize(path) - 512 if at_end else 0
        buf = bytearray(read_at(path, where, 512))
        buf[offset:offset + len(value)] = value
        buf[64:68] = bytes(4)
        buf[64:68] = struct.pack(">I", ~sum(buf) & 0xFFFFFFFF)
        u.poke(path, where, bytes(buf))

    def apply_edits(self, path, cell):
        for offset, value in cell.edits:
            if cell.fix and offset < 512:
                self.poke_footer(path, offset, value)
            else:
                u.poke(path, offset, value)

    def mutation_image(self, tmp_path, cell):
        good = self.create("qemu", tmp_path / "good.vhd", 5222400, cell.opts)
        qemu_io_fill(good, self.name, 5222400, 3 * MiB)
        # the same bytes in every run, so the same split: a fixed timestamp and UUID in both footers
        for at_end in (True, False) if cell.opts["subformat"] == "dynamic" else (True,):
            self.poke_footer(good, 24, struct.pack(">I", 0x2a2a2a2a), at_end)
            self.poke_footer(good, 68, FIXED_UUIDS[:16], at_end)
        size = os.path.getsize(good)
        if cell.opts["subformat"] == "dynamic":
            return good, [(0, 512), (16, 8), (40, 48), (512, 1024), (512, 48), (1536, 512)]
        return good, [(size - 512, 512), (size - 472, 48)]


# -- vhdx ----------------------------------------------------------------------------------------------------
class Vhdx(Format):
    name = ext = "vhdx"
    help_names = frozenset({"block_size", "block_state_zero", "log_size", "size", "subformat"})
    SUBFORMATS = ["dynamic", "fixed"]
    ZERO = ["on", "off"]
    create_cells = (product(subformat=SUBFORMATS, block_state_zero=ZERO,
                            size=([0, 1, 20 * MiB + 1, 3 * GiB], [20 * MiB + 1]))
                    + product(opts=([{"block_size": "1M"}, {"block_size": "32M"}, {"block_size": "256M"},
                                     {"block_size": "300M"}, {"block_size": "1"}, {"log_size": "4M"},
                                     {"log_size": "1500k"}], [{"block_size": "300M"}, {"log_size": "1500k"}]),
                              size=[40 * MiB]))
    refused_cells = [
        refused({"block_size": "3M"}, "10M", "Block size must be a power of two"),
        refused({"log_size": "0"}, "10M", "Log size must be a multiple of 1 MB"),
        refused({"log_size": "5G"}, "10M", "Log size must be smaller than 4 GB"),
        refused({}, "65T", "Image size too large; max of 64TB"),
    ]
    probe_cells = [("signature", lambda head: b"vhdxfile", 100), ("bad-signature", lambda head: b"vhdxfilf", 0)]
    written_cells = (product(subformat=SUBFORMATS, block_state_zero=ZERO,
                             size=([12345, 20 * MiB + 512, 9 * MiB], [12345, 20 * MiB + 512]))
                     + product(opts=([{"block_size": "1M"}, {"block_size": "256M"}, {"log_size": "2M"}],
                                     [{"block_size": "1M"}]), size=[11 * MiB + 512]))
    map_like_qemu = False       # qemu-img 7.2 maps all of a vhdx as data without host offsets; vdisk adds them
    samples = ["iotest-dynamic-1G.vhdx", "test-disk2vhd.vhdx"]
    convert_cells = product(subformat=SUBFORMATS, block_state_zero=ZERO,
                            opts=([{}, {"block_size": "1M"}, {"block_size": "32M", "log_size": "2M"}], [{}]),
                            size=[21 * MiB + 512])
    writes_into_cells = product(subformat=SUBFORMATS, block_size=["1M"], size=[20 * MiB + 512],
                                more_writes=[[(7 * MiB, 3 * MiB)]])
    mutation_cells = split([
        ({"subformat": "dynamic"}, 1, 11, 5, True), ({"subformat": "dynamic"}, 2, 14, 2, False),
        ({"subformat": "dynamic"}, 3, 11, 5, False), ({"subformat": "fixed"}, 1, 11, 5, True),
        ({"subformat": "fixed"}, 2, 14, 2, False), ({"subformat": "fixed"}, 3, 11, 5, False),
    ])
    bad_header_size = 20 * MiB
    bad_header_cells = [
        bad("signature", "no 'vhdxfile' signature", (0, b"vhdxfilf"), qemu="refuses", fix=False),
        bad("both-headers", "No valid VHDX header found", (64 * KiB, b"x"), (128 * KiB, b"x"), qemu="refuses",
            fix=False),
        # header 2 made the current one, so header 1 is no fallback
        bad("log-offset", "log offset", (128 * KiB + 72, struct.pack("<Q", 12345)), qemu="refuses"),
        bad("log-version", "log version", (128 * KiB + 64, struct.pack("<H", 1)), qemu="refuses"),
        bad("region-count", "region table has 5000 entries", (192 * KiB + 8, struct.pack("<I", 5000)),
            qemu="refuses"),
        bad("region-overlap", "overlap", (192 * KiB + 16 + 32 + 16, struct.pack("<Q", 2 * MiB)), qemu="refuses"),
        bad("bat-length", "BAT region", (192 * KiB + 16 + 24, struct.pack("<I", 0)), qemu="refuses"),
        bad("region-unknown-required", "required region of unknown type", (192 * KiB + 16, b"\x01" * 16),
            (192 * KiB + 16 + 28, b"\x01"), qemu="refuses"),
    ]
    mutation_cases = 16
    mutation_cli_every = 16
    model_cells = [Cell({"block_size": "1M"}, 3 * MiB + 512, label="vhdx-dynamic", checkable=True),
                   Cell({"subformat": "fixed", "block_size": "1M", "block_state_zero": "off"}, 2 * MiB,
                        label="vhdx-fixed", checkable=True)]
    # the specification's layout: headers, region tables (64 KiB each) at fixed offsets
    HEADER1, HEADER2, REGION1, REGION2 = 64 * KiB, 128 * KiB, 192 * KiB, 256 * KiB
    HEADER_SIZE = 4 * KiB
    TABLE_SIZE = 64 * KiB               # a region table; also the metadata table
    BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
    METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le

    def info(self, path, tool):
        """``info`` without the disk usage (qemu-img writes a 0-byte image's 64 MiB BAT of zeros)."""
        out = u.info_json(path, self.name, tool)
        out.pop("actual-size", None)
        return out

    def regions(self, path):
        """``{"bat": (offset, length), "metadata": (offset, length)}`` from the first region table."""
        table = read_at(path, self.REGION1, self.TABLE_SIZE)
        found = {}
        for i in range(struct.unpack_from("<I", table, 8)[0]):
            guid, offset, length, dummy = struct.unpack_from("<16sQII", table, 16 + 32 * i)
            name = {self.BAT_GUID: "bat", self.METADATA_GUID: "metadata"}.get(guid)
            if name:
                found[name] = (offset, length)
        return found

    def header_fields(self, path, at):
        """sequence number; log GUID, log version, version, log length, log offset."""
        head = read_at(path, at, 80)
        return struct.unpack_from("<Q", head, 8)[0], struct.unpack_from("<16sHHIQ", head, 48)

    def layout(self, path):
        """File size, both region tables, the header fields that are not random, the metadata table
        and items (page 83 GUID masked), the BAT."""
        regions = self.regions(path)
        (seq1, fields1), (seq2, fields2) = (self.header_fields(path, at) for at in (self.HEADER1, self.HEADER2))
        meta = regions["metadata"][0]
        items = bytearray(read_at(path, meta, self.TABLE_SIZE + 40))
        items[self.TABLE_SIZE + 16:self.TABLE_SIZE + 32] = bytes(16)
        bat, bat_length = regions["bat"]
        return (os.path.getsize(path), read_at(path, self.REGION1, self.TABLE_SIZE),
                read_at(path, self.REGION2, self.TABLE_SIZE), [fields1, fields2], seq2 - seq1, bytes(items),
                read_at(path, bat, min(bat_length, 64 * KiB)))

    def fix_checksums(self, path):
        """Recompute both headers' and region tables' CRC-32C after a change (only the change is tested)."""
        for at, size in ((self.HEADER1, self.HEADER_SIZE), (self.HEADER2, self.HEADER_SIZE),
                         (self.REGION1, self.TABLE_SIZE), (self.REGION2, self.TABLE_SIZE)):
            u.poke(path, at + 4, struct.pack("<I", crc32c_checksum(bytearray(read_at(path, at, size)), 4)))

    def apply_edits(self, path, cell):
        for offset, value in cell.edits:
            u.poke(path, offset, value)
        if cell.fix:
            u.poke(path, self.HEADER1, b"x")        # header 2 is the current one; header 1 no fallback
            self.fix_checksums(path)
            u.poke(path, self.HEADER1 + 4, bytes(4))

    def closed_cleanly(self, path):
        for at in (self.HEADER1, self.HEADER2):
            assert self.header_fields(path, at)[1][0] == bytes(16)      # no log to replay

    def fill_block(self, opts):
        return size_of(opts.get("block_size", "8M"))

    def convert_block(self, opts):
        return 8 * MiB

    def mutation_regions(self, path):
        """``(name, offset, length)`` of the parsed structures of a good image."""
        regions = self.regions(path)
        meta = regions["metadata"][0]
        return [("header1", self.HEADER1, 80), ("header2", self.HEADER2, 80), ("region table", self.REGION1, 80),
                ("BAT", regions["bat"][0], 64), ("metadata table", meta, 32 + 5 * 32),
                ("metadata items", meta + 64 * KiB, 40), ("file id", 0, 8)]

    def mutation_image(self, tmp_path, cell):
        good = self.create("qemu", tmp_path / "good.vhdx", 4 * MiB, dict(cell.opts, block_size="1M"))
        qemu_io_fill(good, self.name, 4 * MiB, 3 * MiB)
        return good, [(o, n) for dummy, o, n in self.mutation_regions(good)]


# -- vmdk ----------------------------------------------------------------------------------------------------
class Vmdk(Format):
    name = ext = "vmdk"
    help_names = frozenset({"adapter_type", "backing_file", "backing_fmt", "compat6", "hwversion", "size",
                            "subformat", "toolsversion", "zeroed_grain"})
    refused_cells = [
        refused({"subformat": "bogus"}, "1M", "subformat", qemu="refuses"),
        refused({"adapter_type": "scsi"}, "1M", "adapter type", qemu="refuses"),
        refused({"compat6": "on", "hwversion": "7"}, "1M", "compat6 cannot be enabled with hwversion set"),
        refused({"subformat": "monolithicFlat", "zeroed_grain": "on"}, "1M", "Flat image can't enable zeroed grain"),
        refused({"backing_fmt": "qcow2", "backing_file": "b.qcow2"}, "1M", "Must be vmdk", qemu="refuses"),
        # qemu-img 7.2 writes empty vmdk images it cannot open itself; vdisk refuses to make one
        refused({}, "0", "size 0", qemu=None),
    ]
    probe_cells = [("zeros", lambda head: bytes(len(head)), 0)]
    samples = ["iotest-version3.vmdk", "iotest-version3-2014.vmdk"]
    bad_header_limited = True
    bad_header_cells = [
        bad("version", "Unsupported VMDK version 4", (4, struct.pack("<I", 4)), qemu=None),
        bad("l2-size", "L2 table size too big", (44, struct.pack("<I", 513)), qemu=None),
        bad("granularity-0", "L1 entry size is invalid", (20, struct.pack("<Q", 0)), qemu=None),
        bad("granularity-huge", "Invalid granularity", (20, struct.pack("<Q", 0x400000)), qemu=None),
        bad("capacity", "L1 size too big", (12, struct.pack("<Q", 1 << 62)), qemu=None),
        bad("overhead", "File truncated", (64, struct.pack("<Q", 1 << 30)), qemu=None),
        bad("gd-offset", "grain directory", (56, struct.pack("<Q", 1 << 40)), qemu=None),
    ]
    mutation_cells = split([
        ({"subformat": "monolithicSparse"}, 1, 11, 9, True), ({"subformat": "monolithicSparse"}, 2, 10, 10, False),
        ({"subformat": "monolithicSparse"}, 3, 7, 13, False), ({"subformat": "streamOptimized"}, 1, 15, 5, True),
        ({"subformat": "streamOptimized"}, 2, 11, 9, False), ({"subformat": "streamOptimized"}, 3, 10, 10, False),
        ({"subformat": "twoGbMaxExtentSparse"}, 1, 4, 16, True), ({"subformat": "twoGbMaxExtentSparse"}, 2, 5, 15, False),
        ({"subformat": "twoGbMaxExtentSparse"}, 3, 5, 15, False),
    ])
    mutation_cases = 20
    mutation_cli_every = 10
    model_cells = [Cell({}, 3 * MiB + 512, label="vmdk-sparse", checkable=True),
                   Cell({"zeroed_grain": "on"}, MiB, label="vmdk-zeroed-grain", checkable=True),
                   Cell({"subformat": "monolithicFlat"}, MiB + 512, label="vmdk-flat", checkable=True),
                   Cell({"subformat": "twoGbMaxExtentSparse"}, MiB, label="vmdk-2gb-sparse", checkable=True)]
    GD_AT_END = (1 << 64) - 1

    @staticmethod
    def fix_cid(path, sub):
        """The same CID in every run (qemu-img writes a random one, in as many hex digits as it needs):
        the descriptor's text, and the offsets in it, are then the same, and so is a mutation's split."""
        if sub == "twoGbMaxExtentSparse":
            start, length = 0, os.path.getsize(path)                # a text file
        else:
            start, length = le64(path, 28) * 512, le64(path, 36) * 512     # the embedded descriptor
        text, found = re.subn(rb"\nCID=[0-9a-f]+\n", b"\nCID=0badcafe\n", read_at(path, start, length).rstrip(b"\0"))
        assert found == 1
        u.poke(path, start, text.ljust(length, b"\0"))

    def mutation_image(self, tmp_path, cell):
        sub = cell.opts["subformat"]
        size = 3 * MiB
        src = helpers.make_raw(tmp_path / "src.raw", size, [(0, 200 * KiB), (size - 4096, 4096)])
        good = str(tmp_path / "good.vmdk")
        if sub == "streamOptimized":
            u.vdisk("convert", "-O", self.name, "-o", "subformat=" + sub, src, good, check=True)
        else:
            helpers.run("qemu-img", "convert", "-O", self.name, "-o", "subformat=" + sub, src, good)
        self.fix_cid(good, sub)
        fsize = os.path.getsize(good)
        if sub == "twoGbMaxExtentSparse":
            return good, [(0, fsize)]                               # the text descriptor
        # the sparse header: overhead (sectors) at 64, the redundant and the main directory at 48 and 56
        overhead, rgd, gd = (le64(good, at) for at in (64, 48, 56))
        regions = [(0, 80), (512, 512)]
        if gd == self.GD_AT_END:
            regions += [(fsize - 1536, 1536), (fsize - 4096, 2560), (overhead * 512, 512)]
        else:
            regions += [(gd * 512, 512), (rgd * 512, 512), ((gd + 1) * 512, 2048)]
        return good, regions


# -- formats with no shared cells but -o help -----------------------------------------------------------------
class Qcow2(Format):
    name = ext = "qcow2"
    help_names = frozenset({"backing_file", "backing_fmt", "cluster_size", "compat", "compression_type", "data_file",
                            "data_file_raw", "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.format",
                            "encrypt.hash-alg", "encrypt.iter-time", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
                            "encrypt.key-secret", "encryption", "extended_l2", "lazy_refcounts", "preallocation",
                            "refcount_bits", "size"})


class Raw(Format):
    name = ext = "raw"
    help_names = frozenset({"preallocation", "size"})


FORMATS = [Vdi(), Qed(), Parallels(), Qcow(), Vpc(), Vhdx(), Vmdk(), Qcow2(), Raw()]
BY_NAME = {f.name: f for f in FORMATS}


def check_like_qemu(fmt, path):
    """``vdisk check --output=json`` equals ``qemu-img check``'s, exit status included; qemu-img's result."""
    q = helpers.qemu_check(path, fmt.name)
    v = u.vdisk("check", "--output=json", "-f", fmt.name, path)
    assert v.returncode == q["rc"], (v.stderr, q)
    assert json.loads(v.stdout) == {k: val for k, val in q.items() if k not in ("rc", "stderr")}
    return q


def engine_writes(offsets):
    """``(offset, pattern bytes)`` for ``(offset, length)`` pairs."""
    return [(o, pattern(o, n)) for o, n in offsets]
