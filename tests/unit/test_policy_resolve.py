"""``Policy.resolve``: a file an image names is resolved once, as the kernel resolves it, and the
checked real path is the one ``io.HostFile(checked=...)`` opens and verifies (issue 14, item 1).

The end-to-end cases (every command, ``inspect``, ``commit``, symlink races) are in
tests/interop/test_safety_paths.py.
"""
import os

import pytest

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy, ResolvedPath
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import PolicyError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.io import HostFile
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import chain_of, close_chain, open_image


@pytest.fixture
def tree(tmp_path):
    """``vm/disk.qcow2`` (not created), ``vm/root -> ../outside/sub``, ``outside/secret.raw`` and a
    decoy ``vm/secret.raw`` where ``normpath`` would look."""
    (tmp_path / "vm").mkdir()
    (tmp_path / "outside" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "secret.raw").write_bytes(b"SECRET")
    (tmp_path / "vm" / "secret.raw").write_bytes(b"INSIDE")
    os.symlink("../outside/sub", str(tmp_path / "vm" / "root"))
    return tmp_path


def _image(tree):
    return str(tree / "vm" / "disk.qcow2")


def one_line(exc):
    assert str(exc) and "\n" not in str(exc), repr(str(exc))


@pytest.mark.parametrize("name", ["root/../secret.raw", "root/../sub/../secret.raw", "./root/../secret.raw"])
def test_dotdot_after_a_symlink_is_resolved_as_the_kernel_does(tree, name):
    image = _image(tree)
    with pytest.raises(PolicyError, match="outside the allowed directories") as info:
        Policy().with_root(image).resolve(name, image)
    one_line(info.value)
    absolute = str(tree / "vm" / name)
    with pytest.raises(PolicyError, match="is an absolute path"):
        Policy().with_root(image).resolve(absolute, image)


def test_display_and_real_path(tree):
    """``display`` is what qemu-img shows (the un-normalised join); ``real`` is the kernel's file."""
    image = _image(tree)
    wide = Policy(allowed_dirs=(str(tree / "outside"),)).with_root(image)
    ref = wide.resolve("root/../secret.raw", image)
    assert isinstance(ref, ResolvedPath)
    assert ref.display == os.path.join(str(tree / "vm"), "root/../secret.raw")
    assert ref.real == os.path.realpath(str(tree / "outside" / "secret.raw"))
    st = os.stat(ref.real)
    assert ref.ident == (st.st_dev, st.st_ino)
    assert (ref.name, ref.image, ref.what) == ("root/../secret.raw", image, "backing file")
    assert wide.resolve_reference("root/../secret.raw", image) == ref.real
    # a relative image path: display stays relative, as qemu-img's full-backing-filename
    rel = os.path.relpath(image)
    assert wide.resolve("root/../secret.raw", rel).display == os.path.join(os.path.dirname(rel), "root/../secret.raw")
    # a missing file is allowed by the rule (the opener reports it), with no identity
    assert wide.resolve("missing.raw", image).ident is None


def test_extents_are_also_allowed_beside_their_descriptor(tree):
    """The VMDK rule lives here too: extents beside the descriptor as named, wherever it is."""
    desc = str(tree / "vm" / "d.vmdk")
    ref = Policy().resolve("secret.raw", desc, "extent")
    assert ref.real == os.path.realpath(str(tree / "vm" / "secret.raw"))
    with pytest.raises(PolicyError, match="leaves the descriptor's directory"):
        Policy().resolve("root/../secret.raw", desc, "extent")


def test_hostfile_opens_the_checked_real_path(tree):
    """Even when the name now leads elsewhere, the file opened is the one that was checked."""
    vm = tree / "vm"
    (vm / "inside.raw").write_bytes(b"INSIDE")
    os.symlink("inside.raw", str(vm / "base.raw"))
    image = _image(tree)
    ref = Policy().with_root(image).resolve("base.raw", image)
    assert ref.real == os.path.realpath(str(vm / "inside.raw"))
    os.unlink(str(vm / "base.raw"))
    os.symlink("../outside/secret.raw", str(vm / "base.raw"))          # swapped after the check
    with HostFile(ref.display, lock=False, checked=ref) as host:
        assert host.pread(6, 0) == b"INSIDE"
        assert host.path == ref.display
        assert host.checked is ref


def test_hostfile_refuses_a_file_replaced_after_the_check(tree):
    vm = tree / "vm"
    (vm / "base.raw").write_bytes(b"INSIDE")
    image = _image(tree)
    ref = Policy().with_root(image).resolve("base.raw", image)
    # another file renamed over the checked one
    (vm / "other.raw").write_bytes(b"OTHER!")
    os.replace(str(vm / "other.raw"), str(vm / "base.raw"))
    with pytest.raises(PolicyError, match="changed between the check and the open") as info:
        HostFile(ref.display, lock=False, checked=ref)
    one_line(info.value)
    assert info.value.path == image
    # a symlink put where the checked file was: never followed (O_NOFOLLOW)
    ref = Policy().with_root(image).resolve("base.raw", image)
    os.unlink(str(vm / "base.raw"))
    os.symlink("../outside/secret.raw", str(vm / "base.raw"))
    with pytest.raises(PolicyError, match="symbolic link"):
        HostFile(ref.display, lock=False, checked=ref)


def test_verify_fd(tree, monkeypatch):
    """The opened descriptor: its /proc link must be inside the allowed directories; without /proc
    its device and inode must be the checked file's."""
    image = _image(tree)
    ref = Policy(allowed_dirs=(str(tree / "outside"),)).with_root(image).resolve("secret.raw", image)
    fd = os.open(ref.real, os.O_RDONLY)
    other = os.open(str(tree / "outside" / "secret.raw"), os.O_RDONLY)
    try:
        ref.verify_fd(fd)
        with pytest.raises(PolicyError, match="changed between the check and the open"):
            ref.verify_fd(other)
        # same identity, but the kernel says it was reached outside the allowed directories
        narrow = ResolvedPath(ref.name, ref.display, ref.real, ref.image, ref.what, (str(tree / "elsewhere"),),
                              ref.ident)
        with pytest.raises(PolicyError, match="outside the allowed directories"):
            narrow.verify_fd(fd)

        def no_proc(path, *args, **kwargs):
            raise FileNotFoundError(path)
        monkeypatch.setattr(os, "readlink", no_proc)
        narrow.verify_fd(fd)                    # no /proc: the identity decides
        with pytest.raises(PolicyError):
            narrow.verify_fd(other)
    finally:
        os.close(fd)
        os.close(other)


def test_chain_opens_backing_files_through_the_resolver(tree):
    """open_image: each backing layer keeps the name qemu-img shows as its path, has the checked real
    file open, and records how it was resolved."""
    vm = tree / "vm"
    (vm / "deep" / "dir").mkdir(parents=True)
    os.symlink("deep/dir", str(vm / "dirlink"))
    helpers.qemu_img("create", "-q", "-f", "raw", vm / "deep" / "base.raw", "1M", check=True)
    top = str(vm / "top.qcow2")
    helpers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "dirlink/../base.raw", "-F", "raw", top, "1M",
                     check=True)
    img = open_image(top, "qcow2")
    try:
        base = chain_of(img)[1]
        assert base.path == os.path.join(str(vm), "dirlink/../base.raw")
        assert base.opened_as.real == os.path.realpath(str(vm / "deep" / "base.raw"))
        assert os.readlink("/proc/self/fd/%d" % base.host.fd) == base.opened_as.real
    finally:
        close_chain(img)


def test_a_driver_must_open_the_checked_file(tree):
    """Policy.checked refuses a path other than the one that was checked (a driver bug fails closed)."""
    image = _image(tree)
    ref = Policy().with_root(image).resolve("secret.raw", image)
    policy = Policy(opening=ref)
    assert policy.checked(ref.display) is ref
    assert Policy().checked(ref.display) is None
    with pytest.raises(PolicyError, match="internal error"):
        policy.checked(str(tree / "vm" / "other.raw"))
