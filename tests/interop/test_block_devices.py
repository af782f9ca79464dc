"""Block devices the user names on the command line (issue 17): read, and written in place, as qemu-img does.

``vdisk info -f raw /dev/loopN``, ``convert ... /dev/sdX`` and an LVM volume as a target are how images
reach disks; qemu-img opens them with its host_device driver.  vdisk allows a block device only as the
image a command names (``Policy.named_device``, set by the CLI), never as a file an image names
(backing file, VMDK extent): those stay refused as not regular files, even with ``--allow-path /dev``.
A device is written in place, every byte (it is not known to read as zeros), never created, truncated,
replaced or deleted; QEMU's image locks on it refuse a write while qemu-io holds it, and a device the
kernel holds (mounted) is refused for writing.

Each test attaches loop devices to small sparse files in ``tmp_path`` (``losetup --find --show``) and
detaches them in the fixture's finalizer; the tests skip only where loop devices cannot be attached.
"""
import hashlib
import json
import os
import shutil
import stat
import subprocess

import pytest

import helpers
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
from test_safety_locks import Holder, assert_refused_message

SIZE = 16 * MiB
GARBAGE = bytes(range(1, 256)) * 4112 + bytes(range(1, 17))      # 1 MiB without a zero byte
assert len(GARBAGE) == MiB


def _why_no_loop_devices():
    if os.geteuid() != 0:
        return "attaching loop devices needs root"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control: this kernel or container has no loop devices"
    if shutil.which("losetup") is None:
        return "losetup is not installed"
    return None


@pytest.fixture
def loop(tmp_path):
    """``loop(name, size, garbage=False)``: a loop device over a new sparse file ``tmp_path/name``
    (filled with non-zero bytes when *garbage*), detached when the test ends."""
    why = _why_no_loop_devices()
    if why:
        pytest.skip(why)
    attached = []

    def attach(name="disk.img", size=SIZE, garbage=False):
        backing = tmp_path / name
        with open(str(backing), "wb") as f:
            if garbage:
                for dummy in range(size // MiB):
                    f.write(GARBAGE)
            f.truncate(size)
        proc = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip("cannot attach a loop device: %s" % proc.stderr.strip())
        device = proc.stdout.strip()
        attached.append(device)
        return device

    yield attach
    for device in attached:
        subprocess.run(["losetup", "-d", device], capture_output=True)


def vdisk(*args):
    return helpers.vdisk_cli(*args)


def device_bytes(device, offset=0, length=None):
    with open(device, "rb") as f:
        f.seek(offset)
        return f.read(length if length is not None else SIZE - offset)


def digest(device):
    return hashlib.sha256(device_bytes(device)).hexdigest()


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def make_source(tmp_path, size=SIZE):
    """A qcow2 source of *size* with data, an unallocated range, a zero cluster and a zero 4 KiB block
    inside a data cluster (-S finds it): every zero there must be written over the device's old bytes."""
    src = str(tmp_path / "src.qcow2")
    helpers.qemu_img("create", "-q", "-f", "qcow2", src, str(size), check=True)
    helpers.qemu_io("qcow2", src, "write -P 0x11 0 1M", "write -z 64k 4k", "write -P 0x22 5M 192k",
                    "write -z 5184k 64k", "write -P 0x33 %d 64k" % (size - 64 * 1024))
    return src


# -- reading -----------------------------------------------------------------------------------
def test_info_reports_the_device_size_as_qemu_img(loop):
    device = loop(size=24 * MiB)
    expected = helpers.qemu_info(device, "raw")
    for args in (("-f", "raw"), ()):        # named by the user, a device is probed as qemu-img probes it
        proc = vdisk("info", "--output=json", *args, device)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == expected
    assert expected["virtual-size"] == 24 * MiB
    human = vdisk("info", "-f", "raw", device)
    assert "virtual size: 24 MiB (25165824 bytes)" in human.stdout and "disk size: 0 B" in human.stdout


def test_map_and_compare_on_a_device_as_qemu_img(loop, tmp_path):
    device = loop(garbage=True)
    proc = vdisk("map", "-f", "raw", "--output=json", device)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(helpers.qemu_img("map", "-f", "raw", "--output=json", device,
                                                                  check=True).stdout)
    copy = tmp_path / "copy.raw"
    copy.write_bytes(device_bytes(device))
    same = vdisk("compare", "-f", "raw", "-F", "raw", device, copy)
    assert same.returncode == 0 and same.stdout.strip() == "Images are identical.", same.stderr
    with open(str(copy), "r+b") as f:
        f.seek(3 * MiB + 512)
        f.write(b"\0" * 512)
    differ = vdisk("compare", "-f", "raw", "-F", "raw", device, copy)
    oracle = helpers.qemu_img("compare", "-f", "raw", "-F", "raw", device, copy)
    assert differ.returncode == oracle.returncode == 1
    assert differ.stdout == oracle.stdout.decode()      # "Content mismatch at offset 3146240!"
    measured = vdisk("measure", "-f", "raw", "-O", "qcow2", device)
    assert measured.stdout == helpers.qemu_img("measure", "-f", "raw", "-O", "qcow2", device).stdout.decode()


def test_convert_a_device_into_an_image_file(loop, tmp_path):
    device = loop()
    helpers.qemu_io("raw", device, "write -P 0x5a 0 1M", "write -P 0xa5 9M 64k")
    out = tmp_path / "out.qcow2"
    proc = vdisk("convert", "-f", "raw", "-O", "qcow2", device, out)
    assert proc.returncode == 0, proc.stderr
    assert helpers.qemu_compare(device, out, fa="raw", fb="qcow2", strict=False)
    assert helpers.qemu_check(out)["rc"] == 0
    assert helpers.qemu_info(out)["virtual-size"] == SIZE


# -- writing in place --------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [(), ("-S", "64k"), ("-S", "0")], ids=["default", "S64k", "S0"])
def test_convert_n_writes_every_byte_over_old_data(loop, tmp_path, extra):
    device = loop(garbage=True)
    src = make_source(tmp_path)
    proc = vdisk("convert", "-n", "-O", "raw", *extra, src, device)
    assert proc.returncode == 0, proc.stderr
    assert helpers.qemu_compare(src, device, fa="qcow2", fb="raw")
    assert device_bytes(device, 2 * MiB, MiB) == bytes(MiB)     # unallocated in the source: zeros now


def test_convert_without_n_writes_into_the_device_as_qemu_img(loop, tmp_path):
    """qemu-img "creates" a host device by checking that the source fits, then writes all of it."""
    device = loop(garbage=True)
    src = make_source(tmp_path, 8 * MiB)
    proc = vdisk("convert", "-O", "raw", src, device)
    assert proc.returncode == 0, proc.stderr
    expected = tmp_path / "expected.raw"
    helpers.qemu_img("convert", "-O", "raw", src, expected, check=True)
    assert device_bytes(device, 0, 8 * MiB) == expected.read_bytes()
    assert device_bytes(device, 8 * MiB, MiB) == GARBAGE        # as qemu-img: past the source, untouched


def test_convert_without_n_refusals_as_qemu_img(loop, tmp_path):
    device = loop(garbage=True)
    before = digest(device)
    big = tmp_path / "big.raw"
    helpers.make_raw(big, 2 * SIZE, [(0, MiB)])
    src = make_source(tmp_path, 8 * MiB)
    cases = [
        (("-f", "raw", "-O", "raw", big), "error while converting raw: Cannot grow device files"),
        (("-n", "-f", "raw", "-O", "raw", big), "output file is smaller than input file"),
        (("-O", "raw", "-o", "preallocation=full", src), "Unsupported preallocation mode 'full'"),
        (("-O", "qcow2", src), "image format qcow2 cannot be written onto a block device"),
        (("-n", "-O", "qcow2", src), "image format qcow2 cannot be written on a block device"),
    ]
    for args, message in cases:
        assert_one_line_error(vdisk("convert", *args, device), device, message)
    assert digest(device) == before
    oracle = helpers.qemu_img("convert", "-f", "raw", "-O", "raw", big, device)
    assert oracle.returncode == 1 and b"Cannot grow device files" in oracle.stderr


def test_target_is_zero_skips_zero_ranges(loop, tmp_path):
    src = make_source(tmp_path)
    zeroed = loop("zeroed.img")
    proc = vdisk("convert", "-n", "--target-is-zero", "-O", "raw", src, zeroed)
    assert proc.returncode == 0, proc.stderr
    assert helpers.qemu_compare(src, zeroed, fa="qcow2", fb="raw")
    # taken at its word: on a device that does not read as zeros, the zero ranges keep the old bytes
    dirty = loop("dirty.img", garbage=True)
    assert vdisk("convert", "-n", "--target-is-zero", "-O", "raw", src, dirty).returncode == 0
    assert device_bytes(dirty, 0, 64 * 1024) == b"\x11" * 64 * 1024
    assert device_bytes(dirty, 2 * MiB, MiB) == GARBAGE
    assert device_bytes(dirty, 5 * MiB, 192 * 1024)[:64 * 1024] == b"\x22" * 64 * 1024


def test_engine_zeroes_a_device_range_with_unaligned_ends(loop):
    device = loop(garbage=True)
    image = open_image(device, "raw", writable=True, policy=Policy(block_devices=True))
    try:
        assert image.virtual_size == SIZE and image.host.is_block_device
        image.write_zeroes(1000, 3 * MiB + 17)
        image.flush()
    finally:
        close_chain(image)
    assert device_bytes(device, 0, 1000) == GARBAGE[:1000]
    assert device_bytes(device, 1000, 3 * MiB + 17) == bytes(3 * MiB + 17)
    assert device_bytes(device, 3 * MiB + 1017, 1000) == (GARBAGE * 4)[3 * MiB + 1017:3 * MiB + 2017]


def test_resize_and_create_on_a_device(loop):
    device = loop(garbage=True)
    before = digest(device)
    same = vdisk("resize", "-f", "raw", device, str(SIZE))
    assert same.returncode == 0 and same.stdout.strip() == "Image resized.", same.stderr
    assert_one_line_error(vdisk("resize", "-f", "raw", device, "+1M"), device, "Cannot resize device files")
    assert_one_line_error(vdisk("resize", "-f", "raw", "--shrink", device, "8M"), device,
                          "Cannot resize device files")
    assert_one_line_error(vdisk("resize", "-f", "raw", device, "8M"), "Use the --shrink option")
    assert digest(device) == before


def test_create_on_a_device_as_qemu_img(loop):
    """qemu-img create -f raw on a device checks that the device holds the size and zeroes its first
    sector (no old image header is probed again); everything else keeps its bytes."""
    mine, theirs = loop("mine.img", garbage=True), loop("theirs.img", garbage=True)
    oracle = helpers.qemu_img("create", "-f", "raw", theirs, "8M")
    proc = vdisk("create", "-f", "raw", mine, "8M")
    assert oracle.returncode == proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Formatting '%s', fmt=raw size=8388608" % mine
    assert device_bytes(mine, 0, 512) == bytes(512)
    assert device_bytes(mine, 512, MiB - 512) == GARBAGE[512:]
    assert digest(mine) == digest(theirs)
    assert vdisk("create", "-f", "raw", mine, str(SIZE)).returncode == 0      # the whole device
    before = digest(mine)
    cases = [
        (("-f", "raw", mine, str(SIZE + 512)), "Cannot grow device files", "Cannot grow device files"),
        (("-f", "raw", "-o", "preallocation=full", mine, "8M"), "Unsupported preallocation mode 'full'",
         "Unsupported preallocation mode 'full'"),
        (("-f", "raw", mine), "Image creation needs a size parameter", "Image creation needs a size parameter"),
        (("-f", "qcow2", mine, "8M"), "image format qcow2 cannot be written onto a block device", None),
    ]
    for args, message, qemu_message in cases:
        assert_one_line_error(vdisk("create", *args), mine, message)
        if qemu_message:
            result = helpers.qemu_img("create", *[theirs if a == mine else a for a in args])
            assert result.returncode == 1 and qemu_message.encode() in result.stderr
    assert digest(mine) == before


# -- what stays refused ------------------------------------------------------------------------
def test_a_device_held_by_qemu_io_is_refused_for_writing(loop, tmp_path):
    device = loop(garbage=True)
    before = digest(device)
    src = make_source(tmp_path)
    with Holder("raw", device):
        for args in (("-n", "-O", "raw", src, device), ("-O", "raw", src, device)):
            proc = vdisk("convert", *args)
            assert proc.returncode == 1
            assert_refused_message(proc.stderr, device)
        assert vdisk("info", "-U", "-f", "raw", device).returncode == 0     # -U reads what a VM holds
    assert digest(device) == before


def test_a_device_the_kernel_holds_is_refused_for_writing(loop, tmp_path):
    """Opened O_EXCL for writing: a mounted device (here: claimed by the test) is refused; qemu-img would write."""
    device = loop(garbage=True)
    before = digest(device)
    claim = os.open(device, os.O_RDONLY | os.O_EXCL)
    try:
        proc = vdisk("convert", "-n", "-O", "raw", make_source(tmp_path), device)
        assert_one_line_error(proc, device, "block device is in use by the kernel")
        assert vdisk("info", "-f", "raw", device).returncode == 0
    finally:
        os.close(claim)
    assert digest(device) == before


def _node_beside(tmp_path, device, name="node"):
    """A device node for *device* inside the image's directory (inside the allowed tree)."""
    node = tmp_path / name
    os.mknod(str(node), stat.S_IFBLK | 0o600, os.stat(device).st_rdev)
    return node


def test_a_backing_file_that_is_a_device_stays_refused(loop, tmp_path):
    device = loop()
    _node_beside(tmp_path, device)
    for name in (device, "node"):
        overlay = tmp_path / "overlay.qcow2"
        helpers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", overlay, str(SIZE),
                         check=True)
        for cmd in (("info", "--allow-path", "/dev", overlay),
                    ("convert", "--allow-path", "/dev", "-O", "raw", overlay, tmp_path / "out.raw")):
            assert_one_line_error(vdisk(*cmd), "backing file %r is not a regular file; refused" % name)
        overlay.unlink()
    assert not (tmp_path / "out.raw").exists()
    # create -b names a file the new image names: no device either (qemu-img would take it)
    assert_one_line_error(vdisk("create", "-f", "qcow2", "-b", device, "-F", "raw", tmp_path / "new.qcow2"),
                          "is a block device; vdisk opens a block device only as the image named")
    assert not (tmp_path / "new.qcow2").exists()


def test_a_vmdk_extent_that_is_a_device_stays_refused(loop, tmp_path):
    device = loop()
    _node_beside(tmp_path, device)
    for name in (device, "node"):
        desc = tmp_path / "d.vmdk"
        desc.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                        'RW %d FLAT "%s" 0\n' % (SIZE // 512, name))
        assert_one_line_error(vdisk("info", "--allow-path", "/dev", "-f", "vmdk", desc),
                              "extent %r is not a regular file; refused" % name)


def test_a_qcow2_image_on_a_device_is_read_but_not_written(loop, tmp_path):
    device = loop()
    src = make_source(tmp_path, 8 * MiB)
    helpers.qemu_img("convert", "-O", "qcow2", src, device, check=True)       # qemu-img writes qcow2 onto it
    info = vdisk("info", "--output=json", device)
    assert info.returncode == 0 and json.loads(info.stdout)["format"] == "qcow2", info.stderr
    out = tmp_path / "out.raw"
    assert vdisk("convert", "-O", "raw", device, out).returncode == 0
    assert helpers.qemu_compare(src, out)
    before = digest(device)
    assert_one_line_error(vdisk("resize", device, "+1M"), "image format qcow2 cannot be written on a block device")
    # -n writes into the image that is there: declared raw, found qcow2, refused as for a file
    assert_one_line_error(vdisk("convert", "-n", "-O", "raw", src, device),
                          "declared format raw, but the file's content is a qcow2 image")
    assert digest(device) == before
    # without -n the device is "created" (qemu-img's host_device): its old content does not matter
    assert vdisk("convert", "-O", "raw", src, device).returncode == 0
    expected = tmp_path / "expected.raw"
    helpers.qemu_img("convert", "-O", "raw", src, expected, check=True)
    assert device_bytes(device, 0, 8 * MiB) == expected.read_bytes()


def test_only_the_command_line_may_name_a_device(loop):
    """The engine's default policy (the Ansible modules, manifests) opens no device."""
    device = loop()
    with pytest.raises(ImageError, match="vdisk opens a block device only as the image named on its command line"):
        open_image(device, "raw", policy=Policy())
