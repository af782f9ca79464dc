"""qcow2 images created and written by vdisk, judged by qemu-img.

For each create-option value class (compat, cluster_size, preallocation, backing file,
lazy_refcounts, refcount_bits, extended_l2, compression_type) an image is created with
the vdisk driver and written through vdisk at unaligned offsets and partial clusters
(overlapping writes, writes crossing cluster and L2-table boundaries, zero writes with and
without unmap, discards).  The same operations are applied to a plain raw file.  Then:
``qemu-img check`` finds no errors, leaks or corruptions, ``qemu-img compare`` finds the
image equal to the raw file, and ``qemu-img info`` shows the options asked for.
"""
import json
import os

import pytest

import qcow2_util as u
from qcow2_util import KiB, MiB, errors

pytestmark = pytest.mark.skipif(not (u.QEMU_IMG and u.QEMU_IO), reason="needs qemu-img and qemu-io")


def script(cs, size, l2span):
    """The operations: (op, offset, length[, unmap]); unaligned, overlapping, crossing boundaries."""
    half = size // 2
    ops = [
        ("write", 1000, 2 * cs + 777),                 # unaligned start and end, crosses 2 cluster boundaries
        ("write", cs // 2 + 3, cs),                    # overlaps the first write
        ("write", size - cs - 5, cs + 5),              # up to the last byte of the disk
        ("write", half + 123, 5 * cs + 17),
        ("zero", half + 200, 2 * cs, False),           # partial + whole clusters inside data, keep allocation
        ("zero", half + 3 * cs, cs, True),             # a whole cluster, unmapped
        ("zero", 3 * cs + 100, cs, True),              # partial clusters of untouched space
        ("write", 7 * cs + 511, 1),                    # one byte
        ("discard", 500, 2 * cs + 100),                # whole cluster 1 goes, partial head/tail stay
        ("write", 1500, 300),
        ("discard", half, 3 * cs),
        ("zero", size // 4 + 17, 3 * cs + 1, False),   # over backing-file data where there is one
        ("write", size // 4 + cs, 10),
        ("zero", size // 4 + 8 * cs, 2 * cs, True),
        ("discard", size // 4 + 12 * cs, 2 * cs),      # where the backing file has data
    ]
    if l2span < size:
        # writes crossing the end of one L2 table's coverage, and more tables further on
        ops += [
            ("write", l2span - 700, 1400),
            ("zero", l2span - cs // 2, cs, True),
        ]
        if 2 * l2span + cs + 3 < size:
            ops.append(("write", 2 * l2span - cs - 3, 2 * cs + 6))
        if 3 * l2span + 22 < size:
            ops.append(("write", 3 * l2span + 5, 17))
    ops.append(("write", 1000 + cs, 64))              # rewrite inside the first (possibly discarded) range
    return ops


def apply_ops(img, model, ops, cs, size, v3, has_backing):
    for i, op in enumerate(ops):
        kind, off, n = op[0], op[1], op[2]
        if kind == "write":
            data = u.pattern(i + 1, n)
            img.write(off, data)
            model[off:off + n] = data
        elif kind == "zero":
            img.write_zeroes(off, n, unmap=op[3])
            model[off:off + n] = bytes(n)
        elif kind == "discard":
            img.discard(off, n)
            u.discard_like_qemu(model, off, n, cs, size, v3, has_backing)
        else:
            raise AssertionError(kind)


def make_base(tmp_path, size, fmt="qcow2"):
    """A backing file made by qemu-img with data, half the overlay's size (reads past its end are zeros)."""
    base = tmp_path / ("base." + fmt)
    u.qemu_create(base, size // 2, fmt=fmt)
    u.qemu_io(base, "write -P 0x5a 0 %d" % (size // 2 - 2 * MiB if size >= 8 * MiB else size // 4),
              "write -P 0x33 4096 12288", "write -z %d 64k" % (size // 4 + 128 * KiB), fmt=fmt)
    return base


# id, virtual size, create options, backing format (None: no backing file)
CONFIGS = [
    ("compat-0.10", 16 * MiB, {"compat": "0.10"}, None),
    ("compat-v2", 16 * MiB, {"compat": "v2", "cluster_size": "4k"}, None),
    ("compat-1.1", 16 * MiB, {"compat": "1.1"}, None),
    ("compat-v3", 16 * MiB, {"compat": "v3", "cluster_size": "4k"}, None),
    ("cluster-512", 4 * MiB, {"cluster_size": "512"}, None),
    ("cluster-4k", 16 * MiB, {"cluster_size": "4k"}, None),
    ("cluster-64k", 16 * MiB, {"cluster_size": "64k"}, None),
    ("cluster-2M", 64 * MiB, {"cluster_size": "2M"}, None),
    ("prealloc-off", 16 * MiB, {"preallocation": "off"}, None),
    ("prealloc-metadata", 16 * MiB, {"preallocation": "metadata"}, None),
    ("prealloc-metadata-4k", 8 * MiB, {"preallocation": "metadata", "cluster_size": "4k"}, None),
    ("prealloc-falloc", 16 * MiB, {"preallocation": "falloc"}, None),
    ("prealloc-full", 16 * MiB, {"preallocation": "full"}, None),
    ("prealloc-metadata-v2", 8 * MiB, {"preallocation": "metadata", "compat": "0.10"}, None),
    ("backing-qcow2", 16 * MiB, {}, "qcow2"),
    ("backing-qcow2-4k", 16 * MiB, {"cluster_size": "4k"}, "qcow2"),
    ("backing-qcow2-512", 4 * MiB, {"cluster_size": "512"}, "qcow2"),
    ("backing-raw", 16 * MiB, {}, "raw"),
    ("backing-v2", 16 * MiB, {"compat": "0.10", "cluster_size": "4k"}, "qcow2"),
    ("lazy-refcounts", 16 * MiB, {"lazy_refcounts": "on"}, None),
    ("lazy-refcounts-backing", 16 * MiB, {"lazy_refcounts": "on", "cluster_size": "4k"}, "qcow2"),
    ("refcount-1", 8 * MiB, {"refcount_bits": "1", "cluster_size": "4k"}, None),
    ("refcount-2", 8 * MiB, {"refcount_bits": "2", "cluster_size": "4k"}, None),
    ("refcount-8", 8 * MiB, {"refcount_bits": "8", "cluster_size": "4k"}, None),
    ("refcount-16", 8 * MiB, {"refcount_bits": "16", "cluster_size": "4k"}, None),
    ("refcount-64", 8 * MiB, {"refcount_bits": "64", "cluster_size": "4k"}, None),
    ("refcount-1-512", 4 * MiB, {"refcount_bits": "1", "cluster_size": "512"}, None),
    ("refcount-64-512", 4 * MiB, {"refcount_bits": "64", "cluster_size": "512"}, None),
    ("extended-l2-16k", 32 * MiB, {"extended_l2": "on", "cluster_size": "16k"}, None),
    ("extended-l2-64k", 16 * MiB, {"extended_l2": "on", "cluster_size": "64k"}, None),
    ("extended-l2-16k-backing", 32 * MiB, {"extended_l2": "on", "cluster_size": "16k"}, "qcow2"),
    ("extended-l2-64k-backing", 16 * MiB, {"extended_l2": "on"}, "qcow2"),
    ("extended-l2-prealloc-backing", 16 * MiB,
     {"extended_l2": "on", "cluster_size": "16k", "preallocation": "metadata"}, "qcow2"),
    ("extended-l2-prealloc-full", 16 * MiB, {"extended_l2": "on", "preallocation": "full"}, None),
    ("compression-zlib", 16 * MiB, {"compression_type": "zlib"}, None),
    ("extended-l2-2M", 64 * MiB, {"extended_l2": "on", "cluster_size": "2M"}, None),
    ("size-unaligned-4k", 16 * MiB + 1536, {"cluster_size": "4k"}, None),
    ("size-unaligned-64k", 5 * MiB + 512, {}, None),
    ("size-unaligned-backing", 8 * MiB + 3584, {"cluster_size": "4k"}, "qcow2"),
    ("size-unaligned-extl2", 8 * MiB + 2048, {"extended_l2": "on", "cluster_size": "32k"}, "qcow2"),
    # the whole disk written first: many L2 tables, more refcount blocks, a refcount table that grows
    ("fill-refcount-64-512", 4 * MiB, {"refcount_bits": "64", "cluster_size": "512", "fill": True}, None),
    ("fill-refcount-1-512", 2 * MiB, {"refcount_bits": "1", "cluster_size": "512", "fill": True}, None),
    ("fill-512-backing", 2 * MiB, {"cluster_size": "512", "fill": True}, "qcow2"),
    ("fill-4k-v2", 8 * MiB, {"cluster_size": "4k", "compat": "0.10", "fill": True}, None),
]
if u.HAVE_ZSTD:
    CONFIGS.append(("compression-zstd", 16 * MiB, {"compression_type": "zstd"}, None))


def expected_info(options):
    """The qemu-img info values the options imply: (cluster-size, format-specific data subset)."""
    cs = int(u.get_driver("qcow2").parse_options({"cluster_size": options.get("cluster_size", "64k")})
             ["cluster_size"])
    v3 = options.get("compat", "1.1") in ("1.1", "v3")
    data = {"compat": "1.1" if v3 else "0.10", "refcount-bits": int(options.get("refcount_bits", 16))}
    if v3:
        data["lazy-refcounts"] = options.get("lazy_refcounts") == "on"
        data["extended-l2"] = options.get("extended_l2") == "on"
        data["compression-type"] = options.get("compression_type", "zlib")
    return cs, data


@pytest.mark.parametrize("name,size,options,backing_fmt", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_vdisk_written_image_is_valid_for_qemu(tmp_path, name, size, options, backing_fmt):
    options = dict(options)
    fill = options.pop("fill", False)
    cs, want = expected_info(options)
    v3 = want["compat"] == "1.1"
    opts = dict(options)
    model = bytearray(size)
    if backing_fmt:
        base = make_base(tmp_path, size, backing_fmt)
        content = u.qemu_to_raw(base, backing_fmt)
        model[:len(content)] = content
        opts.update(backing_file=base.name, backing_fmt=backing_fmt)
    path = tmp_path / "img.qcow2"
    u.vdisk_create(path, size, **opts)
    assert_check = u.assert_check_clean(path)
    info = json.loads(u.qemu_img("info", "--output=json", path).stdout)
    assert info["virtual-size"] == size
    assert info["cluster-size"] == cs
    got = {k: info["format-specific"]["data"].get(k) for k in want}
    assert got == want, "qemu-img info of the new image: %s" % info
    if backing_fmt:
        assert info["backing-filename"] == base.name
        assert info["backing-filename-format"] == backing_fmt
    assert assert_check["rc"] == 0
    # an empty image reads as its backing file (or zeros), for qemu and vdisk
    u.qemu_compare(path, _raw(tmp_path, model, "empty.raw"))

    ext = options.get("extended_l2") == "on"
    l2span = (cs // (16 if ext else 8)) * cs
    ops = script(cs, size, l2span)
    if fill:
        ops.insert(0, ("write", 0, size))
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        assert img.virtual_size == size
        apply_ops(img, model, ops, cs, size, v3, bool(backing_fmt))
        assert u.read_image(img) == bytes(model), "vdisk reads back something else before close: %s" % (
            u.first_diff(u.read_image(img), bytes(model)))
    finally:
        u.close_chain(img)

    raw = _raw(tmp_path, model, "expected.raw")
    check = u.assert_check_clean(path)
    u.qemu_compare(path, raw)
    info = json.loads(u.qemu_img("info", "--output=json", path).stdout)
    assert not info.get("dirty-flag"), "image left dirty after close: %s" % info
    assert not info["format-specific"]["data"].get("corrupt"), info
    u.assert_info_agrees(path)
    u.assert_map_agrees(path)
    # vdisk again after qemu looked at it
    data = u.vdisk_read_all(path)
    assert data == bytes(model), u.first_diff(data, bytes(model))
    assert check.get("check-errors", 0) == 0


def _raw(tmp_path, model, name):
    p = tmp_path / name
    with open(p, "wb") as f:
        f.write(model)
    return p


def test_reopen_and_write_again(tmp_path):
    """Two vdisk sessions on the same image, then qemu-io writes, then vdisk again: all agree."""
    size, cs = 8 * MiB, 4096
    path = tmp_path / "img.qcow2"
    u.vdisk_create(path, size, cluster_size="4k")
    model = bytearray(size)
    for session in range(2):
        img = u.open_image(str(path), "qcow2", writable=True)
        try:
            for j in range(6):
                off = (session * 977 + j * 1234567) % (size - 3 * cs)
                data = u.pattern(session * 10 + j, 2 * cs + 333)
                img.write(off, data)
                model[off:off + len(data)] = data
        finally:
            u.close_chain(img)
        u.assert_check_clean(path)
    u.qemu_io(path, "write -P 0x77 100k 9k", "write -z 2M 64k")
    model[100 * KiB:109 * KiB] = b"\x77" * 9 * KiB
    model[2 * MiB:2 * MiB + 64 * KiB] = bytes(64 * KiB)
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        img.write(101 * KiB, b"\x01" * 5000)
        model[101 * KiB:101 * KiB + 5000] = b"\x01" * 5000
    finally:
        u.close_chain(img)
    u.assert_check_clean(path)
    u.qemu_compare(path, _raw(tmp_path, model, "expected.raw"))


def _cross_product():
    out = []
    for cs in ("512", "4k", "64k", "2M"):
        for compat in ("0.10", "1.1"):
            for refcount in (("16",) if compat == "0.10" else ("1", "16", "64")):
                for ext in (("off",) if compat == "0.10" or cs in ("512", "4k") else ("off", "on")):
                    for backing in (None, "qcow2"):
                        size = 64 * MiB if cs == "2M" else (4 * MiB if cs == "512" else 16 * MiB)
                        opts = {"cluster_size": cs, "compat": compat, "refcount_bits": refcount, "extended_l2": ext}
                        if compat == "0.10":
                            del opts["extended_l2"]
                        name = "-".join([cs, compat, "rc" + refcount, "extl2" if ext == "on" else "std",
                                         backing or "nobacking"])
                        out.append((name, size, opts, backing))
    return out


CROSS = _cross_product()


@pytest.mark.slow
@pytest.mark.parametrize("name,size,options,backing_fmt", CROSS, ids=[c[0] for c in CROSS])
def test_option_cross_product(tmp_path, name, size, options, backing_fmt):
    """cluster size x compat x refcount width x extended L2 x backing file (make test-slow; -m "not slow"
    leaves it out)."""
    test_vdisk_written_image_is_valid_for_qemu(tmp_path, name, size, options, backing_fmt)


# -- the CLI on the same images: info and map as qemu-img prints them -----------------------
CLI_CONFIGS = [c for c in CONFIGS if c[0] in (
    "compat-0.10", "compat-1.1", "cluster-512", "prealloc-metadata", "prealloc-full", "backing-qcow2",
    "backing-raw", "lazy-refcounts", "refcount-1", "extended-l2-16k-backing", "size-unaligned-backing")]


def vdisk_cli(*args):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", u.PKG] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=120)
    if "No module named" in proc.stderr or "cannot be directly executed" in proc.stderr:
        pytest.fail("the vdisk CLI is not available: %s" % proc.stderr.strip())
    assert proc.returncode == 0, "vdisk %s: rc=%d %s" % (" ".join(map(str, args)), proc.returncode, proc.stderr)
    return proc.stdout


@pytest.mark.parametrize("name,size,options,backing_fmt", CLI_CONFIGS, ids=[c[0] for c in CLI_CONFIGS])
def test_cli_info_and_map_agree_with_qemu_img(tmp_path, name, size, options, backing_fmt):
    test_vdisk_written_image_is_valid_for_qemu(tmp_path, name, size, options, backing_fmt)
    path = tmp_path / "img.qcow2"
    for extra in ([], ["--backing-chain"]):
        theirs = json.loads(u.qemu_img("info", "--output=json", *extra, path).stdout)
        mine = json.loads(vdisk_cli("info", "--output=json", *extra, path))
        diffs = []
        u._compare_common(mine, theirs, "", diffs)
        assert not diffs, "vdisk info %s differs from qemu-img: %s" % (" ".join(extra), "; ".join(diffs))
        if not extra:
            missing = sorted(set(theirs) - set(mine))
            assert not missing, "vdisk info --output=json lacks keys qemu-img prints: %s" % missing
    theirs = json.loads(u.qemu_img("map", "--output=json", path).stdout)
    mine = json.loads(vdisk_cli("map", "--output=json", path))
    assert mine == theirs, "vdisk map --output=json differs from qemu-img map:\n%s" % "\n".join(
        "  vdisk=%s\n  qemu =%s" % (a, b) for a, b in zip(mine, theirs) if a != b)


# -- option combinations qemu-img refuses -----------------------------------------------------
BAD_OPTIONS = [
    ("v2-lazy", {"compat": "0.10", "lazy_refcounts": "on"}),
    ("v2-refcount-8", {"compat": "0.10", "refcount_bits": "8"}),
    ("v2-extl2", {"compat": "0.10", "extended_l2": "on"}),
    ("v2-zstd", {"compat": "0.10", "compression_type": "zstd"}),
    ("extl2-4k", {"extended_l2": "on", "cluster_size": "4k"}),
    ("cluster-3000", {"cluster_size": "3000"}),
    ("cluster-256", {"cluster_size": "256"}),
    ("cluster-4M", {"cluster_size": "4M"}),
    ("refcount-3", {"refcount_bits": "3"}),
    ("refcount-128", {"refcount_bits": "128"}),
    ("refcount-0", {"refcount_bits": "0"}),
    ("prealloc-bogus", {"preallocation": "sparse"}),
    ("compat-bogus", {"compat": "2.0"}),
    ("backing-prealloc", {"backing_file": "base.qcow2", "backing_fmt": "qcow2", "preallocation": "metadata"}),
    ("backing-fmt-alone", {"backing_fmt": "qcow2"}),
    ("unknown-option", {"no_such_option": "1"}),
]


@pytest.mark.parametrize("name,options", BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_option_combinations_qemu_refuses(tmp_path, name, options):
    u.qemu_create(tmp_path / "base.qcow2", 4 * MiB)
    opts = ",".join("%s=%s" % kv for kv in options.items())
    proc = u.qemu_img("create", "-f", "qcow2", "-o", opts, tmp_path / "q.qcow2", "4M", check=False)
    assert proc.returncode == 1, "qemu-img accepts %s: fixture is wrong" % opts
    path = tmp_path / "t.qcow2"
    with pytest.raises(errors.ImageError) as excinfo:
        u.vdisk_create(path, 4 * MiB, **options)
    assert isinstance(excinfo.value, errors.InvalidOption), "%s: %s" % (type(excinfo.value).__name__, excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert sorted(os.listdir(tmp_path)) == ["base.qcow2"], "a refused create left files: %s" % os.listdir(tmp_path)


def test_lazy_refcounts_dirty_bit_while_open_and_after_a_crash(tmp_path):
    """lazy_refcounts: the dirty bit is set on disk while vdisk writes and cleared on close; a
    writer killed mid-session leaves a dirty image that qemu-img check -r all and vdisk both repair."""
    import subprocess
    import sys
    path = tmp_path / "l.qcow2"
    u.vdisk_create(path, 8 * MiB, lazy_refcounts="on", cluster_size="4k")
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        img.write(1000, b"\x05" * 20000)
        info = json.loads(u.qemu_img("info", "-U", "--output=json", path).stdout)
        assert info.get("dirty-flag") is True, "dirty bit not set on disk while writing with lazy refcounts"
    finally:
        u.close_chain(img)
    info = json.loads(u.qemu_img("info", "--output=json", path).stdout)
    assert info.get("dirty-flag") is False
    u.assert_check_clean(path)
    # a writer that dies without closing
    code = ("import sys, os; sys.path[:0] = %r; import qcow2_util as u\n"
            "img = u.open_image(%r, 'qcow2', writable=True)\n"
            "img.write(3 * 1024 * 1024 + 5, b'\\x06' * 300000)\n"
            "os._exit(9)\n" % (sys.path[:3] + [os.path.dirname(os.path.abspath(__file__))], str(path)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    info = json.loads(u.qemu_img("info", "--output=json", path).stdout)
    assert info.get("dirty-flag") is True
    model = bytearray(8 * MiB)
    model[1000:21000] = b"\x05" * 20000
    model[3 * MiB + 5:3 * MiB + 300005] = b"\x06" * 300000
    assert u.vdisk_read_all(path) == bytes(model), "data written before the crash is not readable"
    img = u.open_image(str(path), "qcow2", writable=True)     # repairs, as QEMU does on a rw open
    try:
        img.write(0, b"\x07")
        model[0] = 7
    finally:
        u.close_chain(img)
    u.assert_check_clean(path)
    assert u.qemu_to_raw(path) == bytes(model)
