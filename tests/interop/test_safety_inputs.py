"""Hostile or absurd operator input on the command line and in manifests: one line, never a traceback.

Issue 14 (items 6, 8, 9).  Every refusal here is checked the same way (:func:`refused`): a
non-zero exit, exactly one line on stderr starting ``vdisk:``, no ``Traceback``, and nothing
left behind (the directory holds the same files with the same content as before).  Where
qemu-img has an answer (a 70000-byte snapshot name, a missing backing file), vdisk's is
compared with it in the same test.
"""
import hashlib
import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import helpers

VDISK = [sys.executable, "-m", helpers.CLI_MODULE]
M = 1 << 20
HUGE = "9" * 5000               # over Python's 4300-digit str->int limit


def vdisk(*args, cwd, timeout=60, limit_as=None):
    def limits():
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    return subprocess.run(VDISK + [str(a) for a in args], capture_output=True, text=True, cwd=str(cwd),
                          timeout=timeout, preexec_fn=limits if limit_as else None)


def qemu(*args, cwd, check=True):
    return subprocess.run(["qemu-img"] + [str(a) for a in args], capture_output=True, text=True, cwd=str(cwd),
                          check=check)


def listing(directory):
    """Every file under *directory* with its content's digest: what "nothing left behind" compares."""
    out = {}
    for root, dirs, files in os.walk(str(directory)):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, str(directory))
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = "dir" if os.path.isdir(path) else "other"
    return out


def refused(proc, *words):
    """Non-zero exit, exactly one line on stderr starting ``vdisk:``, no traceback; *words* in it."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("vdisk:"), lines[0]
    assert len(lines[0]) < 1000, lines[0][:300]      # the 5000 digits are not echoed back
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def manifest(directory, text, name="m.yml"):
    path = os.path.join(str(directory), name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture()
def work(tmp_path):
    qemu("create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=tmp_path)
    qemu("create", "-q", "-f", "raw", "disk.raw", "1M", cwd=tmp_path)
    return tmp_path


# -- 6a: a NUL byte in a file name of a manifest ------------------------------------------------
NUL_CASES = {
    "path": '  - {path: "a\\0b.qcow2", size: 1M}\n',
    "backing_file": '  - {path: a.qcow2, size: 1M, backing_file: "base\\0.qcow2", backing_format: qcow2}\n',
    "source": '  - {path: a.qcow2, source: "base.qcow2\\0"}\n',
    "allow_paths": None,
}


@pytest.mark.parametrize("command", ["validate", "plan", "apply"])
@pytest.mark.parametrize("field", sorted(NUL_CASES))
def test_nul_byte_in_a_manifest_file_name(work, command, field):
    if field == "allow_paths":
        text = 'version: 1\nallow_paths: ["/tmp\\0/x"]\nimages:\n  - {path: a.qcow2, size: 1M}\n'
    else:
        text = "version: 1\nimages:\n" + NUL_CASES[field]
    path = manifest(work, text)
    before = listing(work)
    line = refused(vdisk(command, path, cwd=work), "m.yml", field, "NUL")
    assert "\0" not in line
    assert listing(work) == before


def test_raw_nul_byte_in_a_manifest(work):
    with open(str(work / "m.yml"), "wb") as f:
        f.write(b"version: 1\nimages:\n  - path: a\0b.qcow2\n    size: 1M\n")
    before = listing(work)
    refused(vdisk("validate", "m.yml", cwd=work), "m.yml")
    refused(vdisk("apply", "m.yml", cwd=work), "m.yml")
    assert listing(work) == before


# -- 6b: numbers over Python's 4300-digit limit --------------------------------------------------
CLI_NUMBERS = {
    "create size": ["create", "-f", "qcow2", "x.qcow2", HUGE],
    "create -o size": ["create", "-f", "qcow2", "-o", "size=" + HUGE, "x.qcow2"],
    "create -o cluster_size": ["create", "-f", "qcow2", "-o", "cluster_size=" + HUGE, "x.qcow2", "1M"],
    "create -o refcount_bits": ["create", "-f", "qcow2", "-o", "refcount_bits=" + HUGE, "x.qcow2", "1M"],
    "create hex size": ["create", "-f", "raw", "x.raw", "0x" + "f" * 5000],
    "create fraction": ["create", "-f", "raw", "x.raw", HUGE + ".5M"],
    "resize": ["resize", "base.qcow2", HUGE],
    "resize +": ["resize", "base.qcow2", "+" + HUGE],
    "resize -": ["resize", "--shrink", "base.qcow2", "-" + HUGE],
    "measure --size": ["measure", "-O", "qcow2", "--size", HUGE],
    "measure -o cluster_size": ["measure", "-O", "qcow2", "-o", "cluster_size=" + HUGE, "--size", "1M"],
    "measure -o refcount_bits": ["measure", "-O", "qcow2", "-o", "refcount_bits=" + HUGE, "--size", "1M"],
    "convert -S": ["convert", "-S", HUGE, "-O", "raw", "base.qcow2", "out.raw"],
    "convert -m": ["convert", "-m", HUGE, "-O", "raw", "base.qcow2", "out.raw"],
    "convert -o cluster_size": ["convert", "-O", "qcow2", "-o", "cluster_size=" + HUGE, "base.qcow2", "o.qcow2"],
    "amend -o refcount_bits": ["amend", "-o", "refcount_bits=" + HUGE, "base.qcow2"],
}


@pytest.mark.parametrize("case", sorted(CLI_NUMBERS))
def test_a_5000_digit_number_on_the_command_line(work, case):
    argv = CLI_NUMBERS[case]
    before = listing(work)
    refused(vdisk(*argv, cwd=work))
    assert listing(work) == before


@pytest.mark.parametrize("case,field", [("create size", "size"), ("create -o cluster_size", "cluster_size"),
                                        ("create -o refcount_bits", "refcount_bits"), ("resize", "size")])
def test_a_5000_digit_number_is_too_large_for_its_field(work, case, field):
    line = refused(vdisk(*CLI_NUMBERS[case], cwd=work), field)
    assert "too large" in line


def test_measure_says_what_qemu_img_says(work):
    mine = refused(vdisk(*CLI_NUMBERS["measure --size"], cwd=work))
    theirs = qemu(*CLI_NUMBERS["measure --size"], cwd=work, check=False)
    assert theirs.returncode == 1
    assert mine.split(": ", 2)[2] == theirs.stderr.strip().split(": ", 1)[1]


def test_leading_zeros_are_not_too_large(work):
    # qemu-img reads 0000...01M as 1 MiB; the digit bound counts significant digits only
    text = "0" * 5000 + "1M"
    proc = vdisk("create", "-f", "raw", "z.raw", text, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert qemu("create", "-f", "raw", "q.raw", text, cwd=work).returncode == 0
    assert os.path.getsize(str(work / "z.raw")) == os.path.getsize(str(work / "q.raw")) == M


MANIFEST_NUMBERS = {
    "size": "  - {path: a.qcow2, size: %s}\n" % HUGE,
    "quoted size": '  - {path: a.qcow2, size: "%s"}\n' % HUGE,
    "option": "  - {path: a.qcow2, size: 1M, options: {cluster_size: %s}}\n" % HUGE,
    "quoted option": '  - {path: a.qcow2, size: 1M, options: {cluster_size: "%s"}}\n' % HUGE,
    "int option": "  - {path: a.qcow2, size: 1M, options: {refcount_bits: %s}}\n" % HUGE,
    "block size": "  - path: a.qcow2\n    size: %s\n" % HUGE,
    "hex size": "  - {path: a.qcow2, size: 0x%s}\n" % ("f" * 5000),
}


@pytest.mark.parametrize("command", ["validate", "plan", "apply"])
@pytest.mark.parametrize("case", sorted(MANIFEST_NUMBERS))
def test_a_5000_digit_number_in_a_manifest(work, command, case):
    path = manifest(work, "version: 1\nimages:\n" + MANIFEST_NUMBERS[case])
    before = listing(work)
    field = "refcount_bits" if "int" in case else "cluster_size" if "option" in case else "size"
    line = refused(vdisk(command, path, cwd=work), "m.yml", "images[0] (a.qcow2)", field, "too large")
    assert listing(work) == before, line


# -- 6c: a snapshot name over 65535 bytes: qemu-img keeps its first 255 bytes --------------------
def snapshot_names(path, cwd):
    data = json.loads(qemu("info", "--output=json", path, cwd=cwd).stdout)
    return [(s["id"], s["name"]) for s in data.get("snapshots", [])]


def stored_names(path, cwd):
    proc = vdisk("info", "--output=json", path, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return [(s["id"], s["name"]) for s in json.loads(proc.stdout).get("snapshots", [])]


@pytest.mark.parametrize("name", ["a" * 70000, "b" * 65536, "c" * 256, "\u00e9" * 200, "x" * 255],
                         ids=["a70000", "b65536", "c256", "e-acute200", "x255"])
def test_long_snapshot_name_as_qemu_img(work, name):
    qemu("create", "-q", "-f", "qcow2", "q.qcow2", "1M", cwd=work)
    qemu("create", "-q", "-f", "qcow2", "v.qcow2", "1M", cwd=work)
    theirs = qemu("snapshot", "-c", name, "q.qcow2", cwd=work, check=False)
    mine = vdisk("snapshot", "-c", name, "v.qcow2", cwd=work)
    assert "Traceback" not in mine.stderr, mine.stderr[-2000:]
    assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr)
    assert snapshot_names("v.qcow2", work) == snapshot_names("q.qcow2", work)
    # qemu-img lists at most 255 bytes of a name whatever is stored: vdisk shows what is stored
    assert stored_names("v.qcow2", work) == stored_names("q.qcow2", work)
    assert len(stored_names("v.qcow2", work)[0][1].encode("utf-8")) <= 257
    for image in ("q.qcow2", "v.qcow2"):
        assert helpers.qemu_check(str(work / image))["rc"] == 0
    # the list and a second snapshot work on both images, and they still agree
    assert vdisk("snapshot", "-l", "v.qcow2", cwd=work).returncode == 0
    mine = vdisk("snapshot", "-c", "again", "q.qcow2", cwd=work)
    assert mine.returncode == 0, mine.stderr
    qemu("snapshot", "-c", "again", "v.qcow2", cwd=work)
    assert snapshot_names("v.qcow2", work) == snapshot_names("q.qcow2", work)
    assert stored_names("v.qcow2", work) == stored_names("q.qcow2", work)


def test_long_snapshot_name_in_a_manifest_is_refused(work):
    path = manifest(work, 'version: 1\nimages:\n  - {path: a.qcow2, size: 1M, snapshots: ["%s"]}\n' % ("s" * 300))
    before = listing(work)
    for command in ("validate", "plan", "apply"):
        refused(vdisk(command, path, cwd=work), "m.yml", "images[0] (a.qcow2)", "snapshots", "255")
    assert listing(work) == before


# -- 8: a backing file that does not exist --------------------------------------------------------
def test_create_refuses_a_missing_backing_file_as_qemu_img(work):
    before = listing(work)
    argv = ["create", "-f", "qcow2", "-b", "nope.qcow2", "-F", "qcow2", "v.qcow2", "1M"]
    theirs = qemu(*argv, cwd=work, check=False)
    assert theirs.returncode == 1 and "Could not open 'nope.qcow2': No such file or directory" in theirs.stderr
    assert listing(work) == before
    line = refused(vdisk(*argv, cwd=work), "v.qcow2", "Could not open 'nope.qcow2': No such file or directory",
                   "backing")
    assert listing(work) == before, line
    # without a size, and without -F: refused as well
    refused(vdisk("create", "-f", "qcow2", "-b", "nope.qcow2", "v.qcow2", cwd=work), "nope.qcow2")
    assert listing(work) == before


def test_missing_backing_file_is_looked_for_beside_the_new_image(work):
    os.mkdir(str(work / "sub"))
    before = listing(work)
    # base.qcow2 exists in the working directory, not in sub/: qemu-img looks in sub/
    argv = ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sub/v.qcow2", "1M"]
    theirs = qemu(*argv, cwd=work, check=False)
    assert theirs.returncode == 1 and "'sub/base.qcow2'" in theirs.stderr
    refused(vdisk(*argv, cwd=work), "'sub/base.qcow2'")
    assert listing(work) == before
    # and a backing file beside the new image is found (its size taken when none is given)
    qemu("create", "-q", "-f", "qcow2", "sub/b2.qcow2", "3M", cwd=work)
    proc = vdisk("create", "-f", "qcow2", "-b", "b2.qcow2", "-F", "qcow2", "sub/v.qcow2", cwd=work)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(qemu("info", "--output=json", "sub/v.qcow2", cwd=work).stdout)
    assert info["virtual-size"] == 3 * M and info["backing-filename"] == "b2.qcow2"


def test_missing_backing_of_the_backing_file_is_refused(work):
    qemu("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "mid.qcow2", "1M", cwd=work)
    before = listing(work)
    argv = ["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "1M"]
    assert qemu(*argv, cwd=work, check=False).returncode == 1
    refused(vdisk(*argv, cwd=work), "gone.qcow2")
    assert listing(work) == before


def test_create_u_accepts_a_missing_backing_file(work):
    argv = ["create", "-f", "qcow2", "-u", "-b", "nope.qcow2", "-F", "qcow2", "v.qcow2", "1M"]
    proc = vdisk(*argv, cwd=work)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(qemu("info", "--output=json", "v.qcow2", cwd=work).stdout)
    assert info["backing-filename"] == "nope.qcow2" and info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == M
    qemu("create", "-q", "-f", "qcow2", "nope.qcow2", "1M", cwd=work)      # now it opens, and checks clean
    assert helpers.qemu_check(str(work / "v.qcow2"))["rc"] == 0
    os.unlink(str(work / "nope.qcow2"))
    # -u needs a size and a backing format, as qemu-img's
    for bad in (["create", "-f", "qcow2", "-u", "-b", "nope.qcow2", "-F", "qcow2", "w.qcow2"],
                ["create", "-f", "qcow2", "-u", "-b", "nope.qcow2", "w.qcow2", "1M"]):
        assert qemu(*bad, cwd=work, check=False).returncode == 1
        refused(vdisk(*bad, cwd=work))
        assert not os.path.exists(str(work / "w.qcow2"))


@pytest.mark.parametrize("command", ["plan", "apply"])
@pytest.mark.parametrize("size", ["size: 1M, ", ""])
def test_manifest_with_a_missing_backing_file_is_refused(work, command, size):
    path = manifest(work, """
        version: 1
        images:
          - {path: first.qcow2, size: 1M}
          - {path: vms/v.qcow2, %sbacking_file: ../nope.qcow2, backing_format: qcow2}
        """ % size)
    before = listing(work)
    refused(vdisk(command, path, cwd=work), "m.yml", "images[1] (vms/v.qcow2)", "backing_file", "nope.qcow2")
    after = listing(work)
    after.pop(".m.yml.lock", None)          # apply planned under its lock (docs/manifest.md, Locking)
    assert after == before                  # not even vms/ nor first.qcow2: nothing is applied


# -- 9: manifests are bounded ---------------------------------------------------------------------
def test_a_17_mib_manifest_is_refused_fast(work):
    path = str(work / "big.yml")
    with open(path, "w") as f:
        f.write("version: 1\nimages:\n")
        line = "  - {path: a.qcow2, size: 1M}  # %s\n" % ("x" * 60)
        f.write(line * (17 * M // len(line) + 1))
    assert os.path.getsize(path) > 17 * M
    before = listing(work)
    for command in ("validate", "plan", "apply"):
        start = time.monotonic()
        proc = vdisk(command, path, cwd=work, limit_as=1 << 30)
        elapsed = time.monotonic() - start
        refused(proc, "big.yml", "16 MiB")
        assert elapsed < 5, elapsed      # the CLI's start-up included; the load itself: test_input_bounds
    assert listing(work) == before


def test_a_sparse_4_gib_manifest_is_not_read(work):
    path = str(work / "sparse.yml")
    with open(path, "wb") as f:
        f.truncate(4 << 30)
    refused(vdisk("validate", path, cwd=work, limit_as=512 * M, timeout=30), "sparse.yml", "16 MiB")


def test_dev_zero_as_manifest_is_bounded(work):
    refused(vdisk("validate", "/dev/zero", cwd=work, limit_as=512 * M, timeout=30), "/dev/zero", "16 MiB")


def test_a_fifo_as_manifest_does_not_hang(work):
    fifo = str(work / "m.yml")
    os.mkfifo(fifo)
    refused(vdisk("validate", fifo, cwd=work, timeout=20), "m.yml")


def test_a_manifest_from_a_pipe_is_read(work):
    # process substitution (vdisk plan <(generate)) still works: a pipe with a writer is read to its end
    fifo = str(work / "p.yml")
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "w") as f:
            time.sleep(0.3)
            f.write("version: 1\nimages:\n  - {path: %s, size: 1M}\n" % (work / "a.qcow2"))
    thread = threading.Thread(target=writer)
    thread.start()
    proc = vdisk("validate", fifo, cwd=work, timeout=20)
    thread.join()
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("nesting", ["flow", "block"])
def test_deep_nesting_names_the_manifest(work, nesting):
    if nesting == "flow":
        text = "version: 1\nimages:\n  - {path: a.qcow2, size: 1M, options: {x: %s%s}}\n" % ("[" * 5000, "]" * 5000)
    else:
        text = "version: 1\nimages:\n  - path: a.qcow2\n    options:\n" + "".join(
            "      %sk%d:\n" % ("  " * i, i) for i in range(1500))
    path = manifest(work, text, name="nest.yml")
    before = listing(work)
    for command in ("validate", "plan", "apply"):
        refused(vdisk(command, path, cwd=work), "nest.yml", "deep")
    assert listing(work) == before
