"""Hostile images: one regression per vulnerability class of REFERENCE.md "Security" (docs/security.md).

Every case builds its images with qemu-img (or by patching qemu-img's output) in a tree
``tree/`` beside an ``outside/`` directory holding a "secret" the hostile image names. The vdisk
CLI then runs in a child Python process under a 1 GiB address-space limit with an audit hook
(``sys.addaudithook``, event ``open``) that records every file it opens; each case asserts the
one-line error (``vdisk: <command>: ...``, exit 1), that the inputs are unchanged, and that no
file outside the policy was opened (nothing under ``outside/`` unless ``--allow-path`` allowed it,
nothing else but the interpreter's own modules).

More VMDK descriptor cases (sizes, types, a descriptor over 1 MiB) are in test_vmdk.py and
test_vmdk_descriptor_boundaries.py.
"""
import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import uuid
import zlib

import pytest

import helpers
from helpers import MiB

PKG = helpers.CLI_MODULE
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# runs each command of argv[2] (a JSON list of argument lists) through vdisk's main() with an audit hook,
# and writes {"runs": [{"rc", "stdout", "stderr", "opened"}]} to argv[1]
CHILD = r"""
import contextlib, io, json, os, sys
state = {"on": False, "opened": []}
def hook(event, args):
    if state["on"] and event == "open" and args and isinstance(args[0], (str, bytes)):
        state["opened"].append(os.path.realpath(os.fsdecode(args[0])))
sys.addaudithook(hook)
from %s.cli.main import main
runs = []
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    state["opened"] = []
    state["on"] = True
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    state["on"] = False
    runs.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(), "opened": state["opened"]})
with open(sys.argv[1], "w") as f:
    json.dump({"runs": runs}, f)
""" % PKG

# what the interpreter itself may open while vdisk runs (lazily imported driver modules)
_RUNTIME = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, REPO}) + (
    "/usr/lib/", "/usr/local/lib/", "/tmp/vdisk-src-")


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.fixture
def tree(tmp_path):
    """``tree/`` (the images' directory) and ``outside/`` with a secret file of 1 MiB."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "outside").mkdir()
    with open(tmp_path / "outside" / "secret.raw", "wb") as f:
        f.write(b"SECRET" * (MiB // 6) + bytes(MiB % 6))
    return tmp_path


def audited(base, *commands, allowed=()):
    """Run vdisk *commands* in a child process (cwd ``base/tree``); assert it opened nothing outside
    ``tree/``, the *allowed* directories and the interpreter's own files; return the runs."""
    result = base / "audit.json"
    cmds = [[str(a) for a in cmd] for cmd in commands]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(result), json.dumps(cmds)], cwd=str(base / "tree"),
                          capture_output=True, text=True, timeout=120, preexec_fn=_limits, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(result.read_text())["runs"]
    inside = (os.path.realpath(str(base / "tree")),) + tuple(os.path.realpath(str(d)) for d in allowed)
    for cmd, run in zip(cmds, runs):
        assert "Traceback" not in run["stderr"], run["stderr"]
        stray = [p for p in run["opened"] if not p.startswith(_RUNTIME)
                 and not any(p == d or p.startswith(d + os.sep) for d in inside)]
        assert not stray, "vdisk %s opened %s" % (" ".join(cmd), stray)
    return runs


def assert_refused(run, command, *needles):
    """Exit 1 and one stderr line ``vdisk: <command>: ...`` containing every needle."""
    lines = run["stderr"].splitlines()
    assert run["rc"] == 1 and len(lines) == 1, run
    assert lines[0].startswith("vdisk: %s: " % command), lines
    for needle in needles:
        assert needle in lines[0], lines


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def qemu_img(*args):
    helpers.run("qemu-img", *[str(a) for a in args])


def overlay(path, backing, backing_fmt="raw"):
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", backing_fmt, path, "1M")


def poke(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


READERS = (("info",), ("check",), ("map",), ("compare", "-F", "raw", "other.raw"))


# -- A. the image names another file ----------------------------------------------------------
@pytest.mark.parametrize("name", ["abs", "dotdot"])
def test_backing_file_outside_the_tree(tree, name):
    secret = tree / "outside" / "secret.raw"
    img = tree / "tree" / "t.qcow2"
    overlay(img, secret if name == "abs" else "../outside/secret.raw")
    helpers.run("truncate", "-s", "1M", str(tree / "tree" / "other.raw"))
    before = sha(img)
    cmds = [(c[0], *c[1:-1], img, *c[-1:]) if c[0] == "compare" else (c[0], img) for c in READERS]
    cmds += [("convert", "-O", "raw", img, "out.raw"), ("resize", img, "2M"), ("inspect", img)]
    runs = audited(tree, *cmds)
    for cmd, run in zip(cmds, runs):
        if cmd[0] == "inspect":
            assert run["rc"] == 1 and "FAIL references" in run["stdout"], run
        elif cmd[0] == "compare":
            assert run["rc"] == 2 and "outside the allowed directories" in run["stderr"], run
        elif cmd[0] == "check":
            assert run["rc"] == 0, run          # check reads this layer only (as qemu-img check): nothing followed
        else:
            assert_refused(run, cmd[0], "outside the allowed directories", "--allow-path")
    assert sha(img) == before and not (tree / "tree" / "out.raw").exists()
    # widened explicitly: the same image reads through its backing file
    runs = audited(tree, ("convert", "-O", "raw", "--allow-path", tree / "outside", img, "out.raw"),
                   ("inspect", "--allow-path", tree / "outside", img), allowed=[tree / "outside"])
    assert [r["rc"] for r in runs] == [0, 0], runs
    assert open(tree / "tree" / "out.raw", "rb").read() == open(secret, "rb").read()


@pytest.mark.parametrize("backing", ['json:{"file.driver":"file","file.filename":"%s"}', "nbd://127.0.0.1:10809/x",
                                     pytest.param("nbd:unix:/run/x.sock", marks=pytest.mark.slow),
                                     pytest.param("file:%s", marks=pytest.mark.slow),
                                     pytest.param("http://example.com/x.raw", marks=pytest.mark.slow)])
def test_protocol_and_json_backing(tree, backing):
    img = tree / "tree" / "t.qcow2"
    overlay(img, backing.replace("%s", str(tree / "outside" / "secret.raw")))
    runs = audited(tree, ("info", img), ("info", "--allow-path", tree / "outside", img), ("inspect", img))
    for run in runs[:2]:
        assert_refused(run, "info", "protocol prefix or json:")
    assert runs[2]["rc"] == 1 and "FAIL references" in runs[2]["stdout"]


def test_qcow2_external_data_file(tree):
    data = tree / "outside" / "data.raw"
    img = tree / "tree" / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=%s" % data, img, "1M")
    before = sha(img), sha(data)
    runs = audited(tree, ("info", img), ("check", img), ("convert", "-O", "raw", img, "out.raw"),
                   ("inspect", "--output=json", img))
    for cmd, run in zip(("info", "check", "convert"), runs):
        assert_refused(run, cmd, "data file")
    report = json.loads(runs[3]["stdout"])
    assert runs[3]["rc"] == 1 and not report["safe"]
    assert [(r["kind"], r["name"], r["allowed"]) for r in report["references"]] == [("data file", str(data), False)]
    assert (sha(img), sha(data)) == before


def test_backing_chain_loop_and_depth(tree):
    a, b = tree / "tree" / "a.qcow2", tree / "tree" / "b.qcow2"
    overlay(a, "b.qcow2", "qcow2")
    overlay(b, "a.qcow2", "qcow2")
    qemu_img("create", "-q", "-f", "qcow2", tree / "tree" / "l0.qcow2", "1M")
    for i in range(1, 18):
        overlay(tree / "tree" / ("l%d.qcow2" % i), "l%d.qcow2" % (i - 1), "qcow2")
    runs = audited(tree, ("info", a), ("info", tree / "tree" / "l17.qcow2"), ("info", tree / "tree" / "l16.qcow2"))
    assert_refused(runs[0], "info", "backing chain loop")
    assert_refused(runs[1], "info", "longer than 16 images")
    assert runs[2]["rc"] == 0


# -- B. format guessing ---------------------------------------------------------------------
def test_qcow2_header_inside_a_raw_image(tree):
    """A guest wrote a qcow2 header naming a host file into its raw disk."""
    guest = tree / "tree" / "guest.raw"
    overlay(guest, tree / "outside" / "secret.raw")
    helpers.run("truncate", "-s", "4M", str(guest))
    before = sha(guest)
    runs = audited(tree, ("info", guest), ("info", "-f", "raw", guest), ("resize", "-f", "raw", guest, "8M"),
                   ("inspect", "-f", "raw", guest), ("convert", "-O", "raw", guest, "copy.raw"),
                   ("convert", "-f", "raw", "-O", "raw", guest, "copy.raw"))
    assert_refused(runs[0], "info", "outside the allowed directories")        # probed: never follows it
    assert runs[1]["rc"] == 0 and "file format: raw" in runs[1]["stdout"]      # declared raw: read as raw
    assert_refused(runs[2], "resize", "declared format raw", "qcow2")          # a write needs agreement
    assert runs[3]["rc"] == 1 and "FAIL declared-format" in runs[3]["stdout"]
    assert_refused(runs[4], "convert", "outside the allowed directories")
    assert runs[5]["rc"] == 0 and sha(tree / "tree" / "copy.raw") == before   # a read as raw is a plain copy
    assert sha(guest) == before


def test_polyglot_iso_and_qcow2(tree):
    """An ISO 9660 image whose unused system area (the first 32 KiB) carries a qcow2 header."""
    src = tree / "iso-src"
    src.mkdir()
    (src / "readme.txt").write_text("hello\n")
    iso = tree / "tree" / "poly.iso"
    helpers.run("genisoimage", "-quiet", "-o", str(iso), str(src))
    qcow = tree / "q.qcow2"
    overlay(qcow, tree / "outside" / "secret.raw")
    with open(qcow, "rb") as f, open(iso, "r+b") as g:
        g.write(f.read(4096))
    before = sha(iso)
    runs = audited(tree, ("info", iso), ("inspect", "--output=json", iso), ("resize", "-f", "qcow2", iso, "8M"),
                   ("info", "-f", "iso", iso))
    assert_refused(runs[0], "info", "more than one format")
    report = json.loads(runs[1]["stdout"])
    assert runs[1]["rc"] == 1 and report["format-matches"] == ["qcow2", "iso"]
    assert [c["passed"] for c in report["checks"] if c["name"] == "single-format"] == [False]
    assert_refused(runs[2], "resize", "more than one format")
    assert runs[3]["rc"] == 0                                                  # declared: read as what it was named
    assert sha(iso) == before


# -- C. resource exhaustion -------------------------------------------------------------------
@pytest.mark.parametrize("field,offset,value,message", [
    ("l1_size", 36, 0x7fffffff, "L1 table too large"),
    ("refcount_table_clusters", 56, 0xffffffff, "Reference count table too large"),
    ("nb_snapshots", 60, 0xffffffff, "Snapshot table too large"),
])
def test_huge_tables(tree, field, offset, value, message):
    img = tree / "tree" / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    poke(img, offset, ">I", value)
    before = sha(img)
    runs = audited(tree, ("info", img), ("check", img), ("convert", "-O", "raw", img, "out.raw"))
    for cmd, run in zip(("info", "check", "convert"), runs):
        assert_refused(run, cmd, message)
    assert sha(img) == before


def test_qcow2_decompression_bomb(tree):
    """A compressed cluster whose deflate stream inflates to 1 GiB: read as one cluster, like QEMU,
    within the 1 GiB address-space limit of the child."""
    raw = tree / "one.raw"
    with open(raw, "wb") as f:
        f.write(b"\x01" * (2 * MiB))
    img = tree / "tree" / "bomb.qcow2"
    qemu_img("convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=2M", raw, img)
    with open(img, "rb") as f:
        head = f.read(64)
        l1_off = struct.unpack_from(">Q", head, 40)[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 1) & ~0x1ff
        f.seek(l2_off)
        entry = struct.unpack(">Q", f.read(8))[0]
        end = f.seek(0, 2)
    assert entry >> 62 & 1, "qemu-img did not compress the cluster"
    # 8 MiB of zeros deflated and ended by a full flush (no reference back across it), so the
    # segment repeats verbatim: 128 copies and a final empty block inflate to 1 GiB from 1 MB
    comp = zlib.compressobj(9, zlib.DEFLATED, -12)
    segment = comp.compress(bytes(8 * MiB)) + comp.flush(zlib.Z_FULL_FLUSH)
    bomb = segment * 128 + comp.flush()
    host = (end + 511) & ~511
    sectors = (len(bomb) + 511) // 512
    x = 62 - (21 - 8)
    assert sectors <= 1 << (21 - 8)
    with open(img, "r+b") as f:
        f.seek(host)
        f.write(bomb + bytes(sectors * 512 - len(bomb)))
        f.seek(l2_off)
        f.write(struct.pack(">Q", 1 << 62 | (sectors - 1) << x | host))
    runs = audited(tree, ("convert", "-O", "raw", img, "out.raw"))
    assert runs[0]["rc"] == 0, runs
    assert open(tree / "tree" / "out.raw", "rb").read() == bytes(2 * MiB)     # one cluster of the stream
    ref = tree / "qemu.raw"
    qemu_img("convert", "-O", "raw", img, ref)
    assert sha(ref) == sha(tree / "tree" / "out.raw")


# -- G. file system ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["symlink", "dangling", "fifo", pytest.param("directory", marks=pytest.mark.slow)])
def test_outputs_never_follow_symlinks_or_replace_other_types(tree, target):
    victim = tree / "outside" / "secret.raw"
    dest = tree / "tree" / "out.img"
    if target == "symlink":
        os.symlink(str(victim), str(dest))
    elif target == "dangling":
        os.symlink(str(tree / "outside" / "new.raw"), str(dest))
    elif target == "fifo":
        os.mkfifo(str(dest))
    else:
        dest.mkdir()
    src = tree / "tree" / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "1M")
    before = sha(victim)
    runs = audited(tree, ("create", "-f", "qcow2", dest, "1M"), ("create", "-f", "raw", dest, "1M"),
                   ("convert", "-O", "raw", src, dest), ("convert", "-O", "qcow2", src, dest))
    for run in runs:
        assert run["rc"] == 1 and "Traceback" not in run["stderr"], run
        assert len(run["stderr"].splitlines()) == 1
    assert sha(victim) == before and not (tree / "outside" / "new.raw").exists()
    assert os.path.lexists(str(dest)) and (os.path.islink(str(dest)) or target != "symlink")
    leftovers = [n for n in os.listdir(str(tree / "tree")) if n.endswith(".vdisk-tmp")]
    assert not leftovers


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_device_and_fifo_inputs(tree, kind):
    if kind == "device":
        path = "/dev/zero"
    else:
        path = str(tree / "tree" / "in.fifo")
        os.mkfifo(path)
    cmds = [("info", path), ("info", "-f", "raw", path), ("check", path), ("map", path),
            ("convert", "-O", "raw", path, "out.raw"), ("compare", path, path)]
    runs = audited(tree, *cmds, ("inspect", path), allowed=["/dev/zero"])     # (named by the user)
    for cmd, run in zip(cmds, runs):
        if cmd[0] == "compare":
            assert run["rc"] == 2 and "not a regular file" in run["stderr"], run
        else:
            assert_refused(run, cmd[0], "not a regular file")
    assert runs[-1]["rc"] == 1 and "FAIL regular-file" in runs[-1]["stdout"]


def test_inspect_a_clean_chain(tree):
    base = tree / "tree" / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    top = tree / "tree" / "top.qcow2"
    overlay(top, "base.qcow2", "qcow2")
    runs = audited(tree, ("inspect", "--output=json", top), ("inspect", top))
    report = json.loads(runs[0]["stdout"])
    assert runs[0]["rc"] == 0
    assert report["safe"]
    assert report["format"] == "qcow2"
    assert [(r["kind"], r["name"], r["allowed"], r["followed"]) for r in report["references"]] == [
        ("backing file", "base.qcow2", True, True)]
    assert [c["name"] for c in report["checks"]] == ["regular-file", "single-format", "declared-format", "header",
                                                    "references", "backing-chain"]
    assert runs[1]["rc"] == 0 and runs[1]["stdout"].rstrip().endswith("result: safe")


# -- A. VMDK extents (against formats/vmdk) ----------------------------------------------------
VMDK_DESCRIPTOR = """# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 2048 FLAT "%s" 0

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "2"
ddb.geometry.heads = "16"
ddb.geometry.sectors = "63"
ddb.adapterType = "ide"
"""


@pytest.mark.parametrize("extent,message", [
    ("/etc/passwd", "absolute path"),                        # a flat extent naming a host file
    ("%(outside)s/secret.raw", "absolute path"),
    ("../outside/secret.raw", "leaves the descriptor's directory"),
    ("link.raw", "leaves the descriptor's directory"),       # a symlink inside the tree leading out
])
def test_vmdk_extent_outside_the_tree(tree, extent, message):
    """Refused by default, with the reason and the way out; ``--allow-path DIR`` lets an extent in
    DIR be read (the secret is then the disk's content), never one elsewhere."""
    os.symlink("../outside/secret.raw", str(tree / "tree" / "link.raw"))
    desc = tree / "tree" / "d.vmdk"
    desc.write_text(VMDK_DESCRIPTOR % (extent % {"outside": tree / "outside"}))
    before = sha(desc)
    runs = audited(tree, ("info", desc), ("convert", "-O", "raw", desc, "out.raw"), ("check", desc),
                   ("inspect", desc))
    for cmd, run in zip(("info", "convert", "check"), runs):
        assert_refused(run, cmd, message, "--allow-path")
    assert runs[3]["rc"] == 1
    assert "FAIL header" in runs[3]["stdout"]
    assert "FAIL references" in runs[3]["stdout"]
    assert sha(desc) == before and not (tree / "tree" / "out.raw").exists()
    allowed = audited(tree, ("convert", "-O", "raw", "--allow-path", tree / "outside", desc, "out.raw"),
                      ("inspect", "--allow-path", tree / "outside", desc), allowed=[tree / "outside"])
    if extent == "/etc/passwd":
        assert_refused(allowed[0], "convert", message)
        assert allowed[1]["rc"] == 1
    else:
        assert allowed[0]["rc"] == 0, allowed
        assert sha(tree / "tree" / "out.raw") == sha(tree / "outside" / "secret.raw")
        assert allowed[1]["rc"] == 0 and allowed[1]["stdout"].rstrip().endswith("result: safe"), allowed[1]


def test_vmdk_decompression_bomb(tree):
    """A compressed grain whose zlib stream inflates to 128 MiB: refused as qemu-img refuses it
    (QEMU inflates into one grain's buffer), after inflating one grain and one byte."""
    raw = tree / "two.raw"
    raw.write_bytes(os.urandom(128 * 1024))
    img = tree / "tree" / "bomb.vmdk"
    qemu_img("convert", "-q", "-O", "vmdk", raw, img)        # monolithicSparse, 64 KiB grains 0 and 1
    with open(img, "r+b") as f:
        head = f.read(512)
        rgd, gd = struct.unpack_from("<QQ", head, 48)
        tables = []
        for directory in (gd, rgd):
            f.seek(directory * 512)
            tables.append(struct.unpack("<I", f.read(4))[0])
        f.seek(tables[0] * 512)
        grain0 = struct.unpack("<I", f.read(4))[0]
        comp = zlib.compressobj(9)
        segment = comp.compress(bytes(8 * MiB)) + comp.flush(zlib.Z_FULL_FLUSH)
        bomb = segment * 16 + comp.flush()
        assert len(bomb) < 128 * 1024                        # fits in the two grains' room
        f.seek(grain0 * 512)
        f.write(bomb)
        for table in tables:                                 # grain 1 unallocated in both directories
            f.seek(table * 512 + 4)
            f.write(bytes(4))
        f.seek(77)
        f.write(struct.pack("<H", 1))                        # compressAlgorithm: deflate
    proc = subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(tree / "qemu.raw")],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    before = sha(img)
    runs = audited(tree, ("convert", "-O", "raw", img, "out.raw"), ("compare", img, raw), allowed=[raw])
    assert_refused(runs[0], "convert", "inflates past the grain size")
    assert runs[1]["rc"] == 2 and "inflates past the grain size" in runs[1]["stderr"], runs[1]
    assert sha(img) == before and not (tree / "tree" / "out.raw").exists()


# -- A. parent locators (VHD, VHDX) ------------------------------------------------------------
def _vpc_checksum(buf, at):
    return ~(sum(buf) - sum(buf[at:at + 4])) & 0xFFFFFFFF


def differencing_vhd(path, locators):
    """A qemu-img dynamic VHD turned into a differencing one whose parent locators (code, path) are
    stored after the BAT, the footer moved behind them."""
    qemu_img("create", "-q", "-f", "vpc", path, "8M")
    with open(path, "r+b") as f:
        footer, dyn = bytearray(f.read(512)), bytearray(f.read(1024))
        end = f.seek(0, 2) - 512
        blobs = b""
        for i, (code, text) in enumerate(locators):
            data = text.encode("utf-16-le" if code in (b"W2ru", b"W2ku") else "utf-8")
            room = (len(data) + 511) // 512
            struct.pack_into(">4sIIIQ", dyn, 576 + 24 * i, code, room, len(data), 0, end + len(blobs))
            blobs += data.ljust(room * 512, b"\0")
        struct.pack_into(">I", dyn, 36, _vpc_checksum(dyn, 36))
        struct.pack_into(">I", footer, 60, 4)                # disk type: differencing
        struct.pack_into(">I", footer, 64, _vpc_checksum(footer, 64))
        f.seek(0)
        f.write(footer + dyn)
        f.seek(end)
        f.write(blobs + footer)


def _guid(text):
    return uuid.UUID(text).bytes_le


def differencing_vhdx(path, pairs):
    """A qemu-img VHDX given a parent locator metadata item of (key, value) pairs and HasParent set."""
    qemu_img("create", "-q", "-f", "vhdx", path, "8M")
    with open(path, "r+b") as f:
        f.seek(192 * 1024)
        regions = f.read(64 * 1024)
        for i in range(struct.unpack_from("<I", regions, 8)[0]):
            guid, offset = struct.unpack_from("<16sQ", regions, 16 + 32 * i)
            if guid == _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E"):
                meta = offset
        f.seek(meta)
        table = bytearray(f.read(64 * 1024))
        count = struct.unpack_from("<H", table, 10)[0]
        top = 64 * 1024
        for i in range(count):
            guid, offset, length = struct.unpack_from("<16sII", table, 32 + 32 * i)
            top = max(top, offset + length)
            if guid == _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B"):
                params = offset
        body, entries, first = b"", b"", 20 + 12 * len(pairs)
        for key, value in pairs:
            k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
            entries += struct.pack("<IIHH", first + len(body), first + len(body) + len(k), len(k), len(v))
            body += k + v
        item = struct.pack("<16sHH", _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913"), 0, len(pairs)) + entries + body
        at = (top + 4095) // 4096 * 4096
        struct.pack_into("<16sIIII", table, 32 + 32 * count, _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"), at,
                         len(item), 4, 0)
        struct.pack_into("<H", table, 10, count + 1)
        f.seek(meta)
        f.write(table)
        f.seek(meta + at)
        f.write(item)
        f.seek(meta + params + 4)
        bits = struct.unpack("<I", f.read(4))[0]
        f.seek(meta + params + 4)
        f.write(struct.pack("<I", bits | 2))                 # HasParent


LOCATED = ("../outside/secret.raw", "..\\outside\\secret.raw", "C:\\outside\\secret.raw")


def test_vhd_parent_locators_never_followed(tree):
    """A differencing VHD is read as qemu-img reads it, without its parent: the parent locators
    (relative, absolute, a file: URL) are listed by inspect as refused, and never opened."""
    img = tree / "tree" / "d.vhd"
    differencing_vhd(img, [(b"W2ru", LOCATED[1]), (b"W2ku", LOCATED[2]), (b"MacX", "file:///etc/passwd"),
                           (b"Wi2r", LOCATED[0])])
    before = sha(img)
    qemu_img("convert", "-O", "raw", img, tree / "qemu.raw")
    runs = audited(tree, ("info", img), ("map", img), ("convert", "-O", "raw", img, "out.raw"),
                   ("compare", img, tree / "qemu.raw"), ("inspect", "--output=json", img), allowed=[tree / "qemu.raw"])
    assert [r["rc"] for r in runs[:4]] == [0, 0, 0, 0], runs
    assert sha(tree / "tree" / "out.raw") == sha(tree / "qemu.raw")
    report = json.loads(runs[4]["stdout"])
    assert runs[4]["rc"] == 1 and not report["safe"]
    refs = [(r["kind"], r["name"], r["allowed"], r["followed"]) for r in report["references"]]
    assert refs == [("parent locator", LOCATED[1], False, False), ("parent locator", LOCATED[2], False, False),
                    ("parent locator", "file:///etc/passwd", False, False),
                    ("parent locator", LOCATED[0], False, False)]
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["references"]
    assert sha(img) == before


def test_vhdx_parent_locator_refused(tree):
    """A differencing VHDX is refused as qemu-img refuses it; inspect lists its locator's paths."""
    img = tree / "tree" / "d.vhdx"
    differencing_vhdx(img, [("parent_linkage", "{83ea2ff0-4a37-4d4f-9a55-0c2b5b8b1d2a}"),
                            ("relative_path", LOCATED[1]), ("absolute_win32_path", LOCATED[2])])
    proc = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True)
    assert proc.returncode == 1 and "not supported" in proc.stderr, proc.stderr
    before = sha(img)
    runs = audited(tree, ("info", img), ("convert", "-O", "raw", img, "out.raw"), ("check", img),
                   ("inspect", "--output=json", img))
    for cmd, run in zip(("info", "convert", "check"), runs):
        assert_refused(run, cmd, "differencing VHDX")
    report = json.loads(runs[3]["stdout"])
    assert [(r["name"], r["allowed"]) for r in report["references"]] == [(LOCATED[1], False), (LOCATED[2], False)]
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["header", "references"]
    assert sha(img) == before and not (tree / "tree" / "out.raw").exists()
