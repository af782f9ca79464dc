"""QEMU-compatible image locks (io.HostFile) against a real QEMU process.

A running interactive ``qemu-io -f raw IMG`` holds its image read-write, like a VM: vdisk must
refuse to write it and (like ``qemu-img info``) to read it without ``-U``; while vdisk writes an
image, qemu-io and qemu-img must be refused. qemu-io/qemu-img missing is a failure, not a skip.
"""
import os
import subprocess

import pytest

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import io as vio
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageInUse

@pytest.fixture
def image(tmp_path):
    return helpers.make_raw(tmp_path / "disk.raw", 1 * helpers.MiB, [(0, 4096)])


@pytest.fixture
def qemu_holding(image):
    """An interactive qemu-io that has *image* open read-write and waits for commands on stdin."""
    proc = subprocess.Popen(["qemu-io", "-f", "raw", image], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        helpers.wait_until_qemu_writes(proc, image)
        yield image
    finally:
        proc.stdin.close()          # EOF: qemu-io quits
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()



def _qemu_consistent_read(image):
    """``qemu-img convert`` of *image* (a reader that refuses to share write), output thrown away."""
    out = image + ".probe.raw"
    try:
        return helpers.qemu_img("convert", "-f", "raw", "-O", "raw", image, out)
    finally:
        if os.path.exists(out):
            os.unlink(out)


def _one_line(exc):
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    assert "in use" in text, text


def test_writer_refused_while_qemu_holds_the_image(qemu_holding):
    with open(qemu_holding, "rb") as f:
        before = f.read()
    with pytest.raises(ImageInUse) as info:
        vio.HostFile(qemu_holding, writable=True)
    _one_line(info.value)
    with open(qemu_holding, "rb") as f:
        assert f.read() == before


def test_reader_refused_like_qemu_img_convert_unless_unlocked(qemu_holding):
    assert _qemu_consistent_read(qemu_holding).returncode == 1
    with pytest.raises(ImageInUse) as info:
        vio.HostFile(qemu_holding)
    _one_line(info.value)
    # -U: qemu-img convert -U works, and so does an unlocked vdisk read
    out = qemu_holding + ".u.raw"
    helpers.qemu_img("convert", "-U", "-f", "raw", "-O", "raw", qemu_holding, out, check=True)
    os.unlink(out)
    with vio.HostFile(qemu_holding, lock=False) as host:
        assert host.pread(4096, 0) == helpers.pattern(0, 4096)


def test_qemu_refused_while_vdisk_writes(image):
    with vio.HostFile(image, writable=True) as host:
        host.pwrite(b"vdisk", 0)
        proc = _qemu_consistent_read(image)
        assert proc.returncode == 1 and b"lock" in proc.stderr, proc.stderr
        out = helpers.qemu_io("raw", image, "write 0 512", check=False)
        assert "lock" in out, out
        proc = helpers.qemu_img("info", "-f", "raw", image)     # raw info takes no I/O permission
        assert proc.returncode == 0, proc.stderr
    # released on close: qemu can write again, and vdisk's write is there
    helpers.qemu_io("raw", image, "read -P 0x76 0 1", "write -P 0x55 512 512")
    with open(image, "rb") as f:
        assert f.read(5) == b"vdisk"


def test_qemu_reads_beside_a_vdisk_reader(image):
    with vio.HostFile(image):
        assert helpers.qemu_img("info", "-f", "raw", image).returncode == 0
        assert _qemu_consistent_read(image).returncode == 0
        out = helpers.run("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", image, check=False)
        assert out.returncode == 0 and b"lock" not in out.stderr, out.stderr
        # a qemu writer wants "write", which a consistent vdisk reader does not share
        out = helpers.qemu_io("raw", image, "write 0 512", check=False)
        assert "lock" in out, out


def test_two_vdisk_readers_coexist_and_exclude_a_writer(image):
    a = vio.HostFile(image)
    b = vio.HostFile(image)
    try:
        assert a.pread(512, 0) == b.pread(512, 0)
        with pytest.raises(ImageInUse):
            vio.HostFile(image, writable=True)
    finally:
        a.close()
        b.close()
    vio.HostFile(image, writable=True).close()


def test_locks_are_released_on_close_for_qemu(image):
    host = vio.HostFile(image, writable=True)
    host.close()
    helpers.qemu_io("raw", image, "write -P 0x11 0 4k")


def _open_with_another_writer_at(image, monkeypatch, k):
    """Open *image* writable (A), with a second writer's whole open (B) run just before A's *k*-th lock
    call (F_OFD_SETLK/F_OFD_GETLK): every interleaving of the two lock sequences is tried in turn.
    Returns ``(a, b, calls)``: the HostFiles that got the lock (None where refused), A's lock calls."""
    real = vio.fcntl.fcntl
    lock_cmds = {getattr(vio.fcntl, "F_OFD_GETLK", 36), getattr(vio.fcntl, "F_OFD_SETLK", 37)}
    state = {"calls": 0, "b": None, "done": False, "inside": False}

    def hooked(fd, cmd, *args):
        if cmd in lock_cmds and not state["inside"]:
            if state["calls"] == k and not state["done"]:
                state["inside"] = True
                try:
                    state["b"] = vio.HostFile(image, writable=True)
                except ImageInUse:
                    state["b"] = None
                finally:
                    state["inside"] = False
                    state["done"] = True
            state["calls"] += 1
        return real(fd, cmd, *args)

    monkeypatch.setattr(vio.fcntl, "fcntl", hooked)
    try:
        try:
            a = vio.HostFile(image, writable=True)
        except ImageInUse:
            a = None
    finally:
        monkeypatch.setattr(vio.fcntl, "fcntl", real)
    return a, state["b"], state["calls"], state["done"]


def test_two_writers_never_both_get_the_lock_at_any_interleaving(image, monkeypatch):
    """Taking the lock is lock-then-check (QEMU's raw_apply_lock_bytes, raw_check_lock_bytes): a writer
    that opens at any point of another's locking never leaves both holding it."""
    k = 0
    while True:
        a, b, calls, inserted = _open_with_another_writer_at(image, monkeypatch, k)
        try:
            if not inserted:
                break
            assert (a is None) != (b is None), "interleaving %d: a=%s b=%s" % (k, a is not None, b is not None)
        finally:
            for host in (a, b):
                if host is not None:
                    host.close()
        k += 1
    assert k >= 6          # every lock call of A had B's open inserted before it
    vio.HostFile(image, writable=True).close()      # nothing left locked


def test_a_refused_writer_leaves_no_lock_behind(image):
    holder = vio.HostFile(image, writable=True)
    try:
        with pytest.raises(ImageInUse) as info:
            vio.HostFile(image, writable=True)
        _one_line(info.value)
        assert 'failed to get "write" lock' in str(info.value) or 'failed to get shared "write" lock' \
            in str(info.value)
    finally:
        holder.close()
    # the refused opener released what it took: qemu can take the image now
    helpers.qemu_io("raw", image, "write -P 0x11 0 4k")
