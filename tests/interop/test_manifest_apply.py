"""vdisk apply against the qemu-img oracle: every action kind, idempotence, drift, order, a failure mid-run."""
import contextlib
import json
import os
import shutil
import subprocess
import textwrap

import helpers
import pytest

M = 1 << 20


def qemu_img(*args):
    return helpers.qemu_img(*[str(a) for a in args], check=True)


def info(path):
    return helpers.qemu_info(str(path))


def clean(path, fmt="qcow2"):
    result = helpers.qemu_check(str(path), fmt)
    assert result["rc"] == 0, result


def write_manifest(directory, text, name="manifest.yml"):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    return path


def vdisk(*args):
    return helpers.vdisk_cli(*args)


def test_apply_every_action_kind(tmp_path):
    d = tmp_path
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "64M")
    helpers.qemu_io("qcow2", str(d / "base.qcow2"), "write -P 7 0 1M", "write -P 9 63M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=off", d / "lazy.qcow2", "8M")
    os.chmod(str(d / "lazy.qcow2"), 0o644)
    qemu_img("create", "-q", "-f", "qcow2", d / "snap.qcow2", "8M")
    qemu_img("snapshot", "-c", "old", d / "snap.qcow2")
    qemu_img("create", "-q", "-f", "raw", d / "disk.img", "32M")
    qemu_img("create", "-q", "-f", "qcow2", d / "gone.qcow2", "1G")
    qemu_img("create", "-q", "-f", "qcow2", d / "big.qcow2", "64M")
    manifest = write_manifest(d, """
        version: 1
        images:
          - {path: overlay.qcow2, backing_file: new.qcow2, backing_format: qcow2}
          - {path: base.qcow2, size: 128M}
          - {path: lazy.qcow2, options: {lazy_refcounts: true}, mode: "0600"}
          - {path: snap.qcow2, snapshots: [new], prune_snapshots: true}
          - {path: disk.img, size: 32M, recreate: true}
          - {path: gone.qcow2, state: absent}
          - {path: new.qcow2, size: 16M, options: {cluster_size: 128K}}
          - {path: clone/base.raw, format: raw, source: base.qcow2}
          - {path: packed.qcow2, source: base.qcow2, compress: true}
          - {path: big.qcow2, size: 32M, allow_shrink: true}
        """)
    proc = vdisk("apply", manifest)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines()[-1] == "Apply complete: 12 actions done."
    # grow keeps the data and zero-fills the new end
    assert info(d / "base.qcow2")["virtual-size"] == 128 * M
    helpers.qemu_io("qcow2", str(d / "base.qcow2"), "read -P 7 0 1M", "read -P 9 63M 1M", "read -P 0 64M 64M")
    # amend and file attributes
    lazy = info(d / "lazy.qcow2")
    assert lazy["format-specific"]["data"]["lazy-refcounts"] is True
    assert os.stat(str(d / "lazy.qcow2")).st_mode & 0o7777 == 0o600
    # snapshot create and delete
    assert [s["name"] for s in info(d / "snap.qcow2")["snapshots"]] == ["new"]
    # replace via recreate
    assert info(d / "disk.img")["format"] == "qcow2" and info(d / "disk.img")["virtual-size"] == 32 * M
    # delete via state: absent
    assert not os.path.exists(str(d / "gone.qcow2"))
    # create with options, and an overlay whose size comes from its backing file made in the same run
    assert info(d / "new.qcow2")["cluster-size"] == 128 * 1024
    overlay = info(d / "overlay.qcow2")
    assert overlay["virtual-size"] == 16 * M and overlay["backing-filename"] == "new.qcow2"
    assert overlay["backing-filename-format"] == "qcow2"
    # convert (plain and compressed) from the grown image
    assert info(d / "clone/base.raw")["format"] == "raw"
    assert helpers.qemu_compare(str(d / "base.qcow2"), str(d / "clone/base.raw"), "qcow2", "raw")
    assert helpers.qemu_compare(str(d / "base.qcow2"), str(d / "packed.qcow2"), "qcow2", "qcow2")
    # shrink
    assert info(d / "big.qcow2")["virtual-size"] == 32 * M
    for name in ("base", "lazy", "snap", "new", "overlay", "packed", "big"):
        clean(d / ("%s.qcow2" % name))
    clean(d / "disk.img")
    # idempotent: plan right after apply changes nothing, and so does apply
    proc = vdisk("plan", manifest)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, "No changes: 10 images are as the manifests describe.\n", "")
    proc = vdisk("apply", "--output=json", manifest)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"format_version": 1, "ok": True, "done": [],
                                                                "failed": None, "not_done": [], "diagnostics": []}


def test_drift_made_outside_vdisk_shows_up(tmp_path):
    manifest = write_manifest(tmp_path, """
        version: 1
        images:
          - {path: a.qcow2, size: 64M, snapshots: [s]}
          - {path: b.qcow2, size: 16M, recreate: true}
          - {path: c.qcow2, size: 16M}
        """)
    assert vdisk("apply", manifest).returncode == 0
    assert vdisk("plan", manifest).returncode == 0
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("resize", "-q", "--shrink", a, "32M")
    qemu_img("snapshot", "-d", "s", a)
    qemu_img("convert", "-O", "raw", b, tmp_path / "b.raw")
    os.replace(str(tmp_path / "b.raw"), str(b))
    qemu_img("resize", "-q", tmp_path / "c.qcow2", "48M")
    proc = vdisk("plan", manifest)
    assert proc.returncode == 1
    assert proc.stderr == (
        "vdisk: plan: %s: line 5: images[2] (c.qcow2): allow_shrink: the image is 48 MiB, larger than the requested "
        "16 MiB; shrinking loses the data past the new end: set allow_shrink: true to shrink it\n" % manifest)
    os.unlink(str(tmp_path / "c.qcow2"))
    proc = vdisk("plan", manifest)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == textwrap.dedent("""\
        ~ a.qcow2
            grow: virtual-size 32 MiB -> 64 MiB
            create snapshot 's'
        -/+ b.qcow2
            replace: qcow2, 16 MiB (format: raw -> qcow2)
        + c.qcow2
            create: qcow2, 16 MiB

        Plan: 1 to create, 1 to update, 1 to replace, 0 to delete; 0 unchanged.
        """)
    assert vdisk("apply", manifest).returncode == 0
    assert info(a)["virtual-size"] == 64 * M and [s["name"] for s in info(a)["snapshots"]] == ["s"]
    assert info(b)["format"] == "qcow2"
    assert vdisk("plan", manifest).returncode == 0


def test_dependency_order_across_manifests(tmp_path):
    golden = tmp_path / "golden"
    golden.mkdir()
    # the overlays' manifest comes first and lists the top of the chain first
    vms = write_manifest(tmp_path, """
        version: 1
        allow_paths: [golden]
        images:
          - {path: clone.qcow2, source: top.qcow2}
          - {path: top.qcow2, backing_file: mid.qcow2, backing_format: qcow2}
          - {path: mid.qcow2, backing_file: golden/base.qcow2, backing_format: qcow2}
        """, "vms.yml")
    base = write_manifest(golden, """
        version: 1
        images:
          - {path: base.qcow2, size: 8M}
        """, "base.yml")
    proc = vdisk("apply", vms, base)
    assert proc.returncode == 0, proc.stderr
    # images are named as their own manifest writes them
    assert [line.split(":")[0] for line in proc.stdout.splitlines()[:4]] == [
        "done base.qcow2", "done mid.qcow2", "done top.qcow2", "done clone.qcow2"]
    chain = helpers.qemu_info(str(tmp_path / "top.qcow2"), None, "--backing-chain")
    assert [os.path.basename(i["filename"]) for i in chain] == ["top.qcow2", "mid.qcow2", "base.qcow2"]
    assert info(tmp_path / "clone.qcow2")["virtual-size"] == 8 * M and "backing-filename" not in info(
        tmp_path / "clone.qcow2")
    assert vdisk("plan", vms, base).returncode == 0


@contextlib.contextmanager
def unwritable(directory):
    """A directory nobody can create files in: mode 0555, or immutable (chattr +i) when running as root."""
    directory.mkdir()
    if os.getuid() != 0:
        os.chmod(str(directory), 0o555)
        try:
            yield
        finally:
            os.chmod(str(directory), 0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: no directory is unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_failure_mid_apply_keeps_earlier_images_and_reports(tmp_path):
    manifest = write_manifest(tmp_path, """
        version: 1
        images:
          - {path: base.qcow2, size: 16M, snapshots: [pristine]}
          - {path: locked/vm.qcow2, backing_file: ../base.qcow2, backing_format: qcow2}
          - {path: after.qcow2, size: 8M}
        """)
    with unwritable(tmp_path / "locked"):
        proc = vdisk("apply", manifest)
        assert proc.returncode == 1
        lines = proc.stdout.splitlines()
        assert lines[:2] == ["done base.qcow2: create: qcow2, 16 MiB", "done base.qcow2: create snapshot 'pristine'"]
        assert lines[2].startswith("FAILED locked/vm.qcow2: create: qcow2, 16 MiB; backing file ../base.qcow2: ")
        assert lines[3:] == ["not done after.qcow2: create: qcow2, 8 MiB", "",
                             "Apply failed: 2 actions done, 1 failed, 1 not done."]
        assert proc.stderr.startswith("vdisk: apply: %s: images[1] (locked/vm.qcow2): " % manifest)
        # earlier images intact, nothing half-made
        clean(tmp_path / "base.qcow2")
        assert [s["name"] for s in info(tmp_path / "base.qcow2")["snapshots"]] == ["pristine"]
        assert os.listdir(str(tmp_path / "locked")) == []
        assert not os.path.exists(str(tmp_path / "after.qcow2"))
        proc = vdisk("apply", "--output=json", manifest)
        report = json.loads(proc.stdout)
        assert proc.returncode == 1
        assert not report["ok"]
        assert report["done"] == []
        assert report["failed"]["name"] == "locked/vm.qcow2" and report["failed"]["action"] == "create"
        assert [(i["name"], i["action"]) for i in report["not_done"]] == [("after.qcow2", "create")]
        assert vdisk("plan", manifest).returncode == 2
    # the next run finishes the job
    proc = vdisk("apply", manifest)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()[:2]] == ["done locked/vm.qcow2",
                                                                            "done after.qcow2"]
    clean(tmp_path / "locked/vm.qcow2")
    assert vdisk("plan", manifest).returncode == 0
