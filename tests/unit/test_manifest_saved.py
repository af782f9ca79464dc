"""Saved plan files and the apply lock, as units: what is (not) a plan, bad plan files, lock timeouts."""
import json
import threading
import time

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest import saved
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.lock import (ApplyLocked, apply_lock,
                                                                                         parse_timeout)


def test_a_flow_style_manifest_is_not_a_plan(tmp_path):
    manifest = tmp_path / "m.yml"
    manifest.write_text('{"version": 1, "images": [{"path": "vdisk_plan.qcow2", "size": "1M"}]}\n')
    assert saved.read_plan(str(manifest)) is None
    assert main(["apply", str(manifest)]) == 0
    assert (tmp_path / "vdisk_plan.qcow2").exists()


def test_plan_file_round_trip_and_bad_plan_files(tmp_path, capsys):
    manifest = tmp_path / "m.yml"
    manifest.write_text("version: 1\nimages:\n  - {path: a.qcow2, size: 1M}\n")
    plan = tmp_path / "p.plan"
    assert main(["plan", "--out", str(plan), str(manifest)]) == 2
    data = json.loads(plan.read_text())
    assert data["vdisk_plan"] == 1 and data["manifests"][0]["path"] == str(manifest)
    assert data["images"][0]["files"] == {str(tmp_path / "a.qcow2"): {"exists": False}}
    assert data["plan"]["summary"]["create"] == 1
    read = saved.read_plan(str(plan))
    assert read.manifest_paths == [str(manifest)] and read.cache is None
    capsys.readouterr()
    plan.write_text(json.dumps(dict(data, vdisk_plan=2)))
    assert main(["apply", str(plan)]) == 1
    assert "a plan of version 2: this vdisk applies version 1 plans" in capsys.readouterr().err
    plan.write_text(json.dumps({"vdisk_plan": 1, "images": []}))
    assert main(["apply", str(plan)]) == 1
    assert "not a complete vdisk plan" in capsys.readouterr().err
    assert not (tmp_path / "a.qcow2").exists()


def test_lock_timeout_values():
    assert parse_timeout("0") == 0 and parse_timeout("2.5") == 2.5
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_timeout(bad)


def test_lock_waits_then_fails_or_gets_it(tmp_path):
    manifest = str(tmp_path / "m.yml")
    release = threading.Event()

    def holder():
        with apply_lock(manifest):
            release.wait(10)
    thread = threading.Thread(target=holder)
    thread.start()
    time.sleep(0.2)
    try:
        started = time.monotonic()
        with pytest.raises(ApplyLocked, match="another apply holds"):
            with apply_lock(manifest, timeout=0.3):
                pass
        assert 0.3 <= time.monotonic() - started < 5
        threading.Timer(0.3, release.set).start()
        with apply_lock(manifest, timeout=10):
            pass
    finally:
        release.set()
        thread.join()


def test_lock_file_that_cannot_be_made(tmp_path):
    (tmp_path / ".m.yml.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ImageError, match="could not open the apply lock file"):
        with apply_lock(str(tmp_path / "m.yml")):
            pass


def test_download_progress_on_a_terminal_and_in_a_log():
    import io
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.cli import _Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        show = _Progress(stream)
        for done in (0, 1 << 20, 2 << 20):
            show("http://h/x", done, 2 << 20)
    assert tty.getvalue() == ("\rvdisk: downloading http://h/x: 0 B of 2 MiB (0%)"
                              "\rvdisk: downloading http://h/x: 1 MiB of 2 MiB (50%)"
                              "\rvdisk: downloading http://h/x: 2 MiB of 2 MiB (100%)\n")
    assert log.getvalue() == "vdisk: downloading http://h/x (2 MiB)\nvdisk: downloaded http://h/x\n"
