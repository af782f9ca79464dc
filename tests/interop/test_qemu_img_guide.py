"""The qemu-img guide our users bring (issue 10): every command works with ``vdisk`` in its place.

The block runs in one fresh folder, in the guide's order, with sizes scaled down (20G -> 64M,
+5G -> +16M).  After every step qemu-img looks at every image: ``check``, ``info --output=json``
and, where the guest's view is known, ``compare``.
"""
import json
import os
import subprocess
import sys

import pytest

MiB = 1 << 20
VDISK = [sys.executable, "-m", "ansible_collections.vdisk.images.plugins.module_utils.vdisk"]


def vdisk(cwd, *args):
    return subprocess.run(VDISK + list(args), capture_output=True, text=True, cwd=cwd)


def qemu(cwd, *args, check=True):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, check=check)


def qemu_info(cwd, name):
    return json.loads(qemu(cwd, "qemu-img", "info", "--output=json", name).stdout)


def assert_healthy(cwd, name, fmt="qcow2"):
    """qemu-img's check passes (raw has none) and its info parses; returns the info."""
    if fmt != "raw":
        r = qemu(cwd, "qemu-img", "check", "-f", fmt, name, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    return qemu_info(cwd, name)


def guest(cwd, name, fmt, length):
    """The guest's bytes as qemu-img reads them (through backing files)."""
    out = os.path.join(str(cwd), ".guest.raw")
    qemu(cwd, "qemu-img", "convert", "-f", fmt, "-O", "raw", name, out)
    with open(out, "rb") as f:
        data = f.read(length)
    os.unlink(out)
    return data


def allocated(cwd, name):
    return os.stat(os.path.join(str(cwd), name)).st_blocks * 512


@pytest.fixture()
def folder(tmp_path):
    """A fresh folder with a small base.img and centos.raw made with qemu-img and qemu-io."""
    qemu(tmp_path, "qemu-img", "create", "-f", "raw", "base.img", "64M")
    qemu(tmp_path, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x5b 63M 1M", "base.img")
    qemu(tmp_path, "qemu-img", "create", "-f", "raw", "centos.raw", "48M")
    qemu(tmp_path, "qemu-io", "-f", "raw", "-c", "write -P 0x21 0 2M", "-c", "write -P 0x22 20M 4M",
         "-c", "write -P 0x23 50331136 512", "centos.raw")
    return tmp_path


def test_the_guide_block(folder):
    d = folder
    base_before = guest(d, "base.img", "raw", 64 * MiB)

    # 1. create -f qcow2 -o preallocation=falloc,backing_file=base.img disk.qcow2 20G
    #    qemu-img 7.2 refuses this twice; vdisk does what the user meant and says so in one line
    refused = qemu(d, "qemu-img", "create", "-f", "qcow2", "-o", "preallocation=falloc,backing_file=base.img",
                   "refused.qcow2", "64M", check=False)
    assert refused.returncode == 1 and "backing format" in refused.stderr
    r = vdisk(d, "create", "-f", "qcow2", "-o", "preallocation=falloc,backing_file=base.img", "disk.qcow2", "64M")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Formatting 'disk.qcow2', fmt=qcow2 backing_file=base.img backing_fmt=raw")
    notes = r.stderr.splitlines()
    assert len(notes) == 1, r.stderr
    assert "detected as raw" in notes[0]
    assert "reserved" in notes[0]
    assert "backing file stays visible" in notes[0]
    info = assert_healthy(d, "disk.qcow2")
    assert info["backing-filename"] == "base.img"
    assert info["backing-filename-format"] == "raw"       # recorded: never probed again
    assert info["virtual-size"] == 64 * MiB
    assert info["actual-size"] >= 64 * MiB                  # the host space is held for the overlay
    assert qemu(d, "qemu-img", "compare", "disk.qcow2", "base.img", check=False).returncode == 0
    assert "Image end offset" in qemu(d, "qemu-img", "check", "disk.qcow2").stdout

    # 2. convert -f raw -O qcow2 -c centos.raw centos.qcow2
    r = vdisk(d, "convert", "-f", "raw", "-O", "qcow2", "-c", "centos.raw", "centos.qcow2")
    assert r.returncode == 0
    assert r.stdout == ""
    assert r.stderr == ""
    assert assert_healthy(d, "centos.qcow2")["format"] == "qcow2"
    assert qemu(d, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", "centos.raw", "centos.qcow2").returncode == 0
    compressed_size = allocated(d, "centos.qcow2")
    assert compressed_size < 1 * MiB                       # patterns compress well

    # 3. convert -f raw -O qcow2 -p centos.raw centos.qcow2 (replaces it, uncompressed, with progress)
    r = vdisk(d, "convert", "-f", "raw", "-O", "qcow2", "-p", "centos.raw", "centos.qcow2")
    assert r.returncode == 0, r.stderr
    assert "(100.00/100%)" in r.stdout
    assert_healthy(d, "centos.qcow2")
    assert qemu(d, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", "centos.raw", "centos.qcow2").returncode == 0
    assert allocated(d, "centos.qcow2") > 6 * MiB             # 6 MiB + 512 of data, stored plainly now

    # 4. info disk.qcow2: the guide's shape
    r = vdisk(d, "info", "disk.qcow2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "image: disk.qcow2"
    assert lines[1] == "file format: qcow2"
    assert lines[2] == "virtual size: 64 MiB (67108864 bytes)"
    assert lines[3].startswith("disk size: ")
    assert "cluster_size: 65536" in lines
    assert "backing file: base.img" in lines
    assert "backing file format: raw" in lines
    assert "Format specific information:" in lines
    assert r.stdout == qemu(d, "qemu-img", "info", "disk.qcow2").stdout

    # 5, 6. check disk.qcow2; check -f qcow2 disk.qcow2
    for args in (("check", "disk.qcow2"), ("check", "-f", "qcow2", "disk.qcow2")):
        r = vdisk(d, *args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines()[0] == "No errors were found on the image."
        assert r.stdout == qemu(d, "qemu-img", *args).stdout

    # the guest writes something, so that snapshot, apply and commit have content to move
    qemu(d, "qemu-io", "-c", "write -P 0x31 2M 1M", "disk.qcow2")
    expected = bytearray(base_before)
    expected[2 * MiB:3 * MiB] = b"\x31" * MiB

    # 7. resize disk.qcow2 +5G
    r = vdisk(d, "resize", "disk.qcow2", "+16M")
    assert r.returncode == 0 and r.stdout.strip() == "Image resized.", r.stdout + r.stderr
    assert assert_healthy(d, "disk.qcow2")["virtual-size"] == 80 * MiB
    expected += bytes(16 * MiB)                              # the new end reads as zeros
    assert guest(d, "disk.qcow2", "qcow2", 80 * MiB) == bytes(expected)

    # 8. snapshot -c backup1
    r = vdisk(d, "snapshot", "-c", "backup1", "disk.qcow2")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    info = assert_healthy(d, "disk.qcow2")
    assert [s["name"] for s in info.get("snapshots", [])] == ["backup1"]

    # 9. snapshot -l: qemu-img's table
    r = vdisk(d, "snapshot", "-l", "disk.qcow2")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0] == "Snapshot list:"
    assert "backup1" in r.stdout.splitlines()[2]
    theirs = qemu(d, "qemu-img", "snapshot", "-l", "disk.qcow2").stdout
    assert r.stdout.splitlines()[:2] == theirs.splitlines()[:2]

    # the guest changes its disk after the snapshot ...
    qemu(d, "qemu-io", "-c", "write -P 0x41 0 512k", "disk.qcow2")
    assert guest(d, "disk.qcow2", "qcow2", 512 * 1024) == b"\x41" * 512 * 1024

    # 10. snapshot -a backup1: ... and goes back to it
    r = vdisk(d, "snapshot", "-a", "backup1", "disk.qcow2")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert_healthy(d, "disk.qcow2")
    assert guest(d, "disk.qcow2", "qcow2", 80 * MiB) == bytes(expected)

    # 11. snapshot -d backup1
    r = vdisk(d, "snapshot", "-d", "backup1", "disk.qcow2")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert "snapshots" not in assert_healthy(d, "disk.qcow2")
    assert guest(d, "disk.qcow2", "qcow2", 80 * MiB) == bytes(expected)

    # 12. commit disk.qcow2: the overlay's data goes into base.img
    r = vdisk(d, "commit", "disk.qcow2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Image committed."
    assert_healthy(d, "disk.qcow2")
    base_info = assert_healthy(d, "base.img", fmt="raw")
    assert base_info["virtual-size"] == 80 * MiB              # grown to the overlay's size, as qemu-img does
    assert guest(d, "base.img", "raw", 80 * MiB) == bytes(expected)
    assert qemu(d, "qemu-img", "compare", "-F", "raw", "disk.qcow2", "base.img").returncode == 0


@pytest.mark.parametrize("prealloc, sparse", [(None, True), ("off", True), ("metadata", True),
                                              ("falloc", False), ("full", False)])
def test_sparse_files_are_sparse(tmp_path, prealloc, sparse):
    args = ["create", "-f", "qcow2"] + (["-o", "preallocation=" + prealloc] if prealloc else []) + ["d.qcow2", "64M"]
    r = vdisk(tmp_path, *args)
    assert r.returncode == 0, r.stderr
    assert_healthy(tmp_path, "d.qcow2")
    used = allocated(tmp_path, "d.qcow2")
    if sparse:
        assert used < 64 * MiB // 50, used                    # a small fraction of the virtual size
    else:
        assert used >= 64 * MiB, used
    assert used // (1 << 16) == qemu_info(tmp_path, "d.qcow2")["actual-size"] // (1 << 16)


def test_ambiguous_backing_format_is_refused(tmp_path, monkeypatch):
    """A backing file whose format two drivers claim equally is not guessed at."""
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops import create as create_mod
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
    qemu(tmp_path, "qemu-img", "create", "-f", "raw", "base.img", "1M")
    monkeypatch.setattr(create_mod, "probe_scores", lambda header, name: [(100, "vpc"), (100, "vdi")])
    with pytest.raises(ImageError) as err:
        create_mod.create(str(tmp_path / "o.qcow2"), "qcow2", None, {"backing_file": "base.img"})
    assert "could be vpc or vdi; name its format with -F" in str(err.value)
    assert not (tmp_path / "o.qcow2").exists()


def test_backing_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(str(tmp_path / "base.img"))
    r = subprocess.run(VDISK + ["create", "-f", "qcow2", "-b", "base.img", "o.qcow2", "1M"], capture_output=True,
                       text=True, cwd=str(tmp_path), timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().endswith("base.img: not a regular file") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "o.qcow2").exists()
