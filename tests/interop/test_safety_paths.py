"""The path that is checked is the path that is opened (issue 14, item 1).

A file an image names (a backing file, a qcow2 external data file, a VMDK extent) is resolved once,
as the kernel resolves it: ``tree/root/../secret.raw`` with ``tree/root -> ../outside/sub`` is
``outside/secret.raw``, although ``normpath`` makes it ``tree/secret.raw``.  That real path is the one
checked against the allowed directories and the one opened (``O_NOFOLLOW``, the opened descriptor
verified), so a name that looks inside but resolves outside is refused by every command, ``inspect``
never calls it safe, ``commit`` never writes through it, and swapping a symlink between the check and
the open never makes vdisk read the file it swapped in.

Each case builds its images with qemu-img beside a decoy ``tree/secret.raw`` (where ``normpath``
points) and runs the vdisk CLI in a child process with the audit hook of test_security.py.
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

import helpers
from helpers import MiB
from test_security import VMDK_DESCRIPTOR, assert_refused, audited, qemu_img, sha

PKG = helpers.CLI_MODULE
INSIDE = b"INSIDE" * (MiB // 6) + bytes(MiB % 6)
SECRET = b"SECRET" * (MiB // 6) + bytes(MiB % 6)
NAME = "root/../secret.raw"         # normpath: tree/secret.raw (the decoy); the kernel: outside/secret.raw


@pytest.fixture
def tree(tmp_path):
    """``tree/`` with the decoy ``secret.raw`` and ``root -> ../outside/sub``; ``outside/secret.raw``."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "outside" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "secret.raw").write_bytes(SECRET)
    (tmp_path / "tree" / "secret.raw").write_bytes(INSIDE)
    os.symlink("../outside/sub", str(tmp_path / "tree" / "root"))
    helpers.run("truncate", "-s", "1M", str(tmp_path / "tree" / "other.raw"))
    return tmp_path


def _overlay_with_data(path, backing, backing_fmt="raw"):
    """A qcow2 overlay holding 64 KiB of data (so commit has something to write) that names *backing*,
    which is set without opening it (qemu-img would open it through the symlink)."""
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    helpers.qemu_io("qcow2", str(path), "write -P 0x5a 0 64k")
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", backing_fmt, path)


def _commands(img):
    return [("info", img), ("convert", "-O", "raw", img, "out.raw"), ("compare", img, "other.raw"),
            ("map", img), ("commit", img), ("inspect", img), ("inspect", "--output=json", img)]


def _assert_all_refused(tree, img, runs, needle, failed="references"):
    for cmd, run in zip(("info", "convert", "compare", "map", "commit"), runs):
        if cmd == "compare":
            assert run["rc"] == 2 and needle in run["stderr"], run
        else:
            assert_refused(run, cmd, needle)
    for run in runs[5:]:
        assert run["rc"] == 1 and "result: safe" not in run["stdout"], run
    assert "FAIL %s" % failed in runs[5]["stdout"], runs[5]
    assert not json.loads(runs[6]["stdout"])["safe"]
    assert not (tree / "tree" / "out.raw").exists()
    assert (tree / "outside" / "secret.raw").read_bytes() == SECRET          # commit wrote nothing outside
    assert (tree / "tree" / "secret.raw").read_bytes() == INSIDE              # nor into the decoy


# -- backing files ------------------------------------------------------------------------------
def test_backing_file_through_a_symlink_and_dotdot(tree):
    img = tree / "tree" / "t.qcow2"
    _overlay_with_data(img, NAME)
    before = sha(img)
    runs = audited(tree, *_commands(img))
    _assert_all_refused(tree, img, runs, "outside the allowed directories")
    assert "secret.raw" in runs[0]["stderr"]
    report = json.loads(runs[6]["stdout"])
    assert [(r["kind"], r["name"], r["allowed"]) for r in report["references"]] == [("backing file", NAME, False)]
    assert sha(img) == before


def test_backing_file_named_through_an_absolute_symlinked_path(tree):
    """The same name, absolute: ``/.../tree/root/../secret.raw``."""
    img = tree / "tree" / "t.qcow2"
    _overlay_with_data(img, str(tree / "tree" / NAME))
    runs = audited(tree, *_commands(img))
    _assert_all_refused(tree, img, runs, "outside the allowed directories")


def test_backing_file_allowed_explicitly_is_read_from_where_the_kernel_finds_it(tree):
    """With ``--allow-path outside`` the name is allowed, and the file read is the kernel's (the secret),
    never the decoy ``normpath`` names; qemu-img reads the same."""
    img = tree / "tree" / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", NAME, "-F", "raw", img, "1M")
    runs = audited(tree, ("convert", "-O", "raw", "--allow-path", tree / "outside", img, "out.raw"),
                   ("inspect", "--output=json", "--allow-path", tree / "outside", img),
                   allowed=[tree / "outside"])
    assert runs[0]["rc"] == 0, runs[0]
    assert (tree / "tree" / "out.raw").read_bytes() == SECRET
    helpers.qemu_img("convert", "-O", "raw", img, tree / "qemu.raw", check=True)
    assert (tree / "qemu.raw").read_bytes() == SECRET
    report = json.loads(runs[1]["stdout"])
    assert runs[1]["rc"] == 0 and report["safe"], report
    ref = report["references"][0]
    assert ref["allowed"] and ref["path"] == os.path.realpath(str(tree / "outside" / "secret.raw")), ref


def test_backing_symlink_inside_the_tree_shows_qemu_names_and_commits_into_the_real_file(tree):
    """``dirlink/../base.raw`` with ``dirlink -> deep/dir`` is ``deep/base.raw`` (inside): info shows the
    names qemu-img shows, every reader reads ``deep/base.raw``, and commit writes into it, not the decoy."""
    t = tree / "tree"
    (t / "deep" / "dir").mkdir(parents=True)
    os.symlink("deep/dir", str(t / "dirlink"))
    (t / "deep" / "base.raw").write_bytes(bytes(MiB))
    (t / "base.raw").write_bytes(INSIDE)            # the decoy normpath names
    img = t / "t.qcow2"
    _overlay_with_data(img, "dirlink/../base.raw")
    ours = helpers.vdisk_cli("info", "--output=json", img)
    theirs = helpers.qemu_img("info", "--output=json", img, check=True)
    ours, theirs = json.loads(ours.stdout), json.loads(theirs.stdout)
    for key in ("backing-filename", "full-backing-filename", "backing-filename-format"):
        assert ours.get(key) == theirs.get(key), key
    runs = audited(tree, ("convert", "-O", "raw", img, "out.raw"), ("commit", img), ("inspect", img))
    assert [r["rc"] for r in runs] == [0, 0, 0], runs
    expected = b"\x5a" * 65536 + bytes(MiB - 65536)
    assert (t / "out.raw").read_bytes() == expected
    assert (t / "deep" / "base.raw").read_bytes() == expected
    assert (t / "base.raw").read_bytes() == INSIDE


# -- qcow2 external data file ---------------------------------------------------------------------
def test_qcow2_data_file_through_a_symlink_and_dotdot(tree):
    img = tree / "tree" / "t.qcow2"
    placeholder = "abcdefghijklmn.raw"
    assert len(placeholder) == len(NAME)
    # qemu-img creates the data file relative to its working directory: run it in the tree
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=%s" % placeholder, str(img), "1M"],
                   cwd=str(tree / "tree"), check=True)
    assert (tree / "tree" / placeholder).exists()
    raw = img.read_bytes()
    assert raw.count(placeholder.encode()) == 1
    img.write_bytes(raw.replace(placeholder.encode(), NAME.encode()))
    before = sha(img)
    runs = audited(tree, *_commands(img))
    _assert_all_refused(tree, img, runs, "data file")
    report = json.loads(runs[6]["stdout"])
    assert [(r["kind"], r["name"], r["allowed"]) for r in report["references"]] == [("data file", NAME, False)]
    assert sha(img) == before


# -- VMDK extents -----------------------------------------------------------------------------------
def test_vmdk_extent_through_a_symlink_and_dotdot(tree):
    desc = tree / "tree" / "d.vmdk"
    desc.write_text(VMDK_DESCRIPTOR % NAME)
    before = sha(desc)
    cmds = [("info", desc), ("convert", "-O", "raw", desc, "out.raw"), ("compare", desc, "other.raw"),
            ("map", desc), ("check", desc), ("inspect", desc), ("inspect", "--output=json", desc)]
    runs = audited(tree, *cmds)
    for cmd, run in zip(("info", "convert", "compare", "map", "check"), runs):
        if cmd == "compare":
            assert run["rc"] == 2 and "leaves the descriptor's directory" in run["stderr"], run
        else:
            assert_refused(run, cmd, "leaves the descriptor's directory", "--allow-path")
    for run in runs[5:]:
        assert run["rc"] == 1 and "result: safe" not in run["stdout"], run
    report = json.loads(runs[6]["stdout"])
    assert [(r["kind"], r["name"], r["allowed"]) for r in report["references"]] == [("extent", NAME, False)]
    assert sha(desc) == before and not (tree / "tree" / "out.raw").exists()


def test_vmdk_backing_extent_and_commit(tree):
    """A qcow2 overlay on a VMDK whose extent leaves the tree: commit must not write into the extent."""
    desc = tree / "tree" / "d.vmdk"
    desc.write_text(VMDK_DESCRIPTOR % NAME)
    img = tree / "tree" / "t.qcow2"
    _overlay_with_data(img, "d.vmdk", "vmdk")
    runs = audited(tree, *_commands(img))
    _assert_all_refused(tree, img, runs, "leaves the descriptor's directory", failed="backing-chain")


# -- a symlink swapped between the check and the open ----------------------------------------------
RACE_CHILD = r"""
import contextlib, hashlib, io, json, os, sys, threading, time
state = {"on": False, "opened": set()}
def hook(event, args):
    if state["on"] and event == "open" and args and isinstance(args[0], (str, bytes)):
        state["opened"].add(os.fsdecode(args[0]))
sys.addaudithook(hook)
from %s.cli.main import main
# a loaded host stretches the time between resolving a name and opening it: so does this
_realpath = os.path.realpath
def slow_realpath(*args, **kwargs):
    result = _realpath(*args, **kwargs)
    time.sleep(0.0002)
    return result
os.path.realpath = slow_realpath
mode, link, inside, outside, img, out = sys.argv[2:8]
stop = threading.Event()
def flip_link():
    # the backing file itself: a symlink replaced atomically between an inside and an outside target
    tmp = link + ".tmp"
    while not stop.is_set():
        for target in (outside, inside):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(target, tmp)
            os.replace(tmp, link)
            time.sleep(0.002)       # lets the converts run while the link is in each state
def flip_dir():
    # a directory on the way: a real directory (inside) that becomes a symlink to an outside one
    while not stop.is_set():
        time.sleep(0.002)
        os.rename(link, inside)
        os.symlink(outside, link)
        time.sleep(0.002)
        os.unlink(link)
        os.rename(inside, link)
flipper = threading.Thread(target=flip_link if mode == "link" else flip_dir)
flipper.start()
runs = []
deadline = time.monotonic() + 6
try:
    while len(runs) < 150 and time.monotonic() < deadline:
        err = io.StringIO()
        state["on"] = True
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(["convert", "-O", "raw", img, out])
        state["on"] = False
        digest = None
        if rc == 0:
            with open(out, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            os.unlink(out)
        runs.append({"rc": rc, "stderr": err.getvalue(), "sha": digest})
finally:
    stop.set()
    flipper.join()
with open(sys.argv[1], "w") as f:
    json.dump({"runs": runs, "opened": sorted(state["opened"])}, f)
""" % PKG


@pytest.mark.parametrize("mode", ["link", "dir"])
def test_backing_symlink_swapped_during_converts(tree, mode):
    """A thread swaps what the backing name leads to while converts run in a loop: *link* flips the
    symlink ``tree/base.raw`` between ``inside.raw`` and ``../outside/secret.raw``; *dir* turns the
    directory ``tree/d`` (holding ``base.raw``) into a symlink to ``outside/sub`` and back.  Each
    convert reads the inside content or fails with a one-line error; none reads the secret."""
    t = tree / "tree"
    if mode == "link":
        (t / "inside.raw").write_bytes(INSIDE)
        os.symlink("inside.raw", str(t / "base.raw"))
        name, args = "base.raw", (str(t / "base.raw"), "inside.raw", "../outside/secret.raw")
    else:
        (t / "d").mkdir()
        (t / "d" / "base.raw").write_bytes(INSIDE)
        (tree / "outside" / "sub" / "base.raw").write_bytes(SECRET)
        name, args = "d/base.raw", (str(t / "d"), str(t / "d.real"), str(tree / "outside" / "sub"))
    img = t / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", img, "1M")
    result = tree / "race.json"
    proc = subprocess.run([sys.executable, "-c", RACE_CHILD, str(result), mode, *args, str(img), str(t / "out.raw")],
                          cwd=str(t), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(result.read_text())
    runs = data["runs"]
    inside = hashlib.sha256(INSIDE).hexdigest()
    secret = hashlib.sha256(SECRET).hexdigest()
    leaked = [r for r in runs if r["sha"] == secret]
    assert not leaked, "%d of %d converts read the outside file" % (len(leaked), len(runs))
    for r in runs:
        if r["rc"] == 0:
            assert r["sha"] == inside, r
        else:
            lines = r["stderr"].splitlines()
            assert r["rc"] == 1, r
            assert len(lines) == 1, r
            assert lines[0].startswith("vdisk: convert: "), r
    assert len(runs) >= 20 and any(r["rc"] == 0 for r in runs), runs[:5]
    if mode == "link":
        # what was opened is the checked real path, never the symlink itself nor anything outside
        outside = os.path.realpath(str(tree / "outside"))
        opened = [os.path.join(str(t), p) for p in data["opened"]]
        assert str(t / "inside.raw") in opened, opened
        assert not [p for p in opened if p == str(t / "base.raw") or p.startswith(outside + os.sep)], opened
    assert (tree / "outside" / "secret.raw").read_bytes() == SECRET
