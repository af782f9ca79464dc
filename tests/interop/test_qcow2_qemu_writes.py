"""qcow2 images created by qemu-img and written by qemu-io, read by vdisk.

The same create-option matrix as the vdisk-written tests, written with ``write -P``,
``write -z``, ``write -z -u``, ``write -c`` and ``discard`` at unaligned offsets; plus
compressed images from ``qemu-img convert -c`` (zlib, zstd) and 3-level backing chains.
vdisk's read of the whole disk must equal ``qemu-img convert -O raw`` byte for byte, and
vdisk's extents (walked down the chain) must agree with ``qemu-img map --output=json`` on
data / zero / unallocated for every range, and on the layer that decides it.
"""
import pytest

import qcow2_util as u
from qcow2_util import KiB, MiB, errors

pytestmark = pytest.mark.skipif(not (u.QEMU_IMG and u.QEMU_IO), reason="needs qemu-img and qemu-io")


def qemu_script(cs, size, l2span, compressed_writes=True):
    half = size // 2
    q = size // 4
    cmds = [
        "write -P 0x11 1000 %d" % (2 * cs + 777),
        "write -P 0x22 %d %d" % (cs // 2 + 3, cs),
        "write -P 0x33 %d %d" % (size - cs - 5, cs + 5),
        "write -P 0x44 %d %d" % (half + 123, 5 * cs + 17),
        "write -z %d %d" % (half + 200, 2 * cs),
        "write -z -u %d %d" % (half + 3 * cs, cs),
        "write -z -u %d %d" % (3 * cs + 100, cs),
        "write -P 0x99 %d 1" % (7 * cs + 511),
        "discard 500 %d" % (2 * cs + 100),
        "write -P 0x55 1500 300",
        "discard %d %d" % (half, 3 * cs),
        "write -z %d %d" % (q + 17, 3 * cs + 1),
        "write -P 0x66 %d 10" % (q + cs),
        "write -z -u %d %d" % (q + 8 * cs, 2 * cs),
        "discard %d %d" % (q + 12 * cs, 2 * cs),
        "write -z %d %d" % (q + 16 * cs, 2 * cs),       # whole clusters, allocation kept where there was one
    ]
    if compressed_writes:
        qa = q // cs * cs                              # compressed writes must be cluster aligned
        c0 = qa + 20 * cs if qa + 26 * cs <= size else qa + 10 * cs
        cmds += [
            "write -c -P 0x77 %d %d" % (c0, 2 * cs),
            "write -c -P 0x78 %d %d" % (c0 + 3 * cs, cs),
            "write -P 0x79 %d 100" % (c0 + 3 * cs + 50),  # overwrite part of a compressed cluster
        ]
    if l2span < size:
        cmds += ["write -P 0x88 %d 1400" % (l2span - 700), "write -z -u %d %d" % (l2span - cs, cs)]
        if 2 * l2span + cs + 3 < size:
            cmds.append("write -P 0x89 %d %d" % (2 * l2span - cs - 3, 2 * cs + 6))
    return cmds


def assert_vdisk_matches_qemu(path, fmt="qcow2"):
    expected = u.qemu_to_raw(path, fmt)
    img = u.open_image(str(path), fmt, writable=False)
    try:
        assert img.virtual_size == len(expected)
        data = u.read_image(img)
        assert data == expected, "vdisk read of %s differs from qemu-img convert: %s" % (
            path.name, u.first_diff(data, expected))
        # unaligned small reads too
        for off, n in ((1, 1), (999, 3000), (len(expected) - 7, 7), (len(expected) // 3 + 5, 70001)):
            if off + n <= len(expected):
                assert img.read(off, n) == expected[off:off + n], "read(%d, %d) of %s" % (off, n, path.name)
    finally:
        u.close_chain(img)
    u.assert_map_agrees(path, fmt)


CONFIGS = [
    ("compat-0.10", 16 * MiB, {"compat": "0.10"}),
    ("compat-0.10-4k", 16 * MiB, {"compat": "0.10", "cluster_size": "4k"}),
    ("compat-1.1", 16 * MiB, {"compat": "1.1"}),
    ("cluster-512", 4 * MiB, {"cluster_size": "512"}),
    ("cluster-4k", 16 * MiB, {"cluster_size": "4k"}),
    ("cluster-64k", 16 * MiB, {"cluster_size": "64k"}),
    ("cluster-2M", 64 * MiB, {"cluster_size": "2M"}),
    ("prealloc-metadata", 16 * MiB, {"preallocation": "metadata"}),
    ("prealloc-metadata-4k", 8 * MiB, {"preallocation": "metadata", "cluster_size": "4k"}),
    ("prealloc-falloc", 16 * MiB, {"preallocation": "falloc"}),
    ("prealloc-full", 16 * MiB, {"preallocation": "full"}),
    ("lazy-refcounts", 16 * MiB, {"lazy_refcounts": "on"}),
    ("refcount-1", 8 * MiB, {"refcount_bits": "1", "cluster_size": "4k"}),
    ("refcount-2", 8 * MiB, {"refcount_bits": "2", "cluster_size": "4k"}),
    ("refcount-8", 8 * MiB, {"refcount_bits": "8", "cluster_size": "4k"}),
    ("refcount-64", 8 * MiB, {"refcount_bits": "64", "cluster_size": "4k"}),
    ("extended-l2-16k", 32 * MiB, {"extended_l2": "on", "cluster_size": "16k"}),
    ("extended-l2-64k", 16 * MiB, {"extended_l2": "on"}),
    ("extended-l2-prealloc", 16 * MiB, {"extended_l2": "on", "cluster_size": "16k", "preallocation": "metadata"}),
    ("compression-zlib", 16 * MiB, {"compression_type": "zlib"}),
    ("extended-l2-2M", 64 * MiB, {"extended_l2": "on", "cluster_size": "2M"}),
    ("size-unaligned", 5 * MiB + 1536, {"cluster_size": "4k"}),
    ("fill-refcount-64-512", 4 * MiB, {"refcount_bits": "64", "cluster_size": "512", "fill": True}),
    ("fill-512-v2", 2 * MiB, {"cluster_size": "512", "compat": "0.10", "fill": True}),
]


@pytest.mark.parametrize("name,size,options", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_qemu_written_image_reads_identically(tmp_path, name, size, options):
    options = dict(options)
    fill = options.pop("fill", False)
    path = tmp_path / "img.qcow2"
    u.qemu_create(path, size, options=options)
    cs = int(u.get_driver("qcow2").parse_options({"cluster_size": options.get("cluster_size", "64k")})
             ["cluster_size"])
    ext = options.get("extended_l2") == "on"
    l2span = (cs // (16 if ext else 8)) * cs
    prealloc = options.get("preallocation", "off") != "off"
    assert_vdisk_matches_qemu(path)          # empty (or preallocated) image
    if fill:
        u.qemu_io(path, "write -P 0x42 0 %d" % size)
    # qemu cannot write compressed clusters over allocated ones ("write failed: Input/output error")
    u.qemu_io(path, *qemu_script(cs, size, l2span, compressed_writes=not (prealloc or fill)))
    assert_vdisk_matches_qemu(path)
    u.assert_info_agrees(path)


@pytest.mark.parametrize("backing_fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("options", [{}, {"cluster_size": "4k"}, {"compat": "0.10", "cluster_size": "4k"},
                                     {"extended_l2": "on", "cluster_size": "16k"}],
                         ids=["64k", "4k", "v2-4k", "extl2-16k"])
def test_qemu_written_overlay_reads_identically(tmp_path, options, backing_fmt):
    size = 16 * MiB
    base = tmp_path / ("base." + backing_fmt)
    u.qemu_create(base, size // 2, fmt=backing_fmt)
    u.qemu_io(base, "write -P 0x5a 0 %d" % (size // 2 - MiB), "write -P 0x5b 5000 70000", fmt=backing_fmt)
    path = tmp_path / "img.qcow2"
    u.qemu_create(path, size, options=options, backing=base.name, backing_fmt=backing_fmt)
    cs = int(u.get_driver("qcow2").parse_options({"cluster_size": options.get("cluster_size", "64k")})
             ["cluster_size"])
    ext = options.get("extended_l2") == "on"
    assert_vdisk_matches_qemu(path)
    u.qemu_io(path, *qemu_script(cs, size, (cs // (16 if ext else 8)) * cs))
    assert_vdisk_matches_qemu(path)


# -- compressed images from qemu-img convert -c ----------------------------------------------
def _source(tmp_path, size):
    src = tmp_path / "src.raw"
    u.make_raw(src, size)
    with open(src, "r+b") as f:
        for i in range(0, size, 3 * MiB // 2):
            f.seek(i)
            f.write(u.pattern(i // MiB, 700 * KiB))                 # compressible-ish
            f.seek(i + 800 * KiB)
            f.write(bytes((i * 7 + j * 13) & 0xFF for j in range(50000)))
            f.seek(i + 900 * KiB)
            f.write(b"\x42" * 100 * KiB)                             # very compressible
    return src


@pytest.mark.parametrize("cluster_size", ["4k", "64k", "2M"])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_compressed_zlib_image(tmp_path, cluster_size, compat):
    size = 12 * MiB
    src = _source(tmp_path, size)
    dst = tmp_path / "c.qcow2"
    u.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
               "cluster_size=%s,compat=%s" % (cluster_size, compat), src, dst)
    check = u.qemu_check(dst)
    assert check.get("compressed-clusters"), "qemu-img made no compressed clusters: %s" % check
    assert_vdisk_matches_qemu(dst)
    with open(src, "rb") as f:
        assert u.vdisk_read_all(dst) == f.read()
    # qemu rewrites parts of it: normal clusters among compressed ones, zeroes, discards
    u.qemu_io(dst, "write -P 0x21 100 5000", "write -z 1M 64k", "discard 2M 1M", "write -z -u 5M 128k")
    assert_vdisk_matches_qemu(dst)


@pytest.mark.parametrize("options", ["cluster_size=4k", "cluster_size=16k,extended_l2=on",
                                     "cluster_size=64k,compat=0.10", "cluster_size=64k,extended_l2=on"])
def test_compressed_image_written_by_vdisk(tmp_path, options):
    """vdisk overwrites and zeroes parts of compressed clusters (COW from a compressed cluster)."""
    size = 8 * MiB
    src = _source(tmp_path, size)
    dst = tmp_path / "c.qcow2"
    u.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, src, dst)
    assert u.qemu_check(dst).get("compressed-clusters")
    with open(src, "rb") as f:
        model = bytearray(f.read())
    img = u.open_image(str(dst), "qcow2", writable=True)
    try:
        for i, (off, n) in enumerate(((100, 10), (4095, 2), (1 * MiB + 3, 9000), (6 * MiB, 4096))):
            data = u.pattern(i + 40, n)
            img.write(off, data)
            model[off:off + n] = data
        img.write_zeroes(2 * MiB, 8192, unmap=True)
        model[2 * MiB:2 * MiB + 8192] = bytes(8192)
        img.write_zeroes(3 * MiB + 100, 4096, unmap=False)
        model[3 * MiB + 100:3 * MiB + 4196] = bytes(4096)
        # zero writes covering only part of a compressed cluster (with extended L2: whole subclusters)
        for off, n, unmap in ((512, 16384, False), (3 * MiB // 2 + 1024, 3072, True), (7 * MiB + 512, 70000, False)):
            img.write_zeroes(off, n, unmap=unmap)
            model[off:off + n] = bytes(n)
        img.discard(4 * MiB, 128 * KiB)
        u.discard_like_qemu(model, 4 * MiB, 128 * KiB, img.cluster_size, size, "compat=0.10" not in options, False)
    finally:
        u.close_chain(img)
    u.assert_check_clean(dst)
    got = u.qemu_to_raw(dst)
    assert got == bytes(model), "qemu reads something else than was written: %s" % u.first_diff(got, bytes(model))


def test_compressed_zstd_image(tmp_path):
    size = 4 * MiB
    src = _source(tmp_path, size)
    dst = tmp_path / "z.qcow2"
    u.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", src, dst)
    info = u.qemu_img("info", "--output=json", dst).stdout.decode()
    assert '"zstd"' in info
    if u.HAVE_ZSTD:
        assert_vdisk_matches_qemu(dst)
        return
    with pytest.raises(errors.ImageError) as exc:
        u.vdisk_read_all(dst)
    assert isinstance(exc.value, errors.MissingPackage), "%s: %s" % (type(exc.value).__name__, exc.value)
    text = str(exc.value)
    assert "\n" not in text and "backports.zstd" in text, text


def test_zstd_typed_image_without_compressed_clusters_reads(tmp_path):
    """The compression type matters only for compressed clusters: a zstd image without any reads fine."""
    path = tmp_path / "z.qcow2"
    u.qemu_create(path, 4 * MiB, options={"compression_type": "zstd"})
    u.qemu_io(path, "write -P 0x12 1000 70000", "write -z 1M 64k")
    assert_vdisk_matches_qemu(path)


# -- 3-level backing chains -----------------------------------------------------------------
CHAINS = [
    # id, (base fmt, size, options), (mid size, options), (top size, options)
    ("raw-growing", ("raw", 4 * MiB, {}), (8 * MiB, {}), (16 * MiB, {})),
    ("qcow2-shrinking", ("qcow2", 16 * MiB, {}), (8 * MiB, {"cluster_size": "4k"}), (4 * MiB, {})),
    ("qcow2-mixed", ("qcow2", 8 * MiB, {"cluster_size": "4k"}), (16 * MiB, {"compat": "0.10"}),
     (8 * MiB, {"extended_l2": "on", "cluster_size": "16k"})),
    ("raw-top-larger", ("raw", 8 * MiB, {}), (4 * MiB, {"cluster_size": "512"}),
     (12 * MiB, {"cluster_size": "4k"})),
    ("qcow2-compressed-base", ("qcow2c", 8 * MiB, {}), (8 * MiB, {"cluster_size": "4k"}),
     (8 * MiB, {"compat": "0.10"})),
]


@pytest.mark.parametrize("name,base_spec,mid_spec,top_spec", CHAINS, ids=[c[0] for c in CHAINS])
def test_three_level_chain(tmp_path, name, base_spec, mid_spec, top_spec):
    bfmt, bsize, bopts = base_spec
    if bfmt == "qcow2c":
        src = _source(tmp_path, bsize)
        base = tmp_path / "base.qcow2"
        u.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", src, base)
        bfmt = "qcow2"
    else:
        base = tmp_path / ("base." + bfmt)
        u.qemu_create(base, bsize, fmt=bfmt, options=bopts)
        u.qemu_io(base, "write -P 0xb0 0 %d" % bsize, "write -z %d 200k" % (bsize // 2 + 3072), fmt=bfmt)
    mid = tmp_path / "mid.qcow2"
    u.qemu_create(mid, mid_spec[0], options=mid_spec[1], backing=base.name, backing_fmt=bfmt)
    msize = mid_spec[0]
    u.qemu_io(mid, "write -P 0xc1 %d 100000" % (msize // 4 + 77), "write -z %d 65536" % (msize // 8),
              "write -z -u 0 4096", "discard %d 131072" % (msize // 2), "write -P 0xc2 %d 3000" % (msize - 3000))
    top = tmp_path / "top.qcow2"
    u.qemu_create(top, top_spec[0], options=top_spec[1], backing=mid.name, backing_fmt="qcow2")
    tsize = top_spec[0]
    u.qemu_io(top, "write -P 0xd1 %d 5000" % (tsize // 4 + 70000), "write -z -u %d 65536" % (tsize // 4),
              "write -P 0xd2 %d 777" % (tsize - 777), "write -z %d 300000" % (msize // 2 - 1000 if msize < tsize
                                                                              else tsize // 2 - 1000),
              "discard %d 131072" % (tsize // 8))
    assert_vdisk_matches_qemu(top)
    assert_vdisk_matches_qemu(mid)
    u.assert_info_agrees(top)

    # vdisk writes to the top of the chain: COW pulls from two levels down, qemu agrees
    model = bytearray(u.qemu_to_raw(top))
    img = u.open_image(str(top), "qcow2", writable=True)
    try:
        for i, off in enumerate((5, msize // 2 + 10, min(bsize, tsize) - 100, tsize // 4 + 60000)):
            if off + 300 <= tsize:
                data = u.pattern(60 + i, 300)
                img.write(off, data)
                model[off:off + 300] = data
    finally:
        u.close_chain(img)
    u.assert_check_clean(top)
    u.assert_check_clean(mid)
    assert u.qemu_to_raw(top) == bytes(model)


def test_dirty_image_from_killed_qemu_io(tmp_path):
    """lazy_refcounts image left dirty by a killed qemu-io: vdisk reads it read-only without
    touching it, and a read-write open repairs it (as QEMU does) so qemu-img check is clean."""
    path = tmp_path / "d.qcow2"
    u.qemu_create(path, 4 * MiB, options={"lazy_refcounts": "on", "cluster_size": "4k"})
    u.qemu_io(path, "write -P 0x10 0 1M")
    proc = u.run(u.QEMU_IO, "-f", "qcow2", "-c", "write -P 0x11 1000k 300k", "-c", "write -z -u 512k 64k",
                 "-c", "sigraise 9", path, check=False)
    assert proc.returncode != 0
    assert u.qemu_check(path)["rc"] != 0, "the fixture is not damaged"
    import hashlib
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = u.qemu_to_raw(path)
    img = u.open_image(str(path), "qcow2", writable=False)
    try:
        assert img.info().get("dirty-flag") is True
        assert u.read_image(img) == expected
    finally:
        u.close_chain(img)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "a read-only open changed the image"
    model = bytearray(expected)
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        img.write(3 * MiB + 5, b"\x22" * 9000)
        model[3 * MiB + 5:3 * MiB + 9005] = b"\x22" * 9000
    finally:
        u.close_chain(img)
    u.assert_check_clean(path)
    assert u.qemu_to_raw(path) == bytes(model)
    info = u.qemu_img("info", "--output=json", path).stdout.decode()
    assert '"dirty-flag": false' in info, info


@pytest.mark.parametrize("options", [{"cluster_size": "4k"}, {"compat": "0.10"},
                                     {"cluster_size": "16k", "extended_l2": "on"}, {"refcount_bits": "2"}],
                         ids=["4k", "v2", "extl2", "refcount-2"])
def test_vdisk_writes_over_clusters_shared_with_a_qemu_snapshot(tmp_path, options):
    """Clusters shared with an internal snapshot (refcount 2, no COPIED flag) must be copied, never
    overwritten: the snapshot keeps its content and qemu-img check stays clean."""
    size = 4 * MiB
    path = tmp_path / "s.qcow2"
    u.qemu_create(path, size, options=options)
    u.qemu_io(path, "write -P 0x31 0 1M", "write -z 1M 64k", "write -P 0x32 2M 100k")
    u.qemu_img("snapshot", "-c", "s1", path)
    before = u.qemu_to_raw(path)
    model = bytearray(before)
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        for off, n in ((100, 10), (4095, 3), (300 * 1024 + 7, 70000), (2 * MiB + 50, 5)):
            data = u.pattern(off % 251, n)
            img.write(off, data)
            model[off:off + n] = data
        img.write_zeroes(512 * 1024, 128 * 1024, unmap=True)
        model[512 * 1024:640 * 1024] = bytes(128 * 1024)
        img.write_zeroes(2 * MiB + 64 * 1024, 8192, unmap=False)
        model[2 * MiB + 64 * 1024:2 * MiB + 72 * 1024] = bytes(8192)
        img.discard(768 * 1024, 128 * 1024)
        u.discard_like_qemu(model, 768 * 1024, 128 * 1024, img.cluster_size, size, "compat" not in options, False)
    finally:
        u.close_chain(img)
    u.assert_check_clean(path)
    got = u.qemu_to_raw(path)
    assert got == bytes(model), "active layer: %s" % u.first_diff(got, bytes(model))
    snap = tmp_path / "snap.raw"
    u.qemu_img("convert", "-l", "snapshot.name=s1", "-f", "qcow2", "-O", "raw", path, snap)
    assert snap.read_bytes() == before, "the snapshot changed: %s" % u.first_diff(snap.read_bytes(), before)
