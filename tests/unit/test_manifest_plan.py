"""vdisk plan: every action kind planned from real images, the output snapshot-tested (human and JSON).

Snapshots live in tests/unit/snapshots/; after an intended change of the output, regenerate them
with VDISK_UPDATE_SNAPSHOTS=1 and review the diff.
"""
import json
import os
import textwrap

import helpers

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_manifests
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.render import render_plan_human
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.run import plan_all

SNAPSHOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshots")
MANIFEST = """
version: 1
defaults: {format: qcow2}
images:
  - {path: overlay.qcow2, backing_file: new.qcow2, backing_format: qcow2}
  - {path: base.qcow2, size: 128M}
  - {path: lazy.qcow2, options: {lazy_refcounts: true}, mode: "0600"}
  - {path: snap.qcow2, snapshots: [new], prune_snapshots: true}
  - {path: disk.img, format: qcow2, size: 32M, recreate: true}
  - {path: gone.qcow2, state: absent}
  - {path: new.qcow2, size: 16M, options: {cluster_size: 128K}}
  - {path: clone/base.raw, format: raw, source: base.qcow2}
  - {path: same.qcow2, size: 8M, snapshots: [s1]}
  - {path: never.qcow2, state: absent}
"""


def qemu_img(*args):
    helpers.qemu_img(*[str(a) for a in args], check=True)


def fleet(tmp_path):
    """Images in every state the manifest above changes."""
    d = tmp_path
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "64M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=off", d / "lazy.qcow2", "8M")
    os.chmod(str(d / "lazy.qcow2"), 0o644)
    qemu_img("create", "-q", "-f", "qcow2", d / "snap.qcow2", "8M")
    qemu_img("snapshot", "-c", "old", d / "snap.qcow2")
    qemu_img("create", "-q", "-f", "raw", d / "disk.img", "32M")
    qemu_img("create", "-q", "-f", "qcow2", d / "gone.qcow2", "1G")
    qemu_img("create", "-q", "-f", "qcow2", d / "same.qcow2", "8M")
    qemu_img("snapshot", "-c", "s1", d / "same.qcow2")
    with open(str(d / "manifest.yml"), "w") as f:
        f.write(MANIFEST.lstrip())
    return str(d / "manifest.yml")


def check_snapshot(name, text):
    path = os.path.join(SNAPSHOTS, name)
    if os.environ.get("VDISK_UPDATE_SNAPSHOTS"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), "output differs from snapshot %s" % path


def test_plan_human_snapshot(tmp_path, capsys):
    manifest = fleet(tmp_path)
    assert main(["plan", manifest]) == 2
    out, err = capsys.readouterr()
    assert err == "" and "\033[" not in out     # not a terminal: no color
    check_snapshot("manifest_plan.txt", out)
    # planning changes nothing
    assert sorted(os.listdir(str(tmp_path))) == ["base.qcow2", "disk.img", "gone.qcow2", "lazy.qcow2",
                                                 "manifest.yml", "same.qcow2", "snap.qcow2"]


def test_plan_json_snapshot(tmp_path, capsys):
    manifest = fleet(tmp_path)
    assert main(["plan", "--output=json", manifest]) == 2
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["changes"] and data["summary"] == {"create": 3, "update": 3, "replace": 1, "delete": 1,
                                                   "unchanged": 2, "error": 0}
    uid, gid = os.getuid(), os.getgid()
    text = out.replace(str(tmp_path), "<dir>").replace('"owner": %d' % uid, '"owner": "<uid>"').replace(
        '"group": %d' % gid, '"group": "<gid>"')
    check_snapshot("manifest_plan.json", text)


def test_plan_colors_on_a_terminal(tmp_path):
    plans = plan_all(load_manifests([fleet(tmp_path)]))
    colored = render_plan_human(plans, color=True)
    assert "\033[32m\033[1m+ new.qcow2\033[0m" in colored and "\033[31m\033[1m-/+ disk.img\033[0m" in colored
    assert "\033[33m\033[1m~ base.qcow2\033[0m" in colored and "\033[31m\033[1m- gone.qcow2\033[0m" in colored
    assert render_plan_human(plans) == "\n".join(
        line.replace("\033[32m", "").replace("\033[31m", "").replace("\033[33m", "").replace("\033[1m", "")
        .replace("\033[0m", "") for line in colored.splitlines())


def test_plan_refuses_destruction_without_consent(tmp_path, capsys):
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "64M")
    qemu_img("create", "-q", "-f", "raw", tmp_path / "b.img", "64M")
    manifest = tmp_path / "m.yml"
    manifest.write_text(textwrap.dedent("""
        version: 1
        images:
          - {path: a.qcow2, size: 32M}
          - {path: b.img, size: 64M}
          - {path: c.qcow2, backing_file: a.qcow2}
        """))
    assert main(["plan", str(manifest)]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "vdisk: plan: %s: line 4: images[0] (a.qcow2): allow_shrink: the image is 64 MiB, larger than the requested "
        "32 MiB; shrinking loses the data past the new end: set allow_shrink: true to shrink it" % manifest,
        "vdisk: plan: %s: line 5: images[1] (b.img): format: the image is raw, not qcow2; the image is not changed: "
        "set recreate: true to replace it with a new image (its content is lost)" % manifest,
        "vdisk: plan: %s: line 6: images[2] (c.qcow2): not planned: a.qcow2 (which it depends on) has an error"
        % manifest,
    ]
    # the plan shows the same errors in place, and counts them
    assert out.splitlines()[:2] == ["! a.qcow2", "    error: " + err.splitlines()[0].split("(a.qcow2): ", 1)[1]]
    assert out.endswith("Plan: 0 to create, 0 to update, 0 to replace, 0 to delete; 0 unchanged; 3 errors.\n")


def test_plan_no_changes(tmp_path, capsys):
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "64M")
    manifest = tmp_path / "m.yml"
    manifest.write_text("version: 1\nimages:\n  - {path: a.qcow2, size: 64M}\n")
    assert main(["plan", str(manifest)]) == 0
    assert capsys.readouterr().out == "No changes: 1 image is as the manifests describe.\n"
    assert main(["plan", "--output=json", str(manifest)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert not data["changes"]
    assert data["images"][0]["change"] == "none"
    assert data["images"][0]["actions"] == []


def test_apply_changes_nothing_when_an_image_cannot_be_planned(tmp_path, capsys):
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "64M")
    manifest = tmp_path / "m.yml"
    manifest.write_text("version: 1\nimages:\n  - {path: new.qcow2, size: 1M}\n  - {path: a.qcow2, size: 1M}\n")
    assert main(["apply", str(manifest)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("vdisk: apply: %s: line 4: images[1] (a.qcow2): allow_shrink: " % manifest)
    assert sorted(os.listdir(str(tmp_path))) == [".m.yml.lock", "a.qcow2", "m.yml"]


def test_color_only_on_a_terminal(monkeypatch):
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.cli import use_color

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert use_color(Stream(True)) and not use_color(Stream(False))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(Stream(True))
