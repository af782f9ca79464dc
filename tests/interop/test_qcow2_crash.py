"""Crash tests: vdisk is killed (SIGKILL) at a random host write of an in-place operation.

A child process runs the operation with ``HostFile.pwrite`` instrumented to kill the
process just before its N-th write (N drawn from a seeded generator, printed on
failure).  Afterwards ``qemu-img check`` must find no corruption (leaks are allowed)
and the guest content must be the old or the new one.

Snapshot operations are atomic (a new state written beside the old one, then one
header write), so for them even leaks would be a failure: qemu-img check must be clean.
"""
import os
import random
import shutil
import subprocess
import sys

import pytest

RUNS_PER_OPERATION = int(os.environ.get("VDISK_CRASH_RUNS", "60"))
SEED = int(os.environ.get("VDISK_CRASH_SEED", "20261125"))

CHILD = r"""
import os, signal, sys
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import io as vio
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import open_image, close_chain
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.commit import commit
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver

kill_at = int(sys.argv[2])
calls = [0]
real = vio.HostFile.pwrite
def pwrite(self, data, offset):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, data, offset)
vio.HostFile.pwrite = pwrite

op, path = sys.argv[1], sys.argv[3]
if op == "commit":
    commit(path)
else:
    img = open_image(path, "qcow2", writable=True)
    if op == "snapshot-create":
        img.create_snapshot("new")
    elif op == "snapshot-delete":
        img.delete_snapshot("old")
    elif op == "snapshot-apply":
        img.apply_snapshot("old")
    elif op == "resize":
        img.resize(40 << 20)
    elif op == "shrink":
        img.resize(1 << 20, shrink=True)
    elif op == "amend-refcount-bits":
        img.amend(get_driver("qcow2").parse_options({"refcount_bits": "64"}))
    elif op == "amend-compat":
        img.amend(get_driver("qcow2").parse_options({"compat": "0.10"}))
    close_chain(img)
print("WRITES", calls[0])
"""

OPERATIONS = ["snapshot-create", "snapshot-delete", "snapshot-apply", "resize", "shrink", "commit",
              "amend-refcount-bits", "amend-compat"]


def run(*args, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check)


def child(op, kill_at, path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", CHILD, op, str(kill_at), str(path)], capture_output=True,
                          text=True, env=env)


def guest(path, tmp_path):
    out = tmp_path / "guest.raw"
    run("qemu-img", "convert", "-O", "raw", path, out)
    return out.read_bytes()


def build(tmp_path):
    """A 4 MiB image with data, a snapshot 'old' and more data on top; backed by base.qcow2."""
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-f", "qcow2", base, "4M")
    run("qemu-io", "-c", "write -P 0x10 0 4M", base)
    path = tmp_path / "img.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2",
        path, "4M")
    run("qemu-io", "-c", "write -P 0x21 0 1M", "-c", "write -z 1536k 64k", path)
    run("qemu-img", "snapshot", "-c", "old", path)
    run("qemu-io", "-c", "write -P 0x22 512k 1M", "-c", "write -P 0x23 3M 100k", path)
    return path, base


def allowed_contents(op, old, new):
    """The guest views an interrupted operation may leave."""
    if op == "resize":
        return {old, old + bytes(len(new) - len(old)), new}
    if op == "shrink":
        # the size field is written last: old size (possibly with the tail already dropped) or new
        return None
    return {old, new}


@pytest.mark.parametrize("op", OPERATIONS)
def test_sigkill_leaves_no_corruption(tmp_path, op):
    path, base = build(tmp_path)
    pristine = tmp_path / "pristine.qcow2"
    pristine_base = tmp_path / "pristine-base.qcow2"
    shutil.copy(path, pristine)
    shutil.copy(base, pristine_base)
    old = guest(path, tmp_path)
    full = child(op, 0, path)
    assert full.returncode == 0, full.stderr
    writes = int(full.stdout.split()[-1])
    assert writes > 0
    new = guest(path, tmp_path)
    rnd = random.Random("%s-%s" % (SEED, op))
    points = sorted({rnd.randint(1, writes) for _ in range(RUNS_PER_OPERATION)})
    print("crash test: seed %s, %s, %d kill points of %d writes" % (SEED, op, len(points), writes))
    for kill_at in points:
        shutil.copy(pristine, path)
        shutil.copy(pristine_base, base)
        result = child(op, kill_at, path)
        assert result.returncode == -9, "seed %s op %s write %d: child did not die: %s" % (
            SEED, op, kill_at, result.stderr)
        checked = run("qemu-img", "check", "--output=json", path, check=False)
        allowed_codes = (0,) if op.startswith("snapshot") else (0, 3)
        assert checked.returncode in allowed_codes, "seed %s op %s killed at write %d/%d: %s%s" % (
            SEED, op, kill_at, writes, checked.stdout, checked.stderr)
        if op == "commit":
            checked = run("qemu-img", "check", path, check=False)   # the base takes writes too
            assert checked.returncode in (0, 3)
        content = guest(path, tmp_path)
        allowed = allowed_contents(op, old, new)
        if allowed is None:
            assert content[:len(new)] == new, "seed %s op %s write %d" % (SEED, op, kill_at)
        else:
            assert content in allowed, "seed %s op %s killed at write %d/%d: unexpected content" % (
                SEED, op, kill_at, writes)
