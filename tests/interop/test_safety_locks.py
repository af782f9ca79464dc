"""Outputs never replace or delete a disk that a running QEMU holds; temporary files stay hidden and bounded.

A running interactive ``qemu-io -f FMT FILE`` holds FILE read-write, as a VM holds its disk. Replacing
the file under it (``create``, ``convert``, a manifest's ``replace``, the modules' ``recreate`` and
``on_exists: replace``) or deleting it (``state: absent``) would leave the VM writing into a deleted
inode: every such path must take the destination's write lock (QEMU's lock bytes) first, keep it
until the rename or unlink is done, and refuse with qemu-img's message naming the destination.
Two vdisk writers arriving together must never both get the lock (locks are taken, then checked,
as QEMU's raw_apply_lock_bytes/raw_check_lock_bytes do). A destination name of 255 bytes works;
an error names the destination, never the hidden temporary file; SIGTERM and SIGHUP clean up.
"""
import multiprocessing
import os
import random
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import helpers
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import io as vio
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError, ImageInUse
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.convert import ConvertOptions, convert
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.create import create
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state import plan as splan
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.apply import apply, apply_action
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import apply_image, plan_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import image_spec

# qemu-img: 'Failed to get "write" lock' (the holder refuses to share write: qemu-io -f qcow2, a VM) or
# 'Failed to get shared "write" lock' (the holder writes: qemu-io -f raw); then 'Is another process using the image'
IN_USE = re.compile(r'failed to get (shared )?"write" lock', re.I)
ANOTHER = "is another process using the image"   # qemu-img: Is another process using the image [FILE]?


def vdisk(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", helpers.CLI_MODULE] + [str(a) for a in args], cwd=cwd,
                          capture_output=True, text=True)


def snapshot(path):
    st = os.stat(str(path))
    with open(str(path), "rb") as f:
        return st.st_ino, st.st_size, f.read()


def temporaries(directory):
    return [n for n in os.listdir(str(directory)) if n.endswith(".vdisk-tmp")]


class Holder:
    """``qemu-io -f FMT PATH`` waiting at its prompt (stdin a pipe): it holds PATH as a VM holds its disk."""

    def __init__(self, fmt, path):
        self.path = str(path)
        self.proc = subprocess.Popen(["qemu-io", "-f", fmt, self.path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            helpers.wait_until_qemu_writes(self.proc, self.path)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.communicate(b"quit\n", timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def assert_refused_message(text, dest):
    text = str(text)
    assert "\n" not in text.rstrip("\n"), text
    assert IN_USE.search(text) and ANOTHER in text, text
    assert str(dest) in text, text
    assert ".vdisk-tmp" not in text, text


@pytest.fixture
def disks(tmp_path):
    """A qcow2 disk and a raw disk with data, and a raw source to convert from."""
    helpers.qemu_img("create", "-q", "-f", "qcow2", tmp_path / "vm.qcow2", "4M", check=True)
    helpers.qemu_io("qcow2", str(tmp_path / "vm.qcow2"), "write -P 0x5a 0 64k")
    helpers.make_raw(tmp_path / "vm.raw", 4 * MiB, [(0, 64 * 1024)])
    helpers.make_raw(tmp_path / "src.raw", 2 * MiB, [(0, MiB)])
    return tmp_path


# -- the CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,name", [("qcow2", "vm.qcow2"), ("raw", "vm.raw")])
@pytest.mark.parametrize("command", ["create", "convert"])
def test_cli_refuses_to_replace_a_held_disk(disks, fmt, name, command):
    dest = disks / name
    before = snapshot(dest)
    with Holder(fmt, dest):
        if command == "create":
            proc = vdisk("create", "-f", "qcow2", dest, "1M")
        else:
            proc = vdisk("convert", "-O", "qcow2", disks / "src.raw", dest)
        assert proc.returncode == 1, proc
        assert proc.stderr.startswith("vdisk: %s: %s: " % (command, dest)), proc.stderr
        assert_refused_message(proc.stderr, dest)
        assert snapshot(dest) == before
    assert not temporaries(disks)


def test_qemu_img_refuses_the_same_way(disks):
    """The oracle: qemu-img create over the held qcow2 fails with the message vdisk copies."""
    dest = disks / "vm.qcow2"
    with Holder("qcow2", dest):
        proc = helpers.qemu_img("create", "-f", "qcow2", dest, "1M")
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert IN_USE.search(err) and "Is another process using the image [%s]?" % dest in err, err


MANIFESTS = {
    "replace": "{path: vm.qcow2, format: raw, size: 4M, recreate: true}",
    "delete": "{path: vm.qcow2, state: absent}",
    "convert-replace": "{path: vm.qcow2, format: raw, source: src.raw, recreate: true}",
}


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_apply_manifest_refuses_a_held_disk(disks, kind):
    dest = disks / "vm.qcow2"
    manifest = disks / "m.yml"
    manifest.write_text("version: 1\nimages:\n  - %s\n" % MANIFESTS[kind])
    before = snapshot(dest)
    with Holder("qcow2", dest):
        proc = vdisk("apply", manifest)
        assert proc.returncode == 1, proc
        assert_refused_message(proc.stderr, "images[0] (vm.qcow2)")    # the manifest names its images so
        assert snapshot(dest) == before
    assert not temporaries(disks)
    assert vdisk("apply", manifest).returncode == 0          # and it works once the VM is gone


# -- the engine calls the modules and the manifest applier make --------------------------------------
def _guest_wrote_a_qcow2_magic(path):
    """The guest of a raw disk wrote a qcow2 magic at its start: the file no longer opens as an image."""
    with open(str(path), "r+b") as f:
        f.write(b"QFI\xfb\0\0\0\3" + b"\xff" * 96)     # version 3, every other field out of range


@pytest.mark.parametrize("kind", ["delete", "replace", "convert-replace"])
@pytest.mark.parametrize("disk", ["qcow2", "raw-unreadable-as-image"])
def test_planned_action_refused_when_a_vm_took_the_disk_meanwhile(disks, kind, disk):
    """A plan made before a VM started: applying it must not replace or delete the disk the VM now holds,
    even when the file no longer opens as an image (a guest wrote a qcow2 magic into its raw disk)."""
    dest = disks / ("vm.qcow2" if disk == "qcow2" else "vm.raw")
    fields = {"path": str(dest), "format": "qcow2" if disk == "raw-unreadable-as-image" else "raw",
              "size": "4M", "recreate": True}
    if kind == "delete":
        fields = {"path": str(dest), "state": "absent"}
    elif kind == "convert-replace":
        fields["source"] = str(disks / "src.raw")
        del fields["size"]
    actions = plan_image(image_spec(fields)).actions
    assert actions and actions[0].kind == {"delete": splan.DELETE, "replace": splan.REPLACE,
                                           "convert-replace": splan.REPLACE}[kind]
    if disk != "qcow2":
        _guest_wrote_a_qcow2_magic(dest)
    before = snapshot(dest)
    with Holder("qcow2" if disk == "qcow2" else "raw", dest):
        with pytest.raises(ImageInUse) as info:
            apply(actions)
        assert_refused_message(info.value, dest)
        assert snapshot(dest) == before
    assert not temporaries(disks)


@pytest.mark.parametrize("fields", [{"state": "absent"}, {"format": "raw", "size": "4M", "recreate": True}],
                         ids=["absent", "recreate"])
def test_image_module_engine_refuses_a_held_disk(disks, fields):
    """What the ``image`` module calls: apply_image(spec, policy)."""
    dest = disks / "vm.qcow2"
    before = snapshot(dest)
    with Holder("qcow2", dest):
        with pytest.raises(ImageInUse) as info:
            apply_image(image_spec(dict(fields, path=str(dest))), Policy())
        assert_refused_message(info.value, dest)
        assert snapshot(dest) == before


@pytest.mark.parametrize("planned_before", [False, True], ids=["planned-while-held", "planned-before"])
def test_image_convert_module_engine_refuses_a_held_destination(disks, planned_before):
    """What ``image_convert`` with ``on_exists: replace`` calls: observe, plan_convert, apply."""
    src, dest = str(disks / "src.raw"), disks / "vm.qcow2"
    policy = Policy()

    def planned():
        return splan.plan_convert(observe(src, None, policy), observe(str(dest), policy=policy), "qcow2", {},
                                  "replace")
    actions = planned() if planned_before else None
    before = snapshot(dest)
    with Holder("qcow2", dest):
        with pytest.raises(ImageInUse) as info:
            apply(actions if planned_before else planned(), policy)
        assert_refused_message(info.value, dest)
        assert snapshot(dest) == before
    assert not temporaries(disks)


@pytest.mark.parametrize("call", ["create", "convert", "delete"])
def test_engine_entry_points_refuse_a_file_that_is_no_image(disks, call):
    """The lock rule does not depend on the file opening as an image: any regular file a QEMU holds."""
    dest = disks / "vm.raw"
    _guest_wrote_a_qcow2_magic(dest)
    before = snapshot(dest)
    with Holder("raw", dest):
        with pytest.raises(ImageInUse) as info:
            if call == "create":
                create(str(dest), "qcow2", MiB, {})
            elif call == "convert":
                convert([str(disks / "src.raw")], str(dest), ConvertOptions(src_fmt="raw", out_fmt="qcow2"))
            else:
                apply_action(splan.Action(splan.DELETE, str(dest), "delete", {}, {}, {}))
        assert_refused_message(info.value, dest)
        assert snapshot(dest) == before
    assert not temporaries(disks)


def test_destination_lock_is_held_until_the_rename(disks):
    """While vdisk writes a replacement, a QEMU starting on the old file is refused (vdisk holds its lock)."""
    dest = disks / "vm.qcow2"
    out = vio.AtomicOutput(str(dest))
    try:
        proc = helpers.run("qemu-io", "-f", "qcow2", "-c", "write 0 512", dest, check=False)
        assert b"lock" in proc.stderr + proc.stdout, proc
    finally:
        out.abort()
    helpers.qemu_io("qcow2", str(dest), "write 0 512")      # released by abort


@pytest.mark.parametrize("call", ["create", "convert", "state-replace", "state-delete"])
def test_destination_lock_is_held_at_the_rename_and_the_unlink(disks, monkeypatch, call):
    """The check is not check-then-act: the write lock on the file being replaced or deleted is still held
    when the rename or the unlink happens."""
    dest = str(disks / "vm.qcow2")
    seen = []
    real_rename, real_replace, real_unlink = os.rename, os.replace, os.unlink

    def watch(real):
        def wrapper(*args, **kwargs):
            if os.fspath(args[-1]) == dest and os.path.exists(dest):
                seen.append(helpers.byte_locked(dest, helpers.QEMU_WRITE_PERM_BYTE))
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(os, "rename", watch(real_rename))
    monkeypatch.setattr(os, "replace", watch(real_replace))
    monkeypatch.setattr(os, "unlink", watch(real_unlink))
    if call == "create":
        create(dest, "raw", MiB, {})
    elif call == "convert":
        convert([str(disks / "src.raw")], dest, ConvertOptions(src_fmt="raw", out_fmt="raw"))
    elif call == "state-replace":
        apply_image(image_spec({"path": dest, "format": "raw", "size": "1M", "recreate": True}))
    else:
        apply_image(image_spec({"path": dest, "state": "absent"}))
    monkeypatch.undo()
    assert seen == [True], seen
    assert not os.path.exists(dest) if call == "state-delete" else helpers.qemu_info(dest)["format"] == "raw"
    assert not helpers.byte_locked(dest, helpers.QEMU_WRITE_PERM_BYTE) if os.path.exists(dest) else True


# -- two vdisk writers ------------------------------------------------------------------------------
def _writer(index, path, barrier, holders, results, tries, seconds):
    """Open *path* writable over and over (random pauses of 0-40 us between tries, so the two writers'
    attempts overlap at every offset); count the successes during which the other writer held it too."""
    rnd = random.Random(index)
    attempts = wins = both = 0
    barrier.wait()
    end = time.monotonic() + seconds
    while attempts < tries or time.monotonic() < end:
        attempts += 1
        pause = time.perf_counter() + rnd.random() * 40e-6
        while time.perf_counter() < pause:
            pass
        try:
            host = vio.HostFile(path, writable=True)
        except ImageInUse:
            continue
        wins += 1
        with holders.get_lock():
            holders.value += 1
            both += holders.value > 1
        hold = time.perf_counter() + 20e-6
        while time.perf_counter() < hold:
            pass
        with holders.get_lock():
            holders.value -= 1
        host.close()
    results.put((attempts, wins, both))


def test_two_concurrent_writers_never_both_get_the_lock(tmp_path):
    path = helpers.make_raw(tmp_path / "d.raw", MiB)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    holders = ctx.Value("i", 0)
    results = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(i, path, barrier, holders, results, 1000, 1.0)) for i in range(2)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=120), results.get(timeout=120)]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    attempts = sum(g[0] for g in got)
    both = sum(g[2] for g in got)
    print("both held: %d in %d attempts (%s)" % (both, attempts, got))
    assert all(g[0] >= 1000 and g[1] for g in got), got
    assert both == 0, "both writers held the lock %d times in %d attempts" % (both, attempts)


# -- names ------------------------------------------------------------------------------------------
LONG = "d" * 249 + ".qcow2"      # 255 bytes, NAME_MAX


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk"])
@pytest.mark.parametrize("replacing", [False, True], ids=["new", "replacing"])
def test_255_byte_destination_name(tmp_path, fmt, replacing):
    name = LONG if fmt == "qcow2" else "d" * (255 - len(fmt) - 1) + "." + fmt
    assert len(name.encode()) == 255
    src = helpers.make_raw(tmp_path / "src.raw", 2 * MiB, [(0, MiB)])
    dest = tmp_path / name
    if replacing:
        helpers.qemu_img("create", "-q", "-f", fmt, dest, "1M", check=True)
    proc = vdisk("create", "-q", "-f", fmt, dest, "3M")
    assert proc.returncode == 0, proc.stderr
    assert helpers.qemu_info(str(dest), fmt)["virtual-size"] == 3 * MiB
    if fmt != "raw":
        assert helpers.qemu_check(str(dest), fmt)["rc"] == 0
    proc = vdisk("convert", "-O", fmt, src, dest)
    assert proc.returncode == 0, proc.stderr
    if fmt != "raw":
        assert helpers.qemu_check(str(dest), fmt)["rc"] == 0
    assert helpers.qemu_compare(str(dest), src, fmt, "raw")
    assert not temporaries(tmp_path)


def test_temporary_name_fits_name_max(tmp_path):
    for n in (1, 200, 235, 236, 250, 255):
        dest = tmp_path / ("é" * (n // 2) + "x" * (n % 2))
        out = vio.AtomicOutput(str(dest))
        try:
            base = os.path.basename(out.tmp_path)
            assert len(os.fsencode(base)) <= 255
            assert base.startswith(".")
            assert base.endswith(".vdisk-tmp")
            assert os.path.dirname(out.tmp_path) == str(tmp_path)
        finally:
            out.abort()
    assert not temporaries(tmp_path)


def test_output_created_in_a_temporary_file_refuses_one_swapped_in(tmp_path):
    """convert has the driver create its output in the temporary file, which is emptied first: only
    if it still is the file this output made (a hard link to another file put there is never truncated)."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = vio.AtomicOutput(str(tmp_path / "out.qcow2"))
    try:
        os.unlink(out.tmp_path)
        os.link(str(victim), out.tmp_path)
        with pytest.raises(ImageError) as info:
            create(out.tmp_path, "qcow2", MiB, {})
        assert str(info.value).startswith(str(tmp_path / "out.qcow2") + ": "), info.value
    finally:
        out.abort()
    assert victim.read_bytes() == b"precious"
    assert not temporaries(tmp_path) and not (tmp_path / "out.qcow2").exists()


# -- errors name the destination -----------------------------------------------------------------------
def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))


@pytest.mark.parametrize("args", [["convert", "-O", "raw", "SRC"], ["convert", "-O", "qcow2", "SRC"],
                                  ["create", "-f", "raw", "-o", "preallocation=full"],
                                  ["create", "-f", "qcow2", "-o", "preallocation=full"]],
                         ids=["convert-raw", "convert-qcow2", "create-raw-full", "create-qcow2-full"])
def test_a_failing_write_names_the_destination(tmp_path, args):
    src = helpers.make_raw(tmp_path / "src.raw", 4 * MiB, [(0, 4 * MiB)])
    dest = tmp_path / "out.img"
    argv = [src if a == "SRC" else a for a in args] + [dest] + (["4M"] if args[0] == "create" else [])
    proc = subprocess.run([sys.executable, "-m", helpers.CLI_MODULE] + [str(a) for a in argv],
                          capture_output=True, text=True, preexec_fn=_limit_file_size)
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("vdisk: %s: %s: " % (args[0], dest)), proc.stderr
    assert "File too large" in proc.stderr and ".vdisk-tmp" not in proc.stderr, proc.stderr
    assert not dest.exists() and not temporaries(tmp_path)


def test_engine_error_from_the_temporary_file_names_the_destination(tmp_path, monkeypatch):
    dest = str(tmp_path / "out.qcow2")
    real = os.pwrite

    def failing(fd, data, offset):
        if offset >= 65536:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(vio.os, "pwrite", failing)
    with pytest.raises(ImageError) as info:
        create(dest, "qcow2", 4 * MiB, {"preallocation": "full"})
    assert info.value.path == dest, info.value.path
    assert ".vdisk-tmp" not in str(info.value) and "No space left on device" in str(info.value)
    assert not temporaries(tmp_path)


# -- termination signals --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def busy_source(tmp_path_factory):
    """128 MiB: every other MiB holds incompressible data (holes between), so ``convert -c`` takes seconds."""
    path = tmp_path_factory.mktemp("signals") / "big.raw"
    with open(path, "wb") as f:
        f.truncate(128 * MiB)
        for i in range(0, 128, 2):
            f.seek(i * MiB)
            f.write(os.urandom(MiB))
    return str(path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_terminated_convert_cleans_up(tmp_path, busy_source, sig, existing):
    dest = tmp_path / "out.qcow2"
    if existing:
        helpers.qemu_img("create", "-q", "-f", "qcow2", dest, "1M", check=True)
        before = snapshot(dest)
    proc = subprocess.Popen([sys.executable, "-m", helpers.CLI_MODULE, "convert", "-c", "-O", "qcow2",
                             busy_source, str(dest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=helpers.default_signals)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, "convert finished before it could be terminated"
            assert time.time() < deadline, "no temporary output appeared"
            tmps = temporaries(tmp_path)
            try:
                if tmps and os.path.getsize(str(tmp_path / tmps[0])) > 256 * 1024:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = err.decode()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("vdisk: convert: "), err
    assert not temporaries(tmp_path), "temporary file left behind"
    if existing:
        assert snapshot(dest) == before
    else:
        assert not dest.exists()


def test_nohup_keeps_sighup_ignored(tmp_path):
    """Under nohup (SIGHUP ignored) a hangup does not stop vdisk: an ignored signal stays ignored."""
    code = textwrap.dedent("""
        import os, signal, sys
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        from ansible_collections.vdisk.images.plugins.module_utils.vdisk import interrupt
        with interrupt.signals_raise():
            os.kill(os.getpid(), signal.SIGHUP)
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        print("survived")
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "survived\n", proc
