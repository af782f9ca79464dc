"""vdisk.images.image_info: read-only, qemu-img's keys, chains, errors."""
import pytest

pytest.importorskip("ansible.module_utils.basic")

from ansible_collections.vdisk.images.plugins.modules import image_info  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import apply_image  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import image_spec  # noqa: E402


def test_info_and_chain(tmp_path, run_module):
    base, over = str(tmp_path / "base.qcow2"), str(tmp_path / "over.qcow2")
    apply_image(image_spec({"path": base, "size": "3M", "options": {"cluster_size": "128K"}}))
    apply_image(image_spec({"path": over, "backing_file": "base.qcow2"}))
    failed, r = run_module(image_info, {"path": base})
    assert not failed and not r["changed"]
    assert r["image"]["virtual-size"] == 3 << 20 and r["image"]["cluster-size"] == 131072
    assert "images" not in r
    failed, r = run_module(image_info, {"path": over, "backing_chain": True}, check_mode=True)
    assert not failed and not r["changed"]
    assert [i["filename"] for i in r["images"]] == [over, str(tmp_path / "base.qcow2")]
    assert r["image"]["backing-filename"] == "base.qcow2"


def test_info_errors(tmp_path, run_module):
    failed, r = run_module(image_info, {"path": str(tmp_path / "missing.qcow2")})
    assert failed and "missing.qcow2" in r["msg"]
    (tmp_path / "x.raw").write_bytes(b"\0" * 512)
    failed, r = run_module(image_info, {"path": str(tmp_path / "x.raw"), "format": "no_such_format"})
    assert failed and "no_such_format" in r["msg"]


def test_safety_check_and_allowed_paths(tmp_path, run_module):
    (tmp_path / "golden").mkdir()
    (tmp_path / "vm").mkdir()
    base, over = str(tmp_path / "golden" / "base.qcow2"), str(tmp_path / "vm" / "over.qcow2")
    apply_image(image_spec({"path": base, "size": "1M"}))
    apply_image(image_spec({"path": over, "backing_file": "../golden/base.qcow2", "backing_format": "qcow2"}))
    # the backing file is outside the image's tree: refused, and the safety report says why
    failed, r = run_module(image_info, {"path": over, "backing_chain": True})
    assert failed and "outside the allowed directories" in r["msg"]
    failed, r = run_module(image_info, {"path": over, "safety_check": True})
    assert failed
    assert "references" in r["msg"]
    assert not r["safety"]["safe"]
    assert [(x["kind"], x["allowed"]) for x in r["safety"]["references"]] == [("backing file", False)]
    # widened: both pass, the report lists the followed backing file
    allowed = {"allowed_paths": [str(tmp_path / "golden")]}
    failed, r = run_module(image_info, dict(allowed, path=over, backing_chain=True, safety_check=True))
    assert not failed
    assert r["safety"]["safe"]
    assert len(r["images"]) == 2
    assert [(x["name"], x["followed"]) for x in r["safety"]["references"]] == [("../golden/base.qcow2", True)]
