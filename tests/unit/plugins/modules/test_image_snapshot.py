"""vdisk.images.image_snapshot: present / absent / applied, idempotence, check mode, diff, errors."""
import pytest

pytest.importorskip("ansible.module_utils.basic")

from ansible_collections.vdisk.images.plugins.modules import image_snapshot  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import open_image  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import apply_image  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import image_spec  # noqa: E402


def write(path, byte):
    img = open_image(path, "qcow2", writable=True)
    try:
        img.write(0, bytes([byte]) * 65536)
        img.flush()
    finally:
        img.close()


def read(path):
    img = open_image(path, "qcow2")
    try:
        return img.read(0, 65536)
    finally:
        img.close()


def test_lifecycle(tmp_path, run_module):
    disk = str(tmp_path / "s.qcow2")
    apply_image(image_spec({"path": disk, "size": "4M"}))
    write(disk, 0x11)
    args = {"path": disk, "name": "pristine"}
    failed, r = run_module(image_snapshot, args, check_mode=True, diff=True)
    assert r["changed"]
    assert observe(disk).snapshots == []
    assert r["diff"]["before"] != r["diff"]["after"]
    failed, r = run_module(image_snapshot, args)
    assert r["changed"] and [s["name"] for s in r["snapshots"]] == ["pristine"]
    assert not run_module(image_snapshot, args)[1]["changed"]
    applied = dict(args, state="applied")
    assert not run_module(image_snapshot, applied)[1]["changed"]     # the active layer equals it
    write(disk, 0x22)
    failed, r = run_module(image_snapshot, applied, check_mode=True)
    assert r["changed"] and read(disk) == b"\x22" * 65536
    failed, r = run_module(image_snapshot, applied)
    assert r["changed"] and read(disk) == b"\x11" * 65536
    assert not run_module(image_snapshot, applied)[1]["changed"]
    absent = dict(args, state="absent")
    failed, r = run_module(image_snapshot, absent, check_mode=True)
    assert r["changed"] and observe(disk).snapshot_names == ["pristine"]
    failed, r = run_module(image_snapshot, absent, diff=True)
    assert r["changed"]
    assert r["snapshots"] == []
    assert r["diff"]["after"]["snapshots"] == []
    assert not run_module(image_snapshot, absent)[1]["changed"]


def test_errors(tmp_path, run_module):
    disk = str(tmp_path / "s.qcow2")
    apply_image(image_spec({"path": disk, "size": "1M"}))
    failed, r = run_module(image_snapshot, {"path": disk, "name": "nope", "state": "applied"})
    assert failed and "nope" in r["msg"]
    failed, r = run_module(image_snapshot, {"path": str(tmp_path / "missing.qcow2"), "name": "x"})
    assert failed and "missing.qcow2" in r["msg"]
    raw = str(tmp_path / "d.raw")
    apply_image(image_spec({"path": raw, "size": "1M", "format": "raw"}))
    failed, r = run_module(image_snapshot, {"path": raw, "name": "x"})
    assert failed and "snapshots" in r["msg"]
    failed, r = run_module(image_snapshot, {"path": disk, "name": "x", "state": "reverted"})
    assert failed and "state" in r["msg"]
