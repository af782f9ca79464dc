"""Overlay drift, without the CLI: an overlay without ``size`` keeps its backing file's size, so a backing
file grown (by the manifest or outside vdisk) grows it, and an overlay resized with qemu-img is refused
(or shrunk with allow_shrink) -- planned with manifest.run.plan_all, applied, checked with qemu-img."""
import os
import textwrap

import helpers

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_manifests
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.run import apply_all, plan_all

M = 1 << 20


def write_manifest(directory, text):
    path = os.path.join(str(directory), "manifest.yml")
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    return path


def load(path):
    loaded = load_manifests([path])
    assert loaded.valid, [str(p) for p in loaded.problems]
    return loaded


def plans_by_name(path):
    return {p.entry.name: p for p in plan_all(load(path))}


def kinds(plan):
    return [a.kind for a in plan.actions]


def apply(path):
    report = apply_all(load(path))
    assert report.ok, report.failed
    return report


def size(path):
    return helpers.qemu_info(str(path))["virtual-size"]


def clean(path):
    result = helpers.qemu_check(str(path))
    assert result["rc"] == 0, result


OVERLAY = """
    version: 1
    images:
      - {path: vm.qcow2, backing_file: base.qcow2, backing_format: qcow2%s}
      - {path: base.qcow2, size: %s}
    """


def test_a_base_grown_by_the_manifest_grows_its_overlay_in_the_same_run(tmp_path):
    manifest = write_manifest(tmp_path, OVERLAY % ("", "64M"))
    apply(manifest)
    helpers.qemu_io("qcow2", str(tmp_path / "base.qcow2"), "write -P 4 63M 1M")
    manifest = write_manifest(tmp_path, OVERLAY % ("", "128M"))
    plans = plans_by_name(manifest)
    # the overlay is planned against the base as this run leaves it (predicted, not yet grown)
    assert kinds(plans["base.qcow2"]) == ["grow"] and kinds(plans["vm.qcow2"]) == ["grow"]
    assert plans["vm.qcow2"].actions[0].after == {"virtual-size": 128 * M}
    apply(manifest)
    assert size(tmp_path / "vm.qcow2") == size(tmp_path / "base.qcow2") == 128 * M
    helpers.qemu_io("qcow2", str(tmp_path / "vm.qcow2"), "read -P 4 63M 1M", "read -P 0 64M 64M")
    clean(tmp_path / "vm.qcow2")
    assert not any(p.actions for p in plans_by_name(manifest).values())


def test_a_base_grown_outside_vdisk_grows_its_overlay(tmp_path):
    helpers.qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "golden.qcow2"), "32M", check=True)
    manifest = write_manifest(tmp_path, """
        version: 1
        images:
          - {path: vm.qcow2, backing_file: golden.qcow2}
        """)
    apply(manifest)
    assert not plans_by_name(manifest)["vm.qcow2"].actions
    helpers.qemu_img("resize", "-q", str(tmp_path / "golden.qcow2"), "+32M", check=True)
    plan = plans_by_name(manifest)["vm.qcow2"]
    assert kinds(plan) == ["grow"]
    assert plan.before["virtual-size"] == 32 * M
    assert plan.after["virtual-size"] == 64 * M
    apply(manifest)
    assert size(tmp_path / "vm.qcow2") == 64 * M
    clean(tmp_path / "vm.qcow2")
    assert not plans_by_name(manifest)["vm.qcow2"].actions


def test_an_overlay_resized_outside_vdisk_is_refused_then_shrunk_with_allow_shrink(tmp_path):
    manifest = write_manifest(tmp_path, OVERLAY % ("", "64M"))
    apply(manifest)
    helpers.qemu_img("resize", "-q", str(tmp_path / "vm.qcow2"), "+1G", check=True)
    plan = plans_by_name(manifest)["vm.qcow2"]
    assert plan.actions == [] and plan.error_field == "allow_shrink"
    assert plan.error == ("allow_shrink: the image is 1.06 GiB, larger than its backing file's 64 MiB (an overlay "
                          "without size keeps its backing file's size); shrinking loses the data past the new end: "
                          "set allow_shrink: true to shrink it")
    report = apply_all(load(manifest))
    assert report.failed is not None and report.done == []
    assert size(tmp_path / "vm.qcow2") == 64 * M + 1024 * M         # refused: nothing changed
    manifest = write_manifest(tmp_path, OVERLAY % (", allow_shrink: true", "64M"))
    plan = plans_by_name(manifest)["vm.qcow2"]
    assert kinds(plan) == ["shrink"] and plan.after["virtual-size"] == 64 * M
    apply(manifest)
    assert size(tmp_path / "vm.qcow2") == 64 * M
    clean(tmp_path / "vm.qcow2")


def test_an_overlay_with_a_size_is_not_sized_by_its_backing_file(tmp_path):
    manifest = write_manifest(tmp_path, OVERLAY % (", size: 96M", "64M"))
    apply(manifest)
    assert size(tmp_path / "vm.qcow2") == 96 * M
    helpers.qemu_img("resize", "-q", str(tmp_path / "base.qcow2"), "80M", check=True)
    plans = plans_by_name(manifest)
    assert plans["vm.qcow2"].actions == [] and plans["base.qcow2"].error_field == "allow_shrink"
