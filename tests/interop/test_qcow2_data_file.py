"""qcow2 images with an external data file (``-o data_file=FILE[,data_file_raw=on]``), both ways.

qemu-img/qemu-io make and write the image, vdisk reads it (info, map, check, convert); vdisk
makes and writes it (create, ``convert -n``, the engine's writes, ``convert -o data_file=``),
qemu-img judges it (check, compare, info, map).  Every command runs in the images' directory:
qemu-img 7.2 resolves a relative data-file name against its working directory, vdisk against
the image's directory, and the two agree there.  Then the policy: a data file outside the
image's directory, a symlink leading out, a swapped symlink and a missing file.
"""
import json
import os
import subprocess
import sys

import pytest

import qcow2_util as u
from qcow2_util import KiB, MiB, Policy, close_chain, errors, open_image

pytestmark = pytest.mark.skipif(not (u.QEMU_IMG and u.QEMU_IO), reason="needs qemu-img and qemu-io")

CLI = [sys.executable, "-m", u.PKG]
SIZE = 4 * MiB
SPECIFIC_KEYS = ("compat", "data-file", "data-file-raw", "refcount-bits", "extended-l2", "corrupt")


def vdisk(cwd, *args):
    """The vdisk CLI in *cwd*, as text."""
    return subprocess.run(CLI + [str(a) for a in args], cwd=str(cwd), capture_output=True, text=True,
                          env=dict(os.environ))


def qemu(cwd, *args, check=True):
    proc = subprocess.run([u.QEMU_IMG] + [str(a) for a in args], cwd=str(cwd), capture_output=True, text=True)
    assert not check or proc.returncode == 0, "qemu-img %s: %s%s" % (args, proc.stdout, proc.stderr)
    return proc


def qemu_io(cwd, name, *cmds):
    args = [u.QEMU_IO, "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    proc = subprocess.run(args + [name], cwd=str(cwd), capture_output=True, text=True)
    assert proc.returncode == 0 and "error" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


def assert_check_clean(cwd, name):
    result = check_json(cwd, "qemu", name)
    assert result["rc"] == 0, result
    assert not result.get("corruptions"), result
    assert not result.get("leaks"), result


def specific(info):
    data = info["format-specific"]["data"]
    return {k: data.get(k) for k in SPECIFIC_KEYS}


def check_json(cwd, tool, name):
    if tool == "qemu":
        proc = qemu(cwd, "check", "--output=json", name, check=False)
    else:
        proc = vdisk(cwd, "check", "--output=json", name)
    result = json.loads(proc.stdout)
    result["rc"] = proc.returncode
    return result


QEMU_MADE = [
    pytest.param({}, id="data_file"),
    pytest.param({"data_file_raw": "on"}, id="data_file_raw"),
    pytest.param({"extended_l2": "on"}, id="extended_l2"),
    pytest.param({"cluster_size": "4k", "preallocation": "metadata"}, id="4k-metadata"),
]


@pytest.mark.parametrize("options", QEMU_MADE)
def test_qemu_made_image_read_by_vdisk(tmp_path, options):
    opts = ",".join(["data_file=d.raw"] + ["%s=%s" % kv for kv in options.items()])
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", SIZE)
    # cluster 0 (host offset 0 in the data file), partial clusters, a zero write, a discard
    qemu_io(tmp_path, "a.qcow2", "write -P 0x11 0 64k", "write -P 0x22 1000 3000", "write -P 0x33 1M 100k",
            "write -z 2M 64k", "write -P 0x44 3M 128k", "discard 3M 64k", "write -P 0x55 4194303 1")
    v_info = json.loads(vdisk(tmp_path, "info", "--output=json", "a.qcow2").stdout)
    q_info = json.loads(qemu(tmp_path, "info", "--output=json", "a.qcow2").stdout)
    assert specific(v_info) == specific(q_info)
    assert v_info["format-specific"]["data"]["data-file"] == "d.raw"
    for key in ("virtual-size", "cluster-size", "dirty-flag"):
        assert v_info[key] == q_info[key]
    # content, map and check agree with qemu-img's
    assert vdisk(tmp_path, "convert", "-O", "raw", "a.qcow2", "v.raw").returncode == 0
    qemu(tmp_path, "convert", "-O", "raw", "a.qcow2", "q.raw")
    assert (tmp_path / "v.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
    v_map = vdisk(tmp_path, "map", "--output=json", "a.qcow2")
    assert v_map.stdout.strip() == qemu(tmp_path, "map", "--output=json", "a.qcow2").stdout.strip()
    human = vdisk(tmp_path, "map", "a.qcow2").stdout
    assert human == qemu(tmp_path, "map", "a.qcow2").stdout
    assert "d.raw" in human
    v_check, q_check = check_json(tmp_path, "vdisk", "a.qcow2"), check_json(tmp_path, "qemu", "a.qcow2")
    assert v_check == q_check and v_check["rc"] == 0


def pattern(offset, length):
    """Guest bytes ``[offset, offset + length)`` of a fill pattern: each 512-byte sector its own non-zero byte."""
    return b"".join(bytes([(s // 512) % 251 + 1]) * (min(end, (s // 512 + 1) * 512) - s)
                    for s, end in _sectors(offset, offset + length))


def _sectors(start, end):
    pos = start
    while pos < end:
        yield pos, end
        pos = (pos // 512 + 1) * 512


def engine_writes(path, model):
    """Writes, zero writes and discards through the engine, mirrored in *model*."""
    ops = [("write", 0, 70 * KiB), ("write", 1000, 3000), ("write", MiB - 5, 2 * 64 * KiB + 9),
           ("zero", 2 * MiB, 192 * KiB, False), ("write", 2 * MiB + 64 * KiB, 100),
           ("zero", 3 * MiB + 17, 200 * KiB, True), ("discard", 128 * KiB, 64 * KiB),
           ("write", SIZE - 1, 1)]
    img = open_image(str(path), "qcow2", writable=True)
    try:
        for op, offset, length, *unmap in ops:
            if op == "write":
                data = pattern(offset, length)
                img.write(offset, data)
                model[offset:offset + length] = data
            elif op == "zero":
                img.write_zeroes(offset, length, unmap[0])
                model[offset:offset + length] = bytes(length)
            else:
                img.discard(offset, length)
                start, end = -(-offset // 65536) * 65536, (offset + length) // 65536 * 65536
                model[start:end] = bytes(end - start)
        img.flush()
    finally:
        close_chain(img)


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_vdisk_made_image_judged_by_qemu(tmp_path, raw):
    opts = "data_file=d.raw" + (",data_file_raw=on" if raw else "")
    assert vdisk(tmp_path, "create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", SIZE).returncode == 0
    assert (tmp_path / "d.raw").stat().st_size == SIZE
    model = bytearray(SIZE)
    engine_writes(tmp_path / "a.qcow2", model)
    (tmp_path / "model.raw").write_bytes(bytes(model))
    q_check = check_json(tmp_path, "qemu", "a.qcow2")
    assert q_check["rc"] == 0
    assert not q_check.get("corruptions")
    assert not q_check.get("leaks")
    assert check_json(tmp_path, "vdisk", "a.qcow2") == q_check
    qemu(tmp_path, "compare", "-f", "qcow2", "-F", "raw", "a.qcow2", "model.raw")
    data = json.loads(qemu(tmp_path, "info", "--output=json", "a.qcow2").stdout)["format-specific"]["data"]
    assert data["data-file"] == "d.raw" and data["data-file-raw"] is raw
    if raw:     # the data file stays a valid raw image of the disk
        assert (tmp_path / "d.raw").read_bytes() == bytes(model)
    # the image file holds metadata only: no guest cluster was allocated in it
    assert os.path.getsize(tmp_path / "a.qcow2") <= 6 * 65536
    assert vdisk(tmp_path, "map", "--output=json", "a.qcow2").stdout.strip() == \
        qemu(tmp_path, "map", "--output=json", "a.qcow2").stdout.strip()


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_vdisk_convert_into_existing(tmp_path, raw):
    source = bytearray(SIZE)
    source[5000:300000] = pattern(5000, 295000)
    source[2 * MiB:2 * MiB + 4096] = b"\x01" * 4096
    (tmp_path / "src.raw").write_bytes(bytes(source))
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw" + (",data_file_raw=on" if raw else ""),
         "a.qcow2", SIZE)
    assert vdisk(tmp_path, "convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", "a.qcow2").returncode == 0
    assert_check_clean(tmp_path, "a.qcow2")
    qemu(tmp_path, "compare", "-f", "raw", "-F", "qcow2", "src.raw", "a.qcow2")
    if raw:
        assert (tmp_path / "d.raw").read_bytes() == bytes(source)


def test_vdisk_convert_to_new_data_file(tmp_path):
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "src.qcow2", SIZE)
    qemu_io(tmp_path, "src.qcow2", "write -P 0x61 0 100k", "write -P 0x62 3M 64k")
    proc = vdisk(tmp_path, "convert", "-O", "qcow2", "-o", "data_file=out.raw", "src.qcow2", "out.qcow2")
    assert proc.returncode == 0, proc.stderr
    assert_check_clean(tmp_path, "out.qcow2")
    qemu(tmp_path, "compare", "src.qcow2", "out.qcow2")
    assert json.loads(qemu(tmp_path, "info", "--output=json", "out.qcow2").stdout)[
        "format-specific"]["data"]["data-file"] == "out.raw"
    assert vdisk(tmp_path, "map", "--output=json", "out.qcow2").stdout.strip() == \
        qemu(tmp_path, "map", "--output=json", "out.qcow2").stdout.strip()
    # and back: a data-file image as a source
    assert vdisk(tmp_path, "convert", "-O", "qcow2", "out.qcow2", "plain.qcow2").returncode == 0
    qemu(tmp_path, "compare", "src.qcow2", "plain.qcow2")


def test_create_options_refused_as_qemu_refuses(tmp_path):
    cases = [("data_file_raw=on", "data-file-raw requires data-file"),
             ("data_file=d.raw,compat=0.10", "External data files are only supported with compatibility level 1.1"),
             ("data_file=d.raw,data_file_raw=on,backing_file=b.qcow2,backing_fmt=qcow2",
              "Backing file and data-file-raw cannot be used at the same time")]
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "b.qcow2", SIZE)
    for opts, message in cases:
        proc = vdisk(tmp_path, "create", "-q", "-f", "qcow2", "-u", "-o", opts, "x.qcow2", SIZE)
        assert proc.returncode == 1, proc.stderr
        assert message in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert qemu(tmp_path, "create", "-q", "-f", "qcow2", "-u", "-o", opts, "y.qcow2", SIZE,
                    check=False).returncode == 1
    assert not (tmp_path / "x.qcow2").exists()


def test_compression_and_snapshots_refused(tmp_path):
    (tmp_path / "src.raw").write_bytes(pattern(0, 256 * KiB))
    proc = vdisk(tmp_path, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "data_file=c.raw", "src.raw", "c.qcow2")
    assert proc.returncode == 1
    assert "Operation not supported" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "c.qcow2").exists()
    assert qemu(tmp_path, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "data_file=q.raw", "src.raw",
                "q.qcow2", check=False).returncode == 1
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", SIZE)
    before = (tmp_path / "a.qcow2").read_bytes()
    proc = vdisk(tmp_path, "snapshot", "-c", "s1", "a.qcow2")
    assert proc.returncode == 1 and "external data file" in proc.stderr
    assert qemu(tmp_path, "snapshot", "-c", "s1", "a.qcow2", check=False).returncode == 1
    assert (tmp_path / "a.qcow2").read_bytes() == before


def test_amend_data_file(tmp_path):
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "a.qcow2", SIZE)
    qemu_io(tmp_path, "a.qcow2", "write -P 0x71 64k 64k")
    os.link(tmp_path / "d.raw", tmp_path / "e.raw")
    assert vdisk(tmp_path, "amend", "-o", "data_file=e.raw,data_file_raw=off", "a.qcow2").returncode == 0
    data = json.loads(qemu(tmp_path, "info", "--output=json", "a.qcow2").stdout)["format-specific"]["data"]
    assert (data["data-file"], data["data-file-raw"]) == ("e.raw", False)
    assert_check_clean(tmp_path, "a.qcow2")
    proc = vdisk(tmp_path, "amend", "-o", "data_file_raw=on", "a.qcow2")
    assert proc.returncode == 1 and "data-file-raw cannot be set on existing images" in proc.stderr
    proc = vdisk(tmp_path, "amend", "-o", "compat=0.10", "a.qcow2")
    assert proc.returncode == 1 and "Cannot downgrade an image with a data file" in proc.stderr
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "p.qcow2", SIZE)
    proc = vdisk(tmp_path, "amend", "-o", "data_file=x.raw", "p.qcow2")
    assert proc.returncode == 1 and "data-file can only be set for images that use an external data file" \
        in proc.stderr


def test_resize_keeps_raw_data_file(tmp_path):
    assert vdisk(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "a.qcow2",
                 MiB).returncode == 0
    qemu_io(tmp_path, "a.qcow2", "write -P 0x21 0 1M")
    assert vdisk(tmp_path, "resize", "a.qcow2", "3M").returncode == 0
    assert (tmp_path / "d.raw").stat().st_size == 3 * MiB
    assert_check_clean(tmp_path, "a.qcow2")
    assert vdisk(tmp_path, "compare", "-f", "qcow2", "-F", "raw", "a.qcow2", "d.raw").returncode == 0
    assert vdisk(tmp_path, "resize", "--shrink", "a.qcow2", "512K").returncode == 0
    assert (tmp_path / "d.raw").stat().st_size == 512 * KiB
    assert_check_clean(tmp_path, "a.qcow2")


# -- the policy -------------------------------------------------------------------------------------------
def test_data_file_outside_the_image_directory(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "elsewhere").mkdir()
    outside = tmp_path / "elsewhere" / "d.raw"
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=%s" % outside, "img/a.qcow2", SIZE)
    qemu_io(tmp_path, "img/a.qcow2", "write -P 0x31 0 64k")
    for command in (["map"], ["convert", "-O", "raw"], ["check"]):
        args = command + ["img/a.qcow2"] + (["out.raw"] if command[0] == "convert" else [])
        proc = vdisk(tmp_path, *args)
        assert proc.returncode == 1, proc.stderr
        assert "data file" in proc.stderr, proc.stderr
        assert "--allow-path" in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    proc = vdisk(tmp_path, "convert", "--allow-path", tmp_path / "elsewhere", "-O", "raw", "img/a.qcow2", "out.raw")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.raw").read_bytes()[:65536] == b"\x31" * 65536


def test_symlink_leading_out_and_special_files_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "s.raw").write_bytes(b"S" * SIZE)
    d = tmp_path / "img"
    d.mkdir()
    qemu(d, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "a.qcow2", SIZE)
    os.unlink(d / "d.raw")
    os.symlink(secret / "s.raw", d / "d.raw")
    proc = vdisk(d, "convert", "-O", "raw", "a.qcow2", "out.raw")
    assert proc.returncode == 1 and "outside the allowed directories" in proc.stderr
    assert not (d / "out.raw").exists()
    os.unlink(d / "d.raw")
    os.mkfifo(d / "d.raw")
    proc = vdisk(d, "map", "a.qcow2")
    assert proc.returncode == 1 and "not a regular file" in proc.stderr
    os.unlink(d / "d.raw")
    os.symlink("/dev/zero", d / "d.raw")
    proc = vdisk(d, "map", "--allow-path", "/dev", "a.qcow2")
    assert proc.returncode == 1 and "not a regular file" in proc.stderr


def test_swapped_symlink_refused_at_open(tmp_path):
    """The data file is checked when the image is opened and read later: a file swapped in between
    (here by a symlink put in its place) is refused, never read."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"S" * SIZE)
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "a.qcow2", SIZE)
    img = open_image(str(tmp_path / "a.qcow2"), "qcow2", policy=Policy())
    try:
        os.unlink(tmp_path / "d.raw")
        os.symlink(secret, tmp_path / "d.raw")
        with pytest.raises(errors.PolicyError):
            img.read(0, 4096)
    finally:
        close_chain(img)


def test_missing_data_file(tmp_path):
    qemu(tmp_path, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", SIZE)
    os.unlink(tmp_path / "d.raw")
    for command in (["map"], ["check"], ["convert", "-O", "raw"]):
        args = command + ["a.qcow2"] + (["out.raw"] if command[0] == "convert" else [])
        proc = vdisk(tmp_path, *args)
        assert proc.returncode == 1, proc.stderr
        assert "Could not open 'd.raw': No such file or directory" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
        assert qemu(tmp_path, *args, check=False).returncode == 1
    # info shows the image without opening its data file, as qemu-img since CVE-2024-4467
    proc = vdisk(tmp_path, "info", "--output=json", "a.qcow2")
    assert proc.returncode == 0 and json.loads(proc.stdout)["format-specific"]["data"]["data-file"] == "d.raw"
    assert qemu(tmp_path, "info", "a.qcow2", check=False).returncode == 0
