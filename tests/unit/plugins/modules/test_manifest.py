"""vdisk.images.manifest: (images + observed state) -> actions as data, check mode on an empty directory,
dependency order, source with a backing file (convert -B), validation messages as `vdisk validate`, failures."""
import os
import shutil
import subprocess

import pytest

pytest.importorskip("ansible.module_utils.basic")

from ansible_collections.vdisk.images.plugins.modules import manifest  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_manifests  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe  # noqa: E402

M = 1 << 20
needs_qemu = pytest.mark.skipif(not shutil.which("qemu-img") or not shutil.which("qemu-io"),
                                reason="needs qemu-img and qemu-io")


def kinds(result):
    return [(a["image"], a["kind"]) for a in result["actions"]]


def files(directory):
    return sorted(os.path.relpath(os.path.join(d, f), str(directory)) for d, _s, fs in os.walk(str(directory))
                  for f in fs)


# (existing images, made first with the module; images given now) -> expected (image, action kind) list
CASES = {
    "nothing to make": ([], [], []),
    "create": ([], [{"path": "a.qcow2", "size": "1M"}], [("a.qcow2", "create")]),
    "unchanged": ([{"path": "a.qcow2", "size": "1M"}], [{"path": "a.qcow2", "size": "1M"}], []),
    "grow": ([{"path": "a.qcow2", "size": "1M"}], [{"path": "a.qcow2", "size": "2M"}], [("a.qcow2", "grow")]),
    "size not given keeps it": ([{"path": "a.qcow2", "size": "1M"}], [{"path": "a.qcow2"}], []),
    "amend": ([{"path": "a.qcow2", "size": "1M"}],
              [{"path": "a.qcow2", "size": "1M", "options": {"lazy_refcounts": True}}], [("a.qcow2", "amend")]),
    "snapshot": ([{"path": "a.qcow2", "size": "1M"}], [{"path": "a.qcow2", "snapshots": ["s1"]}],
                 [("a.qcow2", "snapshot_create")]),
    "delete": ([{"path": "a.qcow2", "size": "1M"}], [{"path": "a.qcow2", "state": "absent"}],
               [("a.qcow2", "delete")]),
    "absent and gone": ([], [{"path": "a.qcow2", "state": "absent"}], []),
    "mode": ([{"path": "a.qcow2", "size": "1M"}], [{"path": "a.qcow2", "mode": "0600"}],
             [("a.qcow2", "attributes")]),
    "defaults apply": ([], [{"path": "a.img", "size": "1M"}], [("a.img", "create")]),
    "overlay on an existing base": ([{"path": "base.qcow2", "size": "1M"}],
                                    [{"path": "o.qcow2", "backing_file": "base.qcow2"}], [("o.qcow2", "create")]),
    "overlay before its base": ([], [{"path": "o.qcow2", "backing_file": "base.qcow2"},
                                     {"path": "base.qcow2", "size": "1M"}],
                                [("base.qcow2", "create"), ("o.qcow2", "create")]),
    "source before its copy": ([], [{"path": "copy.raw", "format": "raw", "source": "base.qcow2"},
                                    {"path": "base.qcow2", "size": "1M"}],
                               [("base.qcow2", "create"), ("copy.raw", "convert")]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_actions(tmp_path, run_module, name):
    existing, images, expected = CASES[name]
    defaults = {"format": "raw"} if name == "defaults apply" else {}
    if existing:
        failed, r = run_module(manifest, {"images": existing, "dir": str(tmp_path)})
        assert not failed, r
    before = files(tmp_path)
    failed, r = run_module(manifest, {"images": images, "dir": str(tmp_path), "defaults": defaults},
                           check_mode=True, diff=True)
    assert not failed, r
    assert kinds(r) == expected and r["changed"] == bool(expected)
    assert files(tmp_path) == before                      # check mode writes nothing
    assert len(r["diff"]) == len({image for image, _kind in expected})
    failed, r2 = run_module(manifest, {"images": images, "dir": str(tmp_path), "defaults": defaults})
    assert not failed, r2
    assert kinds(r2) == expected and r2["changed"] == bool(expected)
    for check_mode in (True, False):                     # idempotent
        failed, r3 = run_module(manifest, {"images": images, "dir": str(tmp_path), "defaults": defaults},
                                check_mode=check_mode)
        assert not failed, r3
        assert not r3["changed"], r3
        assert r3["actions"] == [], r3


def test_check_mode_on_an_empty_directory(tmp_path, run_module):
    """Regression (issue 15): an overlay sized by a base this run makes, snapshots of an image not made yet."""
    images = [{"path": "vms/web.qcow2", "backing_file": "../golden/base.qcow2", "backing_format": "qcow2",
               "snapshots": ["pristine"]},
              {"path": "golden/base.qcow2", "size": "64M", "snapshots": ["clean"]}]
    args = {"images": images, "dir": str(tmp_path)}
    failed, r = run_module(manifest, args, check_mode=True, diff=True)
    assert not failed, r
    assert kinds(r) == [("golden/base.qcow2", "create"), ("golden/base.qcow2", "snapshot_create"),
                        ("vms/web.qcow2", "create"), ("vms/web.qcow2", "snapshot_create")]
    assert os.listdir(str(tmp_path)) == []
    web = [i for i in r["images"] if i["image"] == "vms/web.qcow2"][0]
    assert web["before"]["state"] == "absent" and web["after"]["virtual-size"] == 64 * M
    assert [d["after_header"] for d in r["diff"]] == [str(tmp_path / "golden/base.qcow2"),
                                                      str(tmp_path / "vms/web.qcow2")]
    failed, r = run_module(manifest, args)
    assert not failed and r["changed"]
    assert observe(str(tmp_path / "vms/web.qcow2")).virtual_size == 64 * M
    assert observe(str(tmp_path / "vms/web.qcow2")).snapshot_names == ["pristine"]
    failed, r = run_module(manifest, args, check_mode=True)
    assert not failed and not r["changed"]


def test_absent_base_of_a_present_overlay_is_refused(tmp_path, run_module):
    """Regression (issue 15): the role deleted a base an overlay still used; the manifest refuses it."""
    args = {"images": [{"path": "o.qcow2", "backing_file": "base.qcow2"}, {"path": "base.qcow2", "size": "1M"}],
            "dir": str(tmp_path)}
    run_module(manifest, args)
    args["images"][1] = {"path": "base.qcow2", "state": "absent"}
    for check_mode in (True, False):
        failed, r = run_module(manifest, args, check_mode=check_mode)
        assert failed and "base.qcow2 is deleted by images[1] (state: absent)" in r["msg"], r
    assert sorted(os.listdir(str(tmp_path))) == ["base.qcow2", "o.qcow2"]


@needs_qemu
def test_source_with_backing_file_keeps_the_data(tmp_path, run_module):
    """Regression (issue 15): source + backing_file converts with -B: areas zero in the source but not in
    the backing file are written, so the image reads as the source (qemu-img compare)."""
    base, src = str(tmp_path / "base.qcow2"), str(tmp_path / "src.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"], check=True)
    for i in range(4):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d %dM 1M" % (i + 1, i), base], check=True,
                       stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", base, src], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 1M 1M", "-c", "write -P 9 3M 64k", src], check=True,
                   stdout=subprocess.DEVNULL)
    for mode in ({}, {"mode": "0640"}):
        target = "vm%d.qcow2" % len(mode)
        args = {"images": [dict({"path": target, "source": "src.qcow2", "backing_file": "base.qcow2",
                                 "backing_format": "qcow2"}, **mode)], "dir": str(tmp_path)}
        failed, r = run_module(manifest, args)
        assert not failed and [k for _i, k in kinds(r)][0] == "convert", r
        out = str(tmp_path / target)
        assert observe(out).backing_file == "base.qcow2"
        subprocess.run(["qemu-img", "compare", "-q", src, out], check=True)
        failed, r = run_module(manifest, args)
        assert not failed and not r["changed"]


def test_validation_messages_are_those_of_vdisk_validate(tmp_path, run_module):
    images = [{"path": "a.qcow2", "size": "lots"}, {"path": "b.qcow2", "bogus": 1},
              {"path": "/elsewhere/c.qcow2", "size": "1M"}, {"path": "d.qcow2", "size": "1M"},
              {"path": "./d.qcow2", "size": "1M"}]
    (tmp_path / "m.yml").write_text(
        "version: 1\nimages:\n  - {path: a.qcow2, size: lots}\n  - {path: b.qcow2, bogus: 1}\n"
        "  - {path: /elsewhere/c.qcow2, size: 1M}\n  - {path: d.qcow2, size: 1M}\n  - {path: ./d.qcow2, size: 1M}\n")
    problems = load_manifests([str(tmp_path / "m.yml")]).problems
    expected = [(0, "size", 3), (1, "bogus", 4), (2, "path", 5), (4, "path", 7)]
    assert [(p.index, p.field, p.line) for p in problems] == expected
    # the data is checked by the same code, without the file's lines (and without the JSON schema, which
    # needs jsonschema on the managed host: the engine's spec check names the same image and field)
    failed, r = run_module(manifest, {"images": images, "dir": str(tmp_path)}, check_mode=True)
    assert failed
    assert len(r["problems"]) == 4
    assert r["msg"] == "\n".join(r["problems"])
    for text, problem in zip(r["problems"], problems):
        assert text.startswith("images: images[%d] (%s): %s" % (problem.index, problem.image, problem.field))
    assert [t.split(": ", 1)[1] for t in r["problems"][1:]] == [str(p).split(": line %d: " % p.line, 1)[1]
                                                                for p in problems[1:]]
    failed, r = run_module(manifest, {"src": str(tmp_path / "m.yml")}, check_mode=True)
    assert failed and r["problems"] == [str(p).replace(str(tmp_path / "m.yml"), r["problems"][0].split(": ")[0])
                                        for p in problems]
    assert os.listdir(str(tmp_path)) == ["m.yml"]


def test_src_and_allowed_paths(tmp_path, run_module):
    other = tmp_path / "other"
    other.mkdir()
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "m.yml").write_text("version: 1\nimages:\n  - {path: %s/a.qcow2, size: 1M}\n" % other)
    failed, r = run_module(manifest, {"src": str(sub / "m.yml")})
    assert failed
    assert "outside the manifest's directory" in r["msg"]
    assert os.listdir(str(other)) == []
    failed, r = run_module(manifest, {"src": str(sub / "m.yml"), "allowed_paths": [str(other)]})
    assert not failed and kinds(r) == [("%s/a.qcow2" % other, "create")]
    failed, r = run_module(manifest, {"src": str(sub / "m.yml"), "allowed_paths": [str(other)]})
    assert not failed and not r["changed"]


def test_arguments(tmp_path, run_module):
    failed, r = run_module(manifest, {"images": [{"path": "a", "size": "1M"}]})
    assert failed and "dir" in r["msg"]
    failed, r = run_module(manifest, {"dir": str(tmp_path)})
    assert failed and "images" in r["msg"]
    failed, r = run_module(manifest, {"images": [], "src": str(tmp_path / "m.yml"), "dir": str(tmp_path)})
    assert failed and "mutually exclusive" in r["msg"]


def test_apply_failure_reports_done_failed_not_done(tmp_path, run_module):
    # b's directory is a file: making b fails after a is made; c is not done
    (tmp_path / "blocker").write_text("")
    images = [{"path": "a.qcow2", "size": "1M"}, {"path": "blocker/b.qcow2", "size": "1M"},
              {"path": "c.qcow2", "size": "1M"}]
    failed, r = run_module(manifest, {"images": images, "dir": str(tmp_path)})
    assert failed and r["msg"].startswith("images: images[1] (blocker/b.qcow2): "), r
    assert r["changed"] and kinds(r) == [("a.qcow2", "create")]
    report = r["report"]
    assert not report["ok"] and [d["name"] for d in report["done"]] == ["a.qcow2"]
    assert report["failed"]["name"] == "blocker/b.qcow2" and report["failed"]["error"]
    assert [d["name"] for d in report["not_done"]] == ["c.qcow2"]
    assert not os.path.exists(str(tmp_path / "c.qcow2"))
