"""vdisk.images.image: create, idempotence, grow, shrink, recreate, amend, check mode, diff, absent, errors."""
import os
import stat

import pytest

pytest.importorskip("ansible.module_utils.basic")

from ansible_collections.vdisk.images.plugins.modules import image  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe  # noqa: E402

M = 1 << 20


def test_create_check_mode_then_idempotent(tmp_path, run_module):
    disk = str(tmp_path / "d.qcow2")
    failed, r = run_module(image, {"path": disk, "size": "64M"}, check_mode=True, diff=True)
    assert not failed
    assert r["changed"]
    assert not os.listdir(str(tmp_path))
    assert r["diff"]["before"]["state"] == "absent" and r["diff"]["after"]["virtual-size"] == 64 * M
    assert [a["action"] for a in r["actions"]] == ["create"] and r["image"] == {}
    failed, r = run_module(image, {"path": disk, "size": "64M", "mode": "0600"}, diff=True)
    assert not failed and r["changed"]
    assert r["image"]["format"] == "qcow2" and r["image"]["virtual-size"] == 64 * M
    assert stat.S_IMODE(os.stat(disk).st_mode) == 0o600
    for check_mode in (True, False):
        failed, r = run_module(image, {"path": disk, "size": "64M", "mode": "0600"}, check_mode=check_mode)
        assert not failed
        assert not r["changed"]
        assert r["actions"] == []


def test_grow_shrink(tmp_path, run_module):
    disk = str(tmp_path / "d.qcow2")
    run_module(image, {"path": disk, "size": "64M"})
    failed, r = run_module(image, {"path": disk, "size": "128M"}, check_mode=True)
    assert r["changed"] and observe(disk).virtual_size == 64 * M
    failed, r = run_module(image, {"path": disk, "size": "128M"}, diff=True)
    assert r["changed"] and r["diff"]["before"]["virtual-size"] == 64 * M
    assert r["diff"]["after"]["virtual-size"] == 128 * M and r["image"]["virtual-size"] == 128 * M
    failed, r = run_module(image, {"path": disk, "size": "32M"})
    assert failed
    assert "allow_shrink" in r["msg"]
    assert observe(disk).virtual_size == 128 * M
    failed, r = run_module(image, {"path": disk, "size": "32M", "allow_shrink": True})
    assert not failed
    assert r["changed"]
    assert observe(disk).virtual_size == 32 * M
    failed, r = run_module(image, {"path": disk, "size": 32 * M, "allow_shrink": True})
    assert not failed and not r["changed"]


def test_format_mismatch_and_recreate(tmp_path, run_module):
    disk = str(tmp_path / "d.qcow2")
    run_module(image, {"path": disk, "size": "4M"})
    failed, r = run_module(image, {"path": disk, "format": "raw"})
    assert failed
    assert "recreate" in r["msg"]
    assert "Traceback" not in r["msg"]
    assert observe(disk).format == "qcow2"
    failed, r = run_module(image, {"path": disk, "format": "raw", "recreate": True}, check_mode=True)
    assert r["changed"]
    assert r["actions"][0]["action"] == "replace"
    assert observe(disk).format == "qcow2"
    failed, r = run_module(image, {"path": disk, "format": "raw", "recreate": True})
    assert r["changed"]
    assert observe(disk).format == "raw"
    assert r["image"]["virtual-size"] == 4 * M
    failed, r = run_module(image, {"path": disk, "format": "raw", "recreate": True})
    assert not r["changed"]


def test_amend(tmp_path, run_module):
    disk = str(tmp_path / "d.qcow2")
    args = {"path": disk, "size": "4M", "options": {"cluster_size": "128K", "lazy_refcounts": False}}
    run_module(image, args)
    args["options"]["lazy_refcounts"] = True
    failed, r = run_module(image, args, check_mode=True, diff=True)
    assert r["changed"] and r["diff"]["before"] != r["diff"]["after"]
    assert observe(disk).options["lazy_refcounts"] is False
    failed, r = run_module(image, args)
    assert r["changed"] and r["actions"][0]["action"] == "amend"
    assert r["image"]["format-specific"]["data"]["lazy-refcounts"] is True
    assert not run_module(image, args)[1]["changed"]
    args["options"]["cluster_size"] = "64K"
    failed, r = run_module(image, args)
    assert failed
    assert "recreate" in r["msg"]
    assert "cluster_size" in r["msg"]


def test_absent(tmp_path, run_module):
    disk = str(tmp_path / "d.qcow2")
    run_module(image, {"path": disk, "size": "1M"})
    failed, r = run_module(image, {"path": disk, "state": "absent"}, check_mode=True)
    assert r["changed"] and os.path.exists(disk)
    failed, r = run_module(image, {"path": disk, "state": "absent"}, diff=True)
    assert r["changed"]
    assert not os.path.exists(disk)
    assert r["diff"]["after"]["state"] == "absent"
    assert r["image"] == {}
    assert not run_module(image, {"path": disk, "state": "absent"})[1]["changed"]


@pytest.mark.parametrize("args,word", [
    ({}, "size"),
    ({"size": "1M", "options": {"no_such_option": 1}}, "no_such_option"),
    ({"size": "1M", "format": "nope"}, "nope"),
    ({"size": "lots"}, "size"),
    ({"size": "1M", "no_such_parameter": 1}, "no_such_parameter"),
])
def test_errors_write_nothing(tmp_path, run_module, args, word):
    failed, r = run_module(image, dict({"path": str(tmp_path / "n.qcow2")}, **args))
    assert failed and word in r["msg"]
    assert not os.listdir(str(tmp_path))


def test_overlay(tmp_path, run_module):
    run_module(image, {"path": str(tmp_path / "base.qcow2"), "size": "16M"})
    args = {"path": str(tmp_path / "over.qcow2"), "backing_file": "base.qcow2", "backing_format": "qcow2"}
    failed, r = run_module(image, args)
    assert r["changed"]
    assert r["image"]["backing-filename"] == "base.qcow2"
    assert r["image"]["virtual-size"] == 16 * M
    assert not run_module(image, args)[1]["changed"]
