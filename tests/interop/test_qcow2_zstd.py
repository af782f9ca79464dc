"""zstd-compressed qcow2 (compression_type=zstd) against qemu-img, on every supported Python.

Both directions: images qemu-img compresses read byte for byte in vdisk; images vdisk
compresses (serially and with parallel workers) pass ``qemu-img check`` and compare equal.
The module comes from ``compression.zstd`` (3.14+) or ``backports.zstd``; without either,
the CLI fails with one line naming the package.

What runs where:
- the default suite runs everything with the interpreter running pytest (the project venv);
- ``-m slow`` adds ``test_round_trip_on_every_python``: for each other CPython 3.9+ found
  in /root/.pyenv/versions or on PATH, backports.zstd is installed with that Python's pip into a
  session temporary directory (``pip install --target``, about 2 s each from the package index),
  and the CLI runs there: create, compressed convert both ways, the missing-package line.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main as vdisk_main
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import compress
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image

MiB = helpers.MiB
KiB = 1024
MISSING = "zstd compression needs the Python package backports.zstd (pip install backports.zstd)"


@pytest.fixture(autouse=True, scope="module")
def _zstd_present():
    """The package is a dependency (pyproject.toml, make venv): its absence is a broken set-up."""
    if not compress.zstd_available():
        pytest.fail("no zstd module in %s: install backports.zstd (make venv)" % sys.executable)


def make_source(path, size, cluster):
    """A raw image with compressible data (the fill pattern), incompressible data (stored
    uncompressed by both), zeros and holes, and a tail that is not cluster-aligned."""
    helpers.make_raw(path, size, [(0, 3 * cluster + 1536), (5 * cluster, cluster // 2),
                                  (size - 3 * cluster - 512, 3 * cluster + 512)])
    with open(path, "r+b") as f:
        f.seek(8 * cluster)
        f.write(os.urandom(2 * cluster))                    # does not compress
        f.seek(11 * cluster + 4096)
        f.write(b"\x5a" * cluster)                          # compresses to almost nothing
    return path


def qemu_raw(image, tmp_path, name="qemu.raw"):
    out = tmp_path / name
    helpers.qemu_img("convert", "-f", "qcow2", "-O", "raw", image, out, check=True)
    return out.read_bytes()


def assert_qemu_accepts(image, source):
    check = helpers.qemu_check(image)
    assert check["rc"] == 0, check
    assert not check.get("corruptions"), check
    assert not check.get("leaks"), check
    assert helpers.qemu_compare(image, source), "qemu-img compare: %s differs from %s" % (image, source)
    specific = helpers.qemu_info(image, "qcow2")["format-specific"]["data"]
    assert specific["compression-type"] == "zstd", specific


def compressed_count(image):
    """How many guest clusters qemu-img sees as compressed (qemu-img check's statistics)."""
    out = helpers.qemu_img("check", "-f", "qcow2", image, check=True).stdout.decode()
    match = re.search(r"([\d.]+)% compressed clusters", out)
    return float(match.group(1)) if match else 0.0


# -- qemu-img writes, vdisk reads ----------------------------------------------------------------

@pytest.mark.parametrize("cluster", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_qemu_zstd_image_reads_byte_for_byte(tmp_path, cluster):
    size = max(24 * cluster, 2 * MiB) + 3 * 512
    src = make_source(tmp_path / "src.raw", size, cluster)
    image = tmp_path / "q.qcow2"
    helpers.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                     "compression_type=zstd,cluster_size=%d" % cluster, src, image, check=True)
    assert compressed_count(image) > 0
    out = tmp_path / "vdisk.raw"
    helpers.vdisk_cli("convert", "-f", "qcow2", "-O", "raw", image, out, check=True)
    assert out.read_bytes() == qemu_raw(image, tmp_path)


def test_qemu_io_compressed_then_overwritten_clusters_read_back(tmp_path):
    """qemu-io packs compressed clusters into shared host clusters; partial plain writes and
    zero writes over some of them make qemu decompress, copy and release them.  (QEMU refuses
    compressed writes over allocated clusters, so each compressed write has its own.)"""
    image = tmp_path / "q.qcow2"
    helpers.qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd,cluster_size=4k", image, "1M",
                     check=True)
    helpers.qemu_io("qcow2", image, "write -c -P 0x11 0 64k", "write -c -P 0x44 128k 4k",
                    "write -P 0x33 10k 3k", "write -P 0x22 62k 4k", "write -z 40k 8k")
    img = open_image(str(image), "qcow2")
    try:
        got = img.read(0, img.virtual_size)
    finally:
        close_chain(img)
    assert got == qemu_raw(image, tmp_path)


# -- vdisk writes, qemu-img reads ----------------------------------------------------------------

@pytest.mark.parametrize("cluster,workers", [(4 * KiB, "1"), (64 * KiB, "1"), (64 * KiB, "8"), (2 * MiB, "4")])
def test_vdisk_zstd_convert_passes_qemu_check(tmp_path, cluster, workers):
    size = max(24 * cluster, 2 * MiB)
    src = make_source(tmp_path / "src.raw", size, cluster)
    image = tmp_path / "v.qcow2"
    helpers.vdisk_cli("convert", "-c", "-m", workers, "-f", "raw", "-O", "qcow2", "-o",
                      "compression_type=zstd,cluster_size=%d" % cluster, src, image, check=True)
    assert_qemu_accepts(image, src)
    assert compressed_count(image) > 0


def test_parallel_and_serial_zstd_convert_write_the_same_file(tmp_path):
    src = make_source(tmp_path / "src.raw", 4 * MiB, 64 * KiB)
    outs = []
    for workers in ("1", "16"):
        out = tmp_path / ("w%s.qcow2" % workers)
        helpers.vdisk_cli("convert", "-c", "-m", workers, "-O", "qcow2", "-o", "compression_type=zstd",
                          src, out, check=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_vdisk_create_zstd_then_writes(tmp_path):
    """vdisk creates the image; vdisk and qemu-io write compressed and plain clusters into it."""
    image = tmp_path / "c.qcow2"
    helpers.vdisk_cli("create", "-f", "qcow2", "-o", "compression_type=zstd,cluster_size=16k", image, "4M",
                      check=True)
    header = helpers.qemu_info(image, "qcow2")["format-specific"]["data"]
    assert header["compression-type"] == "zstd" and header["compat"] == "1.1", header
    model = bytearray(4 * MiB)
    img = open_image(str(image), "qcow2", writable=True)
    try:
        blocks = []
        for i in range(8):                              # 128 KiB at 1 MiB, compressed by vdisk
            data = helpers.pattern(MiB + i * 16 * KiB, 16 * KiB)
            blocks.append((data, img.compress_block(data)))
            model[MiB + i * 16 * KiB:MiB + (i + 1) * 16 * KiB] = data
        assert all(payload is not None for dummy, payload in blocks)
        img.write_compressed(MiB, blocks)
        img.write(3 * MiB + 100, b"plain" * 1000)       # an ordinary write
        model[3 * MiB + 100:3 * MiB + 5100] = b"plain" * 1000
        img.flush()
    finally:
        close_chain(img)
    assert_qemu_accepts(image, _raw(tmp_path, model, "model.raw"))
    # qemu-io adds compressed clusters of its own (beside vdisk's) and partly overwrites a
    # vdisk-compressed cluster, which makes qemu decode vdisk's frame to copy the rest of it
    helpers.qemu_io("qcow2", image, "write -c -P 0x77 0 32k", "write -P 0x78 %d 1k" % (MiB + 33 * KiB))
    model[0:32 * KiB] = b"\x77" * 32 * KiB
    model[MiB + 33 * KiB:MiB + 34 * KiB] = b"\x78" * KiB
    out = tmp_path / "vdisk.raw"
    helpers.vdisk_cli("convert", "-O", "raw", image, out, check=True)
    assert out.read_bytes() == bytes(model)
    assert_qemu_accepts(image, out)


def _raw(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(bytes(content))
    return path


# -- without a zstd module -------------------------------------------------------------------------

@pytest.fixture
def no_zstd(monkeypatch):
    """This process as on a Python < 3.14 without backports.zstd."""
    for name in ("compression", "compression.zstd", "backports.zstd"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(compress, "_zstd", None)


def run_cli(capsys, *args):
    capsys.readouterr()
    rc = vdisk_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_missing_package_create_is_one_line(tmp_path, capsys, no_zstd):
    target = tmp_path / "z.qcow2"
    rc, out, err = run_cli(capsys, "create", "-f", "qcow2", "-o", "compression_type=zstd", target, "16M")
    assert (rc, out) == (1, "")
    assert err == "vdisk: create: compression_type: %s\n" % MISSING
    assert os.listdir(tmp_path) == [], "a failed create left files behind"


def test_missing_package_reading_a_zstd_cluster_is_one_line(tmp_path, capsys, no_zstd):
    src = make_source(tmp_path / "src.raw", 2 * MiB, 64 * KiB)
    image = tmp_path / "q.qcow2"
    helpers.qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, image, check=True)
    target = tmp_path / "out.raw"
    rc, out, err = run_cli(capsys, "convert", "-O", "raw", image, target)
    assert (rc, out) == (1, "")
    assert err == "vdisk: convert: %s: compression_type: %s\n" % (image, MISSING)
    assert not target.exists()
    # an image of that type whose clusters are not compressed needs no module: info works
    rc, out, err = run_cli(capsys, "info", image)
    assert rc == 0 and "compression type: zstd" in out, (rc, out, err)


def test_missing_package_compressed_convert_to_zstd_is_one_line(tmp_path, capsys, no_zstd):
    src = make_source(tmp_path / "src.raw", 2 * MiB, 64 * KiB)
    target = tmp_path / "z.qcow2"
    rc, out, err = run_cli(capsys, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, target)
    assert (rc, out) == (1, "")
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vdisk: convert: "), err
    assert MISSING in err, err
    assert "Traceback" not in err and not target.exists()


# -- every Python ---------------------------------------------------------------------------------

def other_pythons():
    """``(version, path)`` of CPython 3.9+ interpreters other than the one running the tests, one per
    minor version (pyenv's first), named python3.N: found without starting any of them."""
    found = {}
    candidates = sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3.*"))
    candidates += [shutil.which("python3.%d" % minor) for minor in range(9, 20)]
    for exe in filter(None, candidates):
        match = re.search(r"python3\.(\d+)$", exe)
        if not match or int(match.group(1)) < 9 or not os.access(exe, os.X_OK):
            continue
        minor = int(match.group(1))
        if (3, minor) != sys.version_info[:2]:
            found.setdefault(minor, exe)
    return [("3.%d" % minor, exe) for minor, exe in sorted(found.items())]


OTHER_PYTHONS = other_pythons()


def cli_under(exe, extra_path, *args):
    """The vdisk CLI run by *exe*, the source tree (tests/conftest.py's PYTHONPATH) plus *extra_path*."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    env["PYTHONNOUSERSITE"] = "1"
    return subprocess.run([exe, "-m", helpers.CLI_MODULE] + [str(a) for a in args], capture_output=True,
                          text=True, env=env, timeout=300)


def round_trip(tmp_path, run):
    """The small round trip every Python must pass; *run(args)* runs the vdisk CLI."""
    def ok(*args):
        proc = run(*args)
        assert proc.returncode == 0, "vdisk %s: %s" % (" ".join(map(str, args)), proc.stderr)
    src = make_source(tmp_path / "src.raw", 2 * MiB, 64 * KiB)
    mine = tmp_path / "vdisk.qcow2"
    ok("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, mine)
    assert_qemu_accepts(mine, src)
    theirs = tmp_path / "qemu.qcow2"
    helpers.qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, theirs, check=True)
    out = tmp_path / "back.raw"
    ok("convert", "-O", "raw", theirs, out)
    assert out.read_bytes() == qemu_raw(theirs, tmp_path)
    created = tmp_path / "created.qcow2"
    ok("create", "-f", "qcow2", "-o", "compression_type=zstd", created, "1M")
    helpers.qemu_io("qcow2", created, "write -c -P 0x42 0 64k")
    ok("convert", "-O", "raw", created, out)
    assert out.read_bytes() == b"\x42" * 64 * KiB + bytes(MiB - 64 * KiB)


def test_round_trip_on_this_python(tmp_path):
    round_trip(tmp_path, lambda *args: cli_under(sys.executable, None, *args))


@pytest.fixture(scope="session")
def backports_for(tmp_path_factory):
    """``backports_for(exe)``: a directory holding backports.zstd for that Python (pip install --target)."""
    root = tmp_path_factory.mktemp("backports-zstd")
    done = {}

    def install(exe):
        if exe not in done:
            target = root / os.path.basename(exe)
            proc = subprocess.run([exe, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                   "--no-input", "--target", str(target), "backports.zstd"],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, "%s: pip install backports.zstd failed: %s" % (exe, proc.stderr)
            done[exe] = str(target)
        return done[exe]
    return install


@pytest.mark.slow
@pytest.mark.parametrize("version,exe", OTHER_PYTHONS or [pytest.param("-", "-", marks=pytest.mark.skip(
    reason="no other CPython 3.9+ on this machine"))], ids=[v for v, dummy in OTHER_PYTHONS] or None)
def test_round_trip_on_every_python(tmp_path, backports_for, version, exe):
    has_stdlib_zstd = subprocess.run([exe, "-c", "import compression.zstd"], capture_output=True).returncode == 0
    has_backport = subprocess.run([exe, "-s", "-c", "import backports.zstd"], capture_output=True).returncode == 0
    if not (has_stdlib_zstd or has_backport):
        # first as a user would meet it: this Python without the package
        proc = cli_under(exe, None, "create", "-f", "qcow2", "-o", "compression_type=zstd", tmp_path / "x.qcow2",
                         "1M")
        assert proc.returncode == 1 and proc.stderr == "vdisk: create: compression_type: %s\n" % MISSING, (
            version, proc.returncode, proc.stderr)
    extra = None if has_stdlib_zstd else backports_for(exe)
    round_trip(tmp_path, lambda *args: cli_under(exe, extra, *args))
