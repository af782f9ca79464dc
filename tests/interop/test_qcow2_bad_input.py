"""Bad qcow2 input: each case is refused with one ImageError subclass and a one-line message.

Damaged headers (truncated, bad magic or version, unknown incompatible feature bit, huge
l1_size, unaligned refcount table, cluster_bits out of range, header_length too large or
too small), unsafe backing files (outside the allowed directories, ``json:``/protocol
names, loops), sizes the format cannot hold, and images locked by a running qemu-io.
For every case: the engine raises exactly the expected ImageError subclass, ``str()`` is a
single line, the file is left unchanged; qemu-img refuses the same file (where it is a
format error); and the ``vdisk`` CLI exits 1 with one stderr line starting ``vdisk: ``.
"""
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

import qcow2_util as u
from qcow2_util import MiB, errors

pytestmark = pytest.mark.skipif(not (u.QEMU_IMG and u.QEMU_IO), reason="needs qemu-img and qemu-io")

CLI_MODULE = u.PKG   # python -m ansible_collections.vdisk.images.plugins.module_utils.vdisk


# -- fixtures -------------------------------------------------------------------------------
def good_image(tmp_path, name="t.qcow2", options=None):
    path = tmp_path / name
    u.qemu_create(path, 4 * MiB, options=options)
    u.qemu_io(path, "write -P 1 0 64k", "write -P 2 1M 4k")
    return path


def poke(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def truncated(size):
    def build(tmp_path):
        path = good_image(tmp_path)
        os.truncate(path, size)
        return path
    return build


def poked(offset, fmt, value, options=None):
    def build(tmp_path):
        path = good_image(tmp_path, options=options)
        poke(path, offset, fmt, value)
        return path
    return build


def poked_all(*pokes):
    def build(tmp_path):
        path = good_image(tmp_path)
        for offset, fmt, value in pokes:
            poke(path, offset, fmt, value)
        return path
    return build


def bad_magic(tmp_path):
    path = good_image(tmp_path)
    with open(path, "r+b") as f:
        f.write(b"QFI\x00")
    return path


# id, builder, expected classes, substring of the message (lower case), qemu-img refuses it too
HEADER_CASES = [
    ("truncated-0", truncated(0), (errors.FormatError,), None, True),
    ("truncated-50", truncated(50), (errors.FormatError,), None, True),
    ("truncated-100-v3", truncated(100), (errors.FormatError, errors.CorruptImage), None, True),
    ("bad-magic", bad_magic, (errors.FormatError,), None, True),
    ("version-4", poked(4, ">I", 4), (errors.FormatError, errors.UnsupportedFeature), "version", True),
    ("version-1", poked(4, ">I", 1), (errors.FormatError, errors.UnsupportedFeature), None, True),
    ("incompat-bit-63", poked(72, ">Q", 1 << 63), (errors.UnsupportedFeature,), "feature", True),
    ("incompat-bit-40", poked(72, ">Q", 1 << 40), (errors.UnsupportedFeature,), "feature", True),
    ("l1-size-huge", poked(36, ">I", 0x7FFFFFFF), (errors.FormatError, errors.CorruptImage), "l1", True),
    ("l1-size-ffffffff", poked(36, ">I", 0xFFFFFFFF), (errors.FormatError, errors.CorruptImage), "l1", True),
    ("l1-offset-unaligned", poked(40, ">Q", 0x30200), (errors.FormatError, errors.CorruptImage), "l1", True),
    ("reftable-unaligned", poked(48, ">Q", 0x10200), (errors.FormatError, errors.CorruptImage), None, True),
    ("reftable-clusters-huge", poked(56, ">I", 0xFFFFFF), (errors.FormatError, errors.CorruptImage), None, True),
    ("cluster-bits-8", poked(20, ">I", 8), (errors.FormatError, errors.UnsupportedFeature, errors.CorruptImage),
     "cluster", True),
    ("cluster-bits-22", poked(20, ">I", 22),
     (errors.FormatError, errors.UnsupportedFeature, errors.CorruptImage), "cluster", True),
    ("cluster-bits-huge", poked(20, ">I", 0xFFFFFFFF),
     (errors.FormatError, errors.UnsupportedFeature, errors.CorruptImage), "cluster", True),
    ("header-length-huge", poked(100, ">I", 0x7FFFFFF8), (errors.FormatError, errors.CorruptImage), "header", True),
    ("header-length-over-cluster", poked(100, ">I", 65544), (errors.FormatError, errors.CorruptImage), "header",
     True),
    ("header-length-too-short", poked(100, ">I", 96), (errors.FormatError, errors.CorruptImage), "header", True),
    ("backing-name-too-long", poked_all((8, ">Q", 0x1000), (16, ">I", 0xFFFFFFFF)),
     (errors.FormatError, errors.CorruptImage), "backing", True),
    ("backing-name-1024", poked_all((8, ">Q", 0x1000), (16, ">I", 1024)),
     (errors.FormatError, errors.CorruptImage), "backing", True),
    ("backing-offset-outside-cluster", poked(8, ">Q", 0x20000),
     (errors.FormatError, errors.CorruptImage), "backing", True),
]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def open_and_read(path, writable=False, **policy):
    """Open the chain, read the first and last cluster, close: what info/convert/map do."""
    pol = u.Policy(**policy) if policy else None
    img = u.open_image(str(path), "qcow2", writable=writable, policy=pol)
    try:
        img.read(0, min(65536, img.virtual_size))
        img.read(max(0, img.virtual_size - 4096), min(4096, img.virtual_size))
        list(img.extents())
    finally:
        u.close_chain(img)


def assert_one_error(excinfo, expected, fragment=None):
    err = excinfo.value
    assert isinstance(err, expected), "raised %s (%s), expected %s" % (
        type(err).__name__, err, " or ".join(c.__name__ for c in expected))
    text = str(err)
    assert text and "\n" not in text, "error message is not one line: %r" % text
    if fragment:
        assert fragment in text.lower(), "message %r does not mention %r" % (text, fragment)
    assert err.__cause__ is None or isinstance(err.__cause__, errors.ImageError) or err.__suppress_context__, (
        "error chained from a non-ImageError: %r" % (err.__cause__,))


@pytest.mark.parametrize("name,build,expected,fragment,qemu_refuses", HEADER_CASES,
                         ids=[c[0] for c in HEADER_CASES])
@pytest.mark.parametrize("writable", [False, True], ids=["ro", "rw"])
def test_bad_header_is_refused(tmp_path, name, build, expected, fragment, qemu_refuses, writable):
    path = build(tmp_path)
    if qemu_refuses:
        proc = u.qemu_img("info", "-f", "qcow2", path, check=False)
        assert proc.returncode == 1, "fixture is not bad for qemu-img either: %s" % proc.stdout
    before = sha(path)
    with pytest.raises(errors.ImageError) as excinfo:
        open_and_read(path, writable=writable)
    assert_one_error(excinfo, expected, fragment)
    assert sha(path) == before, "a refused open changed the file"


MESSAGE_PARITY = ("version-4", "incompat-bit-63", "incompat-bit-40", "l1-size-huge", "l1-offset-unaligned",
                  "reftable-unaligned", "reftable-clusters-huge", "cluster-bits-8", "cluster-bits-22",
                  "header-length-huge", "header-length-too-short", "backing-name-too-long",
                  "backing-offset-outside-cluster", "bad-magic")


@pytest.mark.parametrize("name,build", [(c[0], c[1]) for c in HEADER_CASES if c[0] in MESSAGE_PARITY],
                         ids=[c[0] for c in HEADER_CASES if c[0] in MESSAGE_PARITY])
def test_message_names_what_qemu_names(tmp_path, name, build):
    """vdisk's message contains qemu-img's reason ("Could not open 'X': <reason>") word for word."""
    path = build(tmp_path)
    proc = u.qemu_img("info", "-f", "qcow2", path, check=False)
    reason = proc.stderr.decode().strip().splitlines()[0].split("': ", 1)[1]
    with pytest.raises(errors.ImageError) as excinfo:
        open_and_read(path)
    assert reason in str(excinfo.value), "qemu-img says %r, vdisk says %r" % (reason, str(excinfo.value))


def test_qemu_message_for_unknown_incompatible_bit(tmp_path):
    """Oracle check for the poke itself: qemu names the unknown feature."""
    path = poked(72, ">Q", 1 << 63)(tmp_path)
    proc = u.qemu_img("info", path, check=False)
    assert b"Unsupported" in proc.stderr and b"feature" in proc.stderr, proc.stderr


def test_corrupt_bit_refuses_read_write_but_reads(tmp_path):
    """Incompatible bit 1 (corrupt): QEMU opens read-only only; so does vdisk."""
    path = good_image(tmp_path)
    poke(path, 72, ">Q", 2)
    proc = u.run(u.QEMU_IO, "-f", "qcow2", "-c", "write 0 512", path, check=False)
    assert proc.returncode != 0 and b"corrupt" in proc.stderr.lower(), proc.stderr
    before = sha(path)
    with pytest.raises(errors.ImageError) as excinfo:
        open_and_read(path, writable=True)
    assert_one_error(excinfo, (errors.CorruptImage,), "corrupt")
    assert sha(path) == before
    expected = u.qemu_to_raw(path)
    assert u.vdisk_read_all(path) == expected


# -- backing files the policy refuses --------------------------------------------------------
def backing_outside(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    base = other / "base.qcow2"
    u.qemu_create(base, 4 * MiB)
    top_dir = tmp_path / "top"
    top_dir.mkdir()
    top = top_dir / "top.qcow2"
    u.qemu_create(top, 4 * MiB, backing="../other/base.qcow2", backing_fmt="qcow2")
    return top


def backing_absolute_outside(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    base = other / "base.raw"
    u.qemu_create(base, 4 * MiB, fmt="raw")
    top_dir = tmp_path / "top"
    top_dir.mkdir()
    top = top_dir / "top.qcow2"
    u.qemu_create(top, 4 * MiB, backing=str(base), backing_fmt="raw")
    return top


def backing_symlink_outside(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    u.qemu_create(other / "base.raw", 4 * MiB, fmt="raw")
    top_dir = tmp_path / "top"
    top_dir.mkdir()
    os.symlink("../other/base.raw", str(top_dir / "base.raw"))
    top = top_dir / "top.qcow2"
    u.qemu_create(top, 4 * MiB, backing="base.raw", backing_fmt="raw")
    return top


def backing_etc_passwd(tmp_path):
    top = tmp_path / "top.qcow2"
    u.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", top, "4M")
    return top


def backing_json(tmp_path):
    top = tmp_path / "top.qcow2"
    spec = 'json:{"driver": "raw", "file": {"driver": "file", "filename": "%s"}}' % (tmp_path / "x.raw")
    u.qemu_create(tmp_path / "x.raw", 4 * MiB, fmt="raw")
    u.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", spec, "-F", "raw", top, "4M")
    return top


def backing_nbd(tmp_path):
    top = tmp_path / "top.qcow2"
    u.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "nbd://localhost:10809/disk", "-F", "raw", top, "4M")
    return top


def backing_loop(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    u.qemu_create(b, 4 * MiB)
    u.qemu_create(a, 4 * MiB, backing="b.qcow2", backing_fmt="qcow2")
    u.qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", b)
    return a


def backing_self_loop(tmp_path):
    a = tmp_path / "a.qcow2"
    u.qemu_create(a, 4 * MiB)
    u.qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a)
    return a


def backing_loop_3(tmp_path):
    a, b, c = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.qcow2"
    u.qemu_create(c, 4 * MiB)
    u.qemu_create(b, 4 * MiB, backing="c.qcow2", backing_fmt="qcow2")
    u.qemu_create(a, 4 * MiB, backing="b.qcow2", backing_fmt="qcow2")
    u.qemu_img("rebase", "-u", "-b", "./a.qcow2", "-F", "qcow2", c)
    return a


BACKING_CASES = [
    ("outside-relative", backing_outside),
    ("outside-absolute", backing_absolute_outside),
    ("outside-symlink", backing_symlink_outside),
    ("etc-passwd", backing_etc_passwd),
    ("json", backing_json),
    ("nbd", backing_nbd),
    ("loop", backing_loop),
    ("self-loop", backing_self_loop),
    ("loop-3", backing_loop_3),
]


@pytest.mark.parametrize("name,build", BACKING_CASES, ids=[c[0] for c in BACKING_CASES])
@pytest.mark.parametrize("writable", [False, True], ids=["ro", "rw"])
def test_unsafe_backing_file_is_refused(tmp_path, name, build, writable):
    path = build(tmp_path)
    before = sha(path)
    with pytest.raises(errors.ImageError) as excinfo:
        open_and_read(path, writable=writable)
    assert_one_error(excinfo, (errors.PolicyError,))
    assert sha(path) == before


def test_backing_outside_allowed_with_allow_path(tmp_path):
    """The same image opens when the other directory is allowed explicitly."""
    top = backing_outside(tmp_path)
    u.qemu_io(tmp_path / "other" / "base.qcow2", "write -P 0x3c 0 4k")
    img = u.open_image(str(top), "qcow2", writable=False, policy=u.Policy(allowed_dirs=(str(tmp_path / "other"),)))
    try:
        assert img.read(0, 4096) == b"\x3c" * 4096
    finally:
        u.close_chain(img)


# -- sizes the format cannot hold -----------------------------------------------------------
TOO_BIG = [
    ("64k-2P+512", 2 ** 51 + 512, {}),
    ("64k-4P", 2 ** 52, {}),
    ("512-128G+512", 128 * 2 ** 30 + 512, {"cluster_size": "512"}),
    ("4k-8T+4k", 8 * 2 ** 40 + 4096, {"cluster_size": "4k"}),
    ("extl2-16k", 2 ** 50 // 16 + 2 ** 40, {"cluster_size": "16k", "extended_l2": "on"}),
    ("8E-1", 2 ** 63 - 512, {}),
]


@pytest.mark.parametrize("name,size,options", TOO_BIG, ids=[c[0] for c in TOO_BIG])
def test_size_the_format_cannot_hold(tmp_path, name, size, options):
    qpath = tmp_path / "q.qcow2"
    opts = ",".join("%s=%s" % kv for kv in options.items())
    proc = u.qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), qpath, size, check=False)
    assert proc.returncode == 1, "qemu-img accepts %d: the fixture is wrong" % size
    path = tmp_path / "t.qcow2"
    with pytest.raises(errors.ImageError) as excinfo:
        u.vdisk_create(path, size, **options)
    assert_one_error(excinfo, (errors.InvalidOption,))
    assert not os.listdir(tmp_path), "a refused create left files: %s" % os.listdir(tmp_path)


@pytest.mark.parametrize("size,options", [(128 * 2 ** 30, {"cluster_size": "512"})], ids=["512-128G"])
def test_largest_size_is_accepted(tmp_path, size, options):
    """The exact limit (L1 table of 32 MiB) is accepted, as by qemu-img."""
    path = tmp_path / "t.qcow2"
    u.vdisk_create(path, size, **options)
    u.assert_check_clean(path)
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        img.write(size - 1000, b"\x01" * 1000)
    finally:
        u.close_chain(img)
    u.assert_check_clean(path)
    assert u.qemu_io(path, "read -P 1 %d 1000" % (size - 1000))


# -- locks ----------------------------------------------------------------------------------
def _inode_locked(path, byte):
    st = os.stat(path)
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[5].endswith(":%d" % st.st_ino):
                start, end = parts[6], parts[7]
                if start.isdigit() and int(start) <= byte <= (int(end) if end.isdigit() else 1 << 62):
                    return True
    return False


QEMU_NBD = shutil.which("qemu-nbd")


@pytest.fixture(params=["qemu-io", "qemu-nbd"])
def qemu_io_holding(request, tmp_path):
    """A running interactive qemu-io (or a qemu-nbd server) that has the image open read-write,
    like a running VM."""
    path = good_image(tmp_path)
    if request.param == "qemu-io":
        cmd = [u.QEMU_IO, "-f", "qcow2", str(path)]
    else:
        if not QEMU_NBD:
            pytest.skip("qemu-nbd is not installed")
        cmd = [QEMU_NBD, "-k", str(tmp_path / "nbd.sock"), "-f", "qcow2", str(path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        while not _inode_locked(path, 201):         # "refuses to share write" byte
            assert proc.poll() is None, "%s exited: %s" % (request.param, proc.stderr.read())
            assert time.time() < deadline, "%s did not lock the image within 10 s" % request.param
            time.sleep(0.05)
        yield path
    finally:
        proc.stdin.close()
        if request.param == "qemu-nbd":
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_image_locked_by_qemu_io_refused_for_writing(qemu_io_holding):
    path = qemu_io_holding
    before = sha(path)
    with pytest.raises(errors.ImageError) as excinfo:
        open_and_read(path, writable=True)
    assert_one_error(excinfo, (errors.ImageInUse,))
    assert sha(path) == before


def test_image_locked_by_qemu_io_refused_for_reading_without_force_share(qemu_io_holding):
    """qemu-img info fails on it ("Failed to get shared "write" lock"): so does a vdisk reader."""
    path = qemu_io_holding
    assert u.qemu_img("info", path, check=False).returncode == 1
    with pytest.raises(errors.ImageError) as excinfo:
        open_and_read(path, writable=False)
    assert_one_error(excinfo, (errors.ImageInUse,))


def test_image_locked_by_qemu_io_readable_with_force_share(qemu_io_holding):
    img = u.open_image(str(qemu_io_holding), "qcow2", writable=False, policy=u.Policy(force_share=True))
    try:
        assert img.read(0, 4096) == b"\x01" * 4096
    finally:
        u.close_chain(img)


def test_image_written_by_vdisk_is_locked_for_qemu(tmp_path):
    path = good_image(tmp_path)
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        proc = u.run(u.QEMU_IO, "-f", "qcow2", "-c", "read 0 512", path, check=False)
        out = proc.stdout + proc.stderr
        assert b"lock" in out, "qemu-io could open an image vdisk has open for writing: %s" % out
    finally:
        u.close_chain(img)
    u.qemu_io(path, "read -P 1 0 64k")


# -- the CLI: exit 1 and one stderr line "vdisk: ..." ---------------------------------------
def cli(*args):
    env = dict(os.environ)
    import ansible_collections
    roots = [os.path.dirname(p) for p in ansible_collections.__path__]
    env["PYTHONPATH"] = os.pathsep.join(roots + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", CLI_MODULE] + [str(a) for a in args], capture_output=True,
                          text=True, env=env, timeout=120)


def assert_cli_error(proc, args):
    if "No module named" in proc.stderr or "cannot be directly executed" in proc.stderr:
        pytest.fail("the vdisk CLI is not available yet (python -m %s %s): %s"
                    % (CLI_MODULE, " ".join(map(str, args)), proc.stderr.strip().splitlines()[-1:]))
    lines = proc.stderr.strip("\n").splitlines()
    assert proc.returncode == 1, "vdisk %s: exit %d, expected 1; stderr: %r" % (
        " ".join(map(str, args)), proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("vdisk: "), (
        "vdisk %s: stderr must be one line starting 'vdisk: ', got %r" % (" ".join(map(str, args)), proc.stderr))
    assert "Traceback" not in proc.stderr


CLI_INFO_CASES = [(c[0], c[1]) for c in HEADER_CASES if c[0] in (
    "truncated-50", "bad-magic", "incompat-bit-63", "l1-size-huge", "reftable-unaligned", "cluster-bits-22",
    "header-length-huge")] + [(c[0], c[1]) for c in BACKING_CASES if c[0] in ("outside-relative", "json", "loop")]


@pytest.mark.parametrize("name,build", CLI_INFO_CASES, ids=[c[0] for c in CLI_INFO_CASES])
def test_cli_info_refuses(tmp_path, name, build):
    path = build(tmp_path)
    args = ["info", "-f", "qcow2", path]
    assert_cli_error(cli(*args), args)


@pytest.mark.parametrize("name,size,options", TOO_BIG[:3], ids=[c[0] for c in TOO_BIG[:3]])
def test_cli_create_refuses_size(tmp_path, name, size, options):
    args = ["create", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join("%s=%s" % kv for kv in options.items())]
    args += [tmp_path / "t.qcow2", size]
    assert_cli_error(cli(*args), args)
    assert not (tmp_path / "t.qcow2").exists()


def test_cli_info_refuses_locked_image(qemu_io_holding):
    args = ["info", "-f", "qcow2", qemu_io_holding]
    assert_cli_error(cli(*args), args)


# -- bad requests on a good image -----------------------------------------------------------
def test_requests_beyond_the_end_are_refused(tmp_path):
    path = good_image(tmp_path)
    before = sha(path)
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        size = img.virtual_size
        for call in (lambda: img.write(size - 1, b"ab"), lambda: img.read(size - 10, 11),
                     lambda: img.write_zeroes(size, 512), lambda: img.write(-512, b"x" * 512),
                     lambda: img.discard(size - 512, 1024)):
            with pytest.raises(errors.ImageError) as excinfo:
                call()
            assert "\n" not in str(excinfo.value)
    finally:
        u.close_chain(img)
    assert sha(path) == before, "refused requests changed the image"
    u.assert_check_clean(path)


def test_read_only_image_refuses_writes(tmp_path):
    path = good_image(tmp_path)
    before = sha(path)
    img = u.open_image(str(path), "qcow2", writable=False)
    try:
        for call in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512), lambda: img.discard(0, 65536)):
            with pytest.raises(errors.ImageError) as excinfo:
                call()
            assert isinstance(excinfo.value, errors.ReadOnlyImage), type(excinfo.value)
    finally:
        u.close_chain(img)
    assert sha(path) == before


def test_second_vdisk_writer_is_refused(tmp_path):
    path = good_image(tmp_path)
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        with pytest.raises(errors.ImageError) as excinfo:
            open_and_read(path, writable=True)
        assert_one_error(excinfo, (errors.ImageInUse,))
    finally:
        u.close_chain(img)
    open_and_read(path, writable=True)      # free again once closed


def test_backing_name_with_nul_bytes(tmp_path):
    """backing_file_size covering NUL bytes after the name (found by the mutation test): QEMU reads
    the name as a C string ("base.qcow2"); vdisk must do the same or raise an ImageError."""
    u.qemu_create(tmp_path / "base.qcow2", 1 * MiB)
    u.qemu_io(tmp_path / "base.qcow2", "write -P 0x3 0 4k")
    path = tmp_path / "t.qcow2"
    u.qemu_create(path, None, backing="base.qcow2", backing_fmt="qcow2")
    poke(path, 16, ">I", 0xFF)              # name length 255: the name plus NUL padding
    info = u.qemu_img("info", "--output=json", path).stdout.decode()
    assert '"backing-filename": "base.qcow2"' in info, info
    try:
        img = u.open_image(str(path), "qcow2", writable=False)
    except errors.ImageError as exc:
        assert "\n" not in str(exc)
        return
    try:
        assert img.backing_filename == "base.qcow2"
        assert img.read(0, 4096) == b"\x03" * 4096
    finally:
        u.close_chain(img)


def test_unknown_compatible_and_autoclear_bits(tmp_path):
    """As qemu-io: an unknown compatible bit is kept, an unknown autoclear bit is cleared by a writer."""
    path = good_image(tmp_path)
    poke(path, 80, ">Q", 1 << 63)
    poke(path, 88, ">Q", 1 << 63)
    assert u.vdisk_read_all(path) == u.qemu_to_raw(path)
    with open(path, "rb") as f:
        f.seek(80)
        assert struct.unpack(">QQ", f.read(16)) == (1 << 63, 1 << 63), "a read-only open changed feature bits"
    img = u.open_image(str(path), "qcow2", writable=True)
    try:
        img.write(5000, b"\x09" * 5000)
    finally:
        u.close_chain(img)
    with open(path, "rb") as f:
        f.seek(80)
        compatible, autoclear = struct.unpack(">QQ", f.read(16))
    assert compatible == 1 << 63, "unknown compatible bit dropped: 0x%x" % compatible
    assert autoclear == 0, "unknown autoclear bit not cleared: 0x%x" % autoclear
    u.assert_check_clean(path)
    u.qemu_io(path, "read -P 9 5000 5000")


# -- mutations: only ImageError escapes, in bounded time ------------------------------------
def _fuzz_source(tmp_dir):
    """A small image using most header features: v3, extended L2, backing file + format, data, zeros,
    compressed clusters (made once, mutated per example)."""
    base = os.path.join(tmp_dir, "base.qcow2")
    u.qemu_create(base, 1 * MiB)
    u.qemu_io(base, "write -P 0x3 0 512k")
    src = os.path.join(tmp_dir, "src.qcow2")
    u.qemu_create(src, 2 * MiB, options={"cluster_size": "16k", "extended_l2": "on"},
                  backing="base.qcow2", backing_fmt="qcow2")
    u.qemu_io(src, "write -P 0x5 1000 40000", "write -z 100k 32k", "write -c -P 0x6 1M 32k", "discard 64k 16k")
    with open(src, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    return str(d), _fuzz_source(str(d))


def _exercise(path):
    try:
        img = u.open_image(path, "qcow2", writable=False)
    except errors.ImageError as exc:
        assert "\n" not in str(exc)
        return
    try:
        size = min(img.virtual_size, 4 * MiB)
        for off in range(0, size, 256 * 1024):
            try:
                img.read(off, min(256 * 1024, size - off))
            except errors.ImageError:
                pass
        try:
            list(img.extents(0, size))
        except errors.ImageError:
            pass
    finally:
        u.close_chain(img)


def test_header_mutations_raise_only_image_errors(fuzz_dir):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st
    directory, source = fuzz_dir
    # the header, extensions and backing name live in the first 512 bytes; L1/L2/refcounts further on
    header_pos = st.integers(0, 511)
    meta_pos = st.integers(512, len(source) - 1)
    mutation = st.tuples(st.one_of(header_pos, header_pos, meta_pos),
                         st.sampled_from([b"\xff", b"\x00", b"\x7f\xff\xff\xff", b"\xff" * 8, b"\x01", b"\x80"]))

    @settings(max_examples=int(os.environ.get("VDISK_FUZZ_EXAMPLES", "200")), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(mutation, min_size=1, max_size=4))
    def run(mutations):
        data = bytearray(source)
        for pos, value in mutations:
            data[pos:pos + len(value)] = value
        path = os.path.join(directory, "m.qcow2")
        with open(path, "wb") as f:
            f.write(data[:len(source)])
        start = time.time()
        _exercise(path)
        assert time.time() - start < 10, "took %.1f s" % (time.time() - start)

    run()
