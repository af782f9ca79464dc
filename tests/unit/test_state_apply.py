"""state/observe, state/apply and state/image on real files, verified with qemu-img."""
import json
import os

import helpers
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError, InvalidOption
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.apply import apply
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.content import (
    converted_content_matches, snapshot_matches_active)
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import apply_image, plan_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.plan import plan_convert, plan_snapshot
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import image_spec

M = 1 << 20


def qinfo(path):
    proc = helpers.qemu_img("info", "--output=json", path, check=True)
    return json.loads(proc.stdout)


def clean(path):
    result = helpers.qemu_check(path)
    assert result["rc"] == 0, result


def run(tmp_path, check_mode=False, **fields):
    return apply_image(image_spec(fields, base_dir=str(tmp_path)), check_mode=check_mode)


def test_create_idempotent_grow_shrink(tmp_path):
    disk = str(tmp_path / "a.qcow2")
    r = run(tmp_path, check_mode=True, path="a.qcow2", size="64M")
    assert r.changed
    assert not os.path.exists(disk)
    assert r.after["virtual-size"] == 64 * M
    assert not os.listdir(tmp_path)
    r = run(tmp_path, path="a.qcow2", size="64M", options={"cluster_size": "128K"})
    assert [a.kind for a in r.actions] == ["create"]
    info = qinfo(disk)
    assert info["virtual-size"] == 64 * M and info["cluster-size"] == 128 * 1024
    assert not run(tmp_path, path="a.qcow2", size="64M", options={"cluster_size": "128K"}).changed
    helpers.qemu_io("qcow2", disk, "write -P 7 0 1M")
    r = run(tmp_path, path="a.qcow2", size="96M")
    assert [a.kind for a in r.actions] == ["grow"] and r.before["virtual-size"] == 64 * M
    assert qinfo(disk)["virtual-size"] == 96 * M
    with pytest.raises(InvalidOption, match="allow_shrink"):
        run(tmp_path, path="a.qcow2", size="32M")
    assert qinfo(disk)["virtual-size"] == 96 * M
    run(tmp_path, path="a.qcow2", size="32M", allow_shrink=True)
    assert qinfo(disk)["virtual-size"] == 32 * M
    helpers.qemu_io("qcow2", disk, "read -P 7 0 1M")
    clean(disk)


def test_amend_and_recreate(tmp_path):
    disk = str(tmp_path / "a.qcow2")
    run(tmp_path, path="a.qcow2", size="16M")
    r = run(tmp_path, check_mode=True, path="a.qcow2", options={"lazy_refcounts": True})
    assert [a.kind for a in r.actions] == ["amend"] and r.after["options"]["lazy_refcounts"] is True
    assert qinfo(disk)["format-specific"]["data"]["lazy-refcounts"] is False
    run(tmp_path, path="a.qcow2", options={"lazy_refcounts": True, "refcount_bits": 32})
    data = qinfo(disk)["format-specific"]["data"]
    assert data["lazy-refcounts"] is True and data["refcount-bits"] == 32
    assert not run(tmp_path, path="a.qcow2", options={"lazy_refcounts": True, "refcount_bits": 32}).changed
    clean(disk)
    with pytest.raises(InvalidOption, match="recreate"):
        run(tmp_path, path="a.qcow2", format="raw")
    assert qinfo(disk)["format"] == "qcow2"
    r = run(tmp_path, check_mode=True, path="a.qcow2", format="raw", recreate=True)
    assert [a.kind for a in r.actions] == ["replace"] and qinfo(disk)["format"] == "qcow2"
    run(tmp_path, path="a.qcow2", format="raw", recreate=True)
    info = qinfo(disk)
    assert info["format"] == "raw" and info["virtual-size"] == 16 * M
    assert not run(tmp_path, path="a.qcow2", format="raw", recreate=True).changed
    assert sorted(os.listdir(tmp_path)) == ["a.qcow2"]      # no temporary file left behind


def test_snapshots_and_absent(tmp_path):
    disk = str(tmp_path / "s.qcow2")
    run(tmp_path, path="s.qcow2", size="8M", snapshots=["one", "two"])
    assert [s["name"] for s in qinfo(disk)["snapshots"]] == ["one", "two"]
    assert not run(tmp_path, path="s.qcow2", snapshots=["two"]).changed
    r = run(tmp_path, path="s.qcow2", snapshots=["two", "three"], prune_snapshots=True)
    assert [a.kind for a in r.actions] == ["snapshot_delete", "snapshot_create"]
    assert [s["name"] for s in qinfo(disk)["snapshots"]] == ["two", "three"]
    clean(disk)
    r = run(tmp_path, check_mode=True, path="s.qcow2", state="absent")
    assert r.changed and os.path.exists(disk)
    r = run(tmp_path, path="s.qcow2", state="absent")
    assert r.changed
    assert not os.path.exists(disk)
    assert r.after == {"path": disk, "state": "absent"}
    assert not run(tmp_path, path="s.qcow2", state="absent").changed


def test_overlay_takes_size_from_backing(tmp_path):
    run(tmp_path, path="base.qcow2", size="24M")
    r = run(tmp_path, check_mode=True, path="over.qcow2", backing_file="base.qcow2")
    assert r.after["virtual-size"] == 24 * M and r.after["backing-filename-format"] == "qcow2"
    run(tmp_path, path="over.qcow2", backing_file="base.qcow2")
    info = qinfo(str(tmp_path / "over.qcow2"))
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 24 * M
    assert not run(tmp_path, path="over.qcow2", backing_file="base.qcow2").changed
    # growing an overlay opens its chain: the part past the old end reads as zeros
    run(tmp_path, path="over.qcow2", backing_file="base.qcow2", size="32M")
    clean(str(tmp_path / "over.qcow2"))


def test_create_from_source(tmp_path):
    src = str(tmp_path / "src.raw")
    helpers.qemu_img("create", "-f", "raw", src, "4M", check=True)
    helpers.qemu_io("raw", src, "write -P 0x5a 0 256k", "write -P 0xa5 3M 64k")
    r = run(tmp_path, path="c.qcow2", source="src.raw", compress=True, snapshots=["orig"])
    assert [a.kind for a in r.actions] == ["convert", "snapshot_create"]
    assert helpers.qemu_compare(str(tmp_path / "c.qcow2"), src)
    clean(str(tmp_path / "c.qcow2"))
    assert not run(tmp_path, path="c.qcow2", source="src.raw", compress=True, snapshots=["orig"]).changed


def test_missing_source_writes_nothing(tmp_path):
    with pytest.raises(ImageError, match="missing.raw"):
        run(tmp_path, path="c.qcow2", source="missing.raw")
    assert not os.listdir(tmp_path)


def test_observe(tmp_path):
    disk = str(tmp_path / "o.qcow2")
    helpers.qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", disk, "3M", check=True)
    obs = observe(disk)
    assert obs.exists
    assert obs.format == "qcow2"
    assert obs.virtual_size == 3 * M
    assert obs.options["compat"] == "0.10" and obs.options["cluster_size"] == 4096
    assert obs.options["lazy_refcounts"] is False
    assert not observe(str(tmp_path / "none")).exists
    os.mkdir(str(tmp_path / "dir"))
    with pytest.raises(ImageError):
        observe(str(tmp_path / "dir"))


def test_snapshot_applied_idempotence(tmp_path):
    disk = str(tmp_path / "s.qcow2")
    helpers.qemu_img("create", "-f", "qcow2", disk, "8M", check=True)
    helpers.qemu_io("qcow2", disk, "write -P 0x11 0 64k")
    apply(plan_snapshot(observe(disk), "pristine", "present"))
    assert snapshot_matches_active(disk, "pristine")
    helpers.qemu_io("qcow2", disk, "write -P 0x22 0 64k")
    assert not snapshot_matches_active(disk, "pristine")
    actions = plan_snapshot(observe(disk), "pristine", "applied", lambda: snapshot_matches_active(disk, "pristine"))
    assert [a.kind for a in actions] == ["snapshot_apply"]
    apply(actions)
    helpers.qemu_io("qcow2", disk, "read -P 0x11 0 64k")
    assert snapshot_matches_active(disk, "pristine")
    assert plan_snapshot(observe(disk), "pristine", "applied", lambda: snapshot_matches_active(disk, "pristine")) \
        == []
    # the same data written again (new clusters, same content) still equals the snapshot
    helpers.qemu_io("qcow2", disk, "write -P 0x11 0 64k")
    assert snapshot_matches_active(disk, "pristine")
    apply(plan_snapshot(observe(disk), "pristine", "absent"))
    assert "snapshots" not in qinfo(disk)
    clean(disk)


def test_convert_compare(tmp_path):
    src, dest = str(tmp_path / "src.raw"), str(tmp_path / "d.qcow2")
    helpers.qemu_img("create", "-f", "raw", src, "4M", check=True)
    helpers.qemu_io("raw", src, "write -P 0x5a 0 256k")

    def actions(on_exists="compare", **opts):
        return plan_convert(observe(src, "raw"), observe(dest), "qcow2", opts, on_exists,
                            same_content=lambda: converted_content_matches(src, dest, "raw", "qcow2"))
    first = actions()
    assert [a.kind for a in first] == ["convert"]
    apply(first)
    assert helpers.qemu_compare(dest, src)
    assert actions() == [] and actions(cluster_size=65536) == []
    assert len(actions(cluster_size=4096)) == 1
    helpers.qemu_io("raw", src, "write -P 0x33 1M 4k")
    again = actions()
    assert len(again) == 1 and again[0].description.startswith("rewrite")
    assert actions("skip") == []
    apply(again)
    assert helpers.qemu_compare(dest, src) and actions() == []
    clean(dest)


def test_plan_image_reads_only(tmp_path):
    disk = str(tmp_path / "a.qcow2")
    run(tmp_path, path="a.qcow2", size="1M")
    before = os.stat(disk)
    r = plan_image(image_spec({"path": disk, "size": "2M", "snapshots": ["x"], "options": {"lazy_refcounts": 1}}))
    assert [a.kind for a in r.actions] == ["amend", "grow", "snapshot_create"]
    after = os.stat(disk)
    assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)
