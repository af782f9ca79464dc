"""vdisk.images.image_convert: convert, on_exists compare/skip/replace, check mode, diff, errors."""
import os

import pytest

pytest.importorskip("ansible.module_utils.basic")

from ansible_collections.vdisk.images.plugins.modules import image_convert  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import open_image  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.compare import compare  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe  # noqa: E402

M = 1 << 20


def same(a, b, fa="raw", fb="qcow2"):
    return compare(a, b, fa, fb, say=lambda line: None) == 0


@pytest.fixture
def src(tmp_path):
    path = str(tmp_path / "src.raw")
    with open(path, "wb") as f:
        f.truncate(8 * M)
        f.write(b"\x5a" * 256 * 1024)
        f.seek(5 * M)
        f.write(b"\xa5" * 65536)
    return path


def test_convert_compare(tmp_path, src, run_module):
    dest = str(tmp_path / "d.qcow2")
    args = {"src": src, "src_format": "raw", "dest": dest, "format": "qcow2"}
    failed, r = run_module(image_convert, args, check_mode=True, diff=True)
    assert not failed
    assert r["changed"]
    assert not os.path.exists(dest)
    assert r["diff"]["after"]["virtual-size"] == 8 * M and r["diff"]["before"]["state"] == "absent"
    failed, r = run_module(image_convert, args)
    assert r["changed"]
    assert r["image"]["format"] == "qcow2"
    assert same(src, dest)
    assert not run_module(image_convert, args, check_mode=True)[1]["changed"]
    assert not run_module(image_convert, args)[1]["changed"]
    with open(src, "r+b") as f:
        f.seek(M)
        f.write(b"\x33" * 4096)
    assert not run_module(image_convert, dict(args, on_exists="skip"))[1]["changed"]
    failed, r = run_module(image_convert, args, check_mode=True)
    assert r["changed"] and not same(src, dest)
    assert run_module(image_convert, args)[1]["changed"] and same(src, dest)
    assert not run_module(image_convert, args)[1]["changed"]
    assert run_module(image_convert, dict(args, on_exists="replace"))[1]["changed"]
    assert sorted(os.listdir(str(tmp_path))) == ["d.qcow2", "src.raw"]


def test_options_format_and_compress(tmp_path, src, run_module):
    dest = str(tmp_path / "c.qcow2")
    args = {"src": src, "dest": dest, "compress": True, "options": {"cluster_size": "128K"}}
    failed, r = run_module(image_convert, args)
    assert r["changed"]
    assert r["image"]["cluster-size"] == 131072
    assert same(src, dest)
    assert not run_module(image_convert, args)[1]["changed"]
    assert run_module(image_convert, dict(args, options={"cluster_size": "64K"}))[1]["changed"]
    failed, r = run_module(image_convert, {"src": dest, "dest": dest + ".raw", "format": "raw", "mode": "0640"})
    assert r["changed"]
    assert observe(dest + ".raw").format == "raw"
    assert same(src, dest + ".raw", "raw", "raw")
    assert oct(os.stat(dest + ".raw").st_mode & 0o777) == "0o640"
    failed, r = run_module(image_convert, {"src": src, "dest": dest + ".raw", "format": "qcow2"})
    assert r["changed"] and observe(dest + ".raw").format == "qcow2"


def test_snapshot_source(tmp_path, src, run_module):
    dest = str(tmp_path / "d.qcow2")
    run_module(image_convert, {"src": src, "dest": dest})
    img = open_image(dest, "qcow2", writable=True)
    try:
        img.create_snapshot("orig")
        img.write(0, b"\x77" * 4096)
    finally:
        img.close()
    args = {"src": dest, "snapshot": "orig", "dest": str(tmp_path / "orig.raw"), "format": "raw"}
    assert run_module(image_convert, args)[1]["changed"]
    assert same(src, str(tmp_path / "orig.raw"), "raw", "raw")
    assert not run_module(image_convert, args)[1]["changed"]


@pytest.mark.parametrize("args,word", [
    ({"src": "missing.raw"}, "missing.raw"),
    ({"options": {"no_such_option": 1}}, "no_such_option"),
    ({"options": {"size": "1G"}}, "size"),
    ({"format": "raw", "compress": True}, "compress"),
    ({"on_exists": "overwrite"}, "on_exists"),
])
def test_errors_write_nothing(tmp_path, src, run_module, args, word):
    args = dict({"src": src, "dest": str(tmp_path / "out.qcow2")}, **args)
    if not os.path.isabs(args["src"]):
        args["src"] = str(tmp_path / args["src"])
    failed, r = run_module(image_convert, args)
    assert failed and word in r["msg"]
    assert sorted(os.listdir(str(tmp_path))) == ["src.raw"]


def test_allowed_paths(tmp_path, run_module):
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import apply_image
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import image_spec
    (tmp_path / "golden").mkdir()
    (tmp_path / "vm").mkdir()
    base, over = str(tmp_path / "golden" / "base.qcow2"), str(tmp_path / "vm" / "over.qcow2")
    apply_image(image_spec({"path": base, "size": "1M"}))
    apply_image(image_spec({"path": over, "backing_file": "../golden/base.qcow2", "backing_format": "qcow2"}))
    dest = str(tmp_path / "vm" / "flat.raw")
    failed, r = run_module(image_convert, {"src": over, "dest": dest, "format": "raw"})
    assert failed
    assert "outside the allowed directories" in r["msg"]
    assert not os.path.exists(dest)
    failed, r = run_module(image_convert, {"src": over, "dest": dest, "format": "raw",
                                           "allowed_paths": [str(tmp_path / "golden")]})
    assert not failed
    assert r["changed"]
    assert os.path.getsize(dest) == M
