"""The path policy (driver.Policy) and backing-chain resolution (ops/chain.open_image).

Chains are built with qemu-img (``create -f qcow2 -b ... -F qcow2``, ``rebase -u``), then opened
through vdisk: loops, the depth cap, names outside the allowed directories, symlink escapes.
"""
import os

import pytest

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError, PolicyError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import (
    chain_of, close_chain, open_image)


def qcow2(path, backing=None, size="1M"):
    args = ["create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    helpers.qemu_img(*(args + [path] + ([] if backing else [size])), check=True)
    return str(path)


def rebase_unsafe(path, backing):
    helpers.qemu_img("rebase", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2", path, check=True)


def one_line(exc):
    assert str(exc) and "\n" not in str(exc), repr(str(exc))


# -- Policy.resolve_reference --------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    img = tmp_path / "vm" / "disk.qcow2"
    img.parent.mkdir()
    return str(img)


@pytest.mark.parametrize("name", [
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"/etc/passwd"}}',
    "nbd:localhost:10809", "nbd+unix:///export?socket=/tmp/s", "http://example.invalid/x.qcow2",
    "/etc/passwd", "../escape.qcow2", "sub/../../escape.qcow2", "", "a\0b"])
def test_refused_names(image, name):
    with pytest.raises(PolicyError) as info:
        Policy().with_root(image).resolve_reference(name, image)
    one_line(info.value)


def test_inside_the_tree_is_allowed(image):
    policy = Policy().with_root(image)
    base = os.path.dirname(image)
    assert policy.resolve_reference("base.qcow2", image) == os.path.join(base, "base.qcow2")
    assert policy.resolve_reference("deep/er/base.qcow2", image) == os.path.join(base, "deep/er/base.qcow2")
    assert policy.resolve_reference(os.path.join(base, "abs.qcow2"), image) == os.path.join(base, "abs.qcow2")
    assert policy.resolve_reference("./x/../base.qcow2", image) == os.path.join(base, "base.qcow2")


def test_allowed_dir_widens_the_policy(tmp_path, image):
    shared = tmp_path / "golden"
    shared.mkdir()
    name = str(shared / "base.qcow2")
    with pytest.raises(PolicyError, match="allow"):
        Policy().with_root(image).resolve_reference(name, image)
    wide = Policy(allowed_dirs=(str(shared),)).with_root(image)
    assert wide.resolve_reference(name, image) == name
    assert wide.resolve_reference("../golden/base.qcow2", image) == name
    # a sibling whose name merely starts with the allowed directory's name is not inside it
    (tmp_path / "golden2").mkdir()
    with pytest.raises(PolicyError):
        wide.resolve_reference(str(tmp_path / "golden2" / "base.qcow2"), image)


def test_symlink_escape_is_refused(tmp_path, image):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "base.qcow2").write_bytes(b"")
    os.symlink(str(outside), os.path.join(os.path.dirname(image), "link-dir"))
    os.symlink(str(outside / "base.qcow2"), os.path.join(os.path.dirname(image), "link.qcow2"))
    policy = Policy().with_root(image)
    for name in ("link-dir/base.qcow2", "link.qcow2"):
        with pytest.raises(PolicyError):
            policy.resolve_reference(name, image)


def test_non_regular_files_are_refused(image):
    vm = os.path.dirname(image)
    os.mkdir(os.path.join(vm, "adir"))
    os.mkfifo(os.path.join(vm, "fifo"))
    policy = Policy().with_root(image)
    for name in ("adir", "fifo"):
        with pytest.raises(PolicyError, match="not a regular file"):
            policy.resolve_reference(name, image)


# -- open_image: chains (qcow2 files made by qemu-img) -------------------------------------
def test_chain_of_three_opens_read_only_backings(tmp_path):
    base = qcow2(tmp_path / "base.qcow2")
    helpers.qemu_io("qcow2", base, "write -P 7 0 64k")
    mid = qcow2(tmp_path / "mid.qcow2", "base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", "mid.qcow2")
    img = open_image(top, "qcow2", writable=True)
    try:
        layers = chain_of(img)
        assert [os.path.basename(i.path) for i in layers] == ["top.qcow2", "mid.qcow2", "base.qcow2"]
        assert [i.writable for i in layers] == [True, False, False]
        assert img.read(0, 65536) == b"\x07" * 65536
    finally:
        close_chain(img)
    assert helpers.qemu_check(mid)["rc"] == 0


def test_self_loop_is_refused(tmp_path):
    a = qcow2(tmp_path / "a.qcow2")
    rebase_unsafe(a, "a.qcow2")
    with pytest.raises(ImageError) as info:
        close_chain(open_image(a, "qcow2"))
    one_line(info.value)
    assert "loop" in str(info.value)


def test_two_image_loop_is_refused(tmp_path):
    a = qcow2(tmp_path / "a.qcow2")
    qcow2(tmp_path / "b.qcow2", "a.qcow2")
    rebase_unsafe(a, "b.qcow2")
    with pytest.raises(PolicyError, match="loop"):
        close_chain(open_image(a, "qcow2"))


def test_loop_through_a_symlink_is_refused(tmp_path):
    a = qcow2(tmp_path / "a.qcow2")
    os.symlink("a.qcow2", str(tmp_path / "alias.qcow2"))
    rebase_unsafe(a, "alias.qcow2")
    with pytest.raises(PolicyError, match="loop"):
        close_chain(open_image(a, "qcow2"))


def test_depth_cap(tmp_path):
    names = ["l0.qcow2"]
    qcow2(tmp_path / names[0])
    for i in range(1, 5):
        names.append("l%d.qcow2" % i)
        qcow2(tmp_path / names[i], names[i - 1])
    top = str(tmp_path / names[-1])
    close_chain(open_image(top, "qcow2", policy=Policy(max_chain_depth=4)))     # 4 backing files: fine
    with pytest.raises(PolicyError, match="longer than 3") as info:
        open_image(top, "qcow2", policy=Policy(max_chain_depth=3))
    one_line(info.value)
    assert Policy().max_chain_depth == 16


def test_backing_outside_the_tree_needs_allow_path(tmp_path):
    golden = tmp_path / "golden"
    vm = tmp_path / "vm"
    golden.mkdir()
    vm.mkdir()
    qcow2(golden / "base.qcow2")
    top = qcow2(vm / "top.qcow2", str(golden / "base.qcow2"))
    with pytest.raises(PolicyError, match="allow"):
        open_image(top, "qcow2")
    close_chain(open_image(top, "qcow2", policy=Policy(allowed_dirs=(str(golden),))))
    rebase_unsafe(top, "../golden/base.qcow2")
    with pytest.raises(PolicyError):
        open_image(top, "qcow2")


def test_missing_backing_file_is_one_line(tmp_path):
    qcow2(tmp_path / "base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", "base.qcow2")
    os.unlink(str(tmp_path / "base.qcow2"))
    with pytest.raises(ImageError) as info:
        open_image(top, "qcow2")
    one_line(info.value)
    assert "base.qcow2" in str(info.value)


def test_raw_file_with_a_qcow2_header_is_not_probed_as_a_backing(tmp_path):
    """A guest wrote a qcow2 header naming /etc/passwd into its raw disk: never followed."""
    guest = tmp_path / "guest.raw"
    inner = qcow2(tmp_path / "inner.qcow2", None)
    rebase_unsafe(inner, "/etc/passwd")
    guest.write_bytes(open(inner, "rb").read())
    top = tmp_path / "top.qcow2"
    helpers.qemu_img("create", "-q", "-f", "qcow2", "-b", "guest.raw", "-F", "raw", str(top), check=True)
    img = open_image(str(top), "qcow2")     # recorded format raw: the header inside is data
    try:
        assert chain_of(img)[1].path.endswith("guest.raw") and chain_of(img)[1].backing is None
    finally:
        close_chain(img)
