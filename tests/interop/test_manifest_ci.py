"""vdisk plan/apply in pipelines: plans that show every change and every error, JSON diagnostics checked
against their published schema, saved plans refused when stale (one test per kind of drift), and the
apply lock (two applies at once)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import helpers
import jsonschema
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.lock import apply_lock, lock_path
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.units import format_size

M = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAN_SCHEMA = os.path.join(ROOT, "docs", "schemas", "plan-output.schema.json")


def qemu_img(*args):
    return helpers.qemu_img(*[str(a) for a in args], check=True)


def info(path):
    return helpers.qemu_info(str(path))


def vdisk(*args, cwd=None):
    if cwd is None:
        return helpers.vdisk_cli(*args)
    return subprocess.run([sys.executable, "-m", helpers.CLI_MODULE] + [str(a) for a in args], capture_output=True,
                          text=True, cwd=str(cwd), env=dict(os.environ))


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def schema():
    with open(PLAN_SCHEMA) as f:
        return json.load(f)


def check_plan_json(text):
    """stdout is exactly one JSON document, valid against docs/schemas/plan-output.schema.json."""
    data = json.loads(text)
    jsonschema.Draft7Validator(schema()).validate(data)
    return data


def check_diagnostics(items):
    jsonschema.Draft7Validator(dict(schema()["definitions"]["diagnostics"],
                                    definitions=schema()["definitions"])).validate(items)


def snapshot_of(directory):
    """Every file's name, size, mode and mtime: what "changed nothing" compares."""
    out = {}
    for name in sorted(os.listdir(str(directory))):
        st = os.stat(os.path.join(str(directory), name))
        out[name] = (st.st_size, st.st_mode, st.st_mtime_ns, st.st_ino)
    return out


# -- plans that show everything -------------------------------------------------------------------
def drifted_fleet(d):
    """Four images applied, then drifted outside vdisk in four ways, one of them unplannable."""
    manifest = write(d / "m.yml", """
        version: 1
        images:
          - {path: big.qcow2, size: 16M}
          - {path: snap.qcow2, size: 16M, snapshots: [s1]}
          - {path: gone.qcow2, size: 16M}
          - {path: moded.qcow2, size: 16M, mode: '0640'}
        """)
    assert vdisk("apply", manifest).returncode == 0
    qemu_img("resize", "-q", d / "big.qcow2", "48M")          # cannot be planned: would shrink
    qemu_img("snapshot", "-d", "s1", d / "snap.qcow2")
    os.unlink(str(d / "gone.qcow2"))
    os.chmod(str(d / "moded.qcow2"), 0o600)
    return manifest


def test_plan_shows_every_change_beside_an_unplannable_image(tmp_path):
    manifest = drifted_fleet(tmp_path)
    proc = vdisk("plan", manifest)
    assert proc.returncode == 1
    assert proc.stderr == (
        "vdisk: plan: %s: line 3: images[0] (big.qcow2): allow_shrink: the image is 48 MiB, larger than the "
        "requested 16 MiB; shrinking loses the data past the new end: set allow_shrink: true to shrink it\n"
        % manifest)
    assert proc.stdout == textwrap.dedent("""\
        ! big.qcow2
            error: allow_shrink: the image is 48 MiB, larger than the requested 16 MiB; shrinking loses the data past the new end: set allow_shrink: true to shrink it
        ~ snap.qcow2
            create snapshot 's1'
        + gone.qcow2
            create: qcow2, 16 MiB
        ~ moded.qcow2
            set: mode 0600 -> 0640

        Plan: 1 to create, 2 to update, 0 to replace, 0 to delete; 0 unchanged; 1 error.
        """)


def test_plan_json_is_one_document_with_diagnostics_even_on_error(tmp_path):
    manifest = drifted_fleet(tmp_path)
    proc = vdisk("plan", "--output=json", manifest)
    assert proc.returncode == 1
    data = check_plan_json(proc.stdout)
    assert [(i["name"], i["change"]) for i in data["images"]] == [
        ("big.qcow2", "error"), ("snap.qcow2", "update"), ("gone.qcow2", "create"), ("moded.qcow2", "update")]
    assert data["summary"] == {"create": 1, "update": 2, "replace": 0, "delete": 0, "unchanged": 0, "error": 1}
    (diag,) = data["diagnostics"]
    assert diag["severity"] == "error" and (diag["manifest"], diag["index"], diag["path"], diag["field"],
                                            diag["line"]) == (manifest, 0, "big.qcow2", "allow_shrink", 3)
    assert diag["message"].startswith("the image is 48 MiB, larger than the requested 16 MiB")


def test_plan_json_of_an_invalid_manifest_plans_the_valid_images(tmp_path):
    manifest = write(tmp_path / "m.yml", """
        version: 1
        images:
          - path: ok.qcow2
            size: 1M
          - path: bad.qcow2
            size: lots
          - {path: ok.qcow2, size: 2M}
        """)
    proc = vdisk("plan", "--output=json", manifest)
    assert proc.returncode == 1
    data = check_plan_json(proc.stdout)
    assert [i["name"] for i in data["images"]] == ["ok.qcow2"]
    assert [(d["index"], d["field"], d["line"]) for d in data["diagnostics"]] == [(1, "size", 6), (2, "path", 7)]
    assert proc.stderr.splitlines() == ["vdisk: plan: %s" % d["text"] for d in data["diagnostics"]]
    assert not (tmp_path / "ok.qcow2").exists()
    # apply: the same diagnostics, one JSON document, nothing done
    proc = vdisk("apply", "--output=json", manifest)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    check_diagnostics(report["diagnostics"])
    assert not report["ok"]
    assert report["done"] == []
    assert len(report["not_done"]) == 1
    assert sorted(os.listdir(str(tmp_path))) == ["m.yml"]         # refused before the lock was taken


def test_validate_json_diagnostics_match_the_schema(tmp_path):
    manifest = write(tmp_path / "m.yml", """
        version: 1
        images:
          - {path: a.qcow2, size: 1M, format: nope}
          - {path: a.qcow2, size: 1M}
        """)
    proc = vdisk("validate", "--output=json", manifest)
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    check_diagnostics(data["diagnostics"])
    assert [(d["index"], d["field"], d["line"]) for d in data["diagnostics"]] == [(0, "format", 3), (1, "path", 4)]


def test_plan_without_errors_and_out_of_a_manifest_with_errors(tmp_path):
    manifest = write(tmp_path / "m.yml", "version: 1\nimages:\n  - {path: a.qcow2, size: nope}\n")
    proc = vdisk("plan", "--out", tmp_path / "plan.json", manifest)
    assert proc.returncode == 1 and "no plan written to" in proc.stderr
    assert not (tmp_path / "plan.json").exists()


# -- saved plans ------------------------------------------------------------------------------------
def saved_fleet(d):
    qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "16M")
    qemu_img("create", "-q", "-f", "qcow2", d / "grow.qcow2", "8M")
    qemu_img("create", "-q", "-f", "raw", d / "src.raw", "4M")
    qemu_img("create", "-q", "-f", "qcow2", d / "keep.qcow2", "8M")
    os.chmod(str(d / "keep.qcow2"), 0o640)
    manifest = write(d / "m.yml", """
        version: 1
        images:
          - {path: base.qcow2, size: 16M}
          - {path: grow.qcow2, size: 16M, snapshots: [s1]}
          - {path: overlay.qcow2, backing_file: base.qcow2, backing_format: qcow2}
          - {path: copy.qcow2, source: src.raw}
          - {path: keep.qcow2, size: 8M, mode: '0640'}
        """)
    plan = d / "plan.json"
    proc = vdisk("plan", "--out", plan, manifest)
    assert proc.returncode == 2, proc.stderr
    assert plan.exists()
    return manifest, plan


def test_saved_plan_applies_exactly_and_from_another_directory(tmp_path):
    _manifest, plan = saved_fleet(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = vdisk("apply", plan, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert "Apply complete: 4 actions done." in proc.stdout
    assert info(tmp_path / "grow.qcow2")["virtual-size"] == 16 * M
    assert info(tmp_path / "overlay.qcow2")["backing-filename"] == "base.qcow2"
    assert helpers.qemu_compare(str(tmp_path / "copy.qcow2"), str(tmp_path / "src.raw"))
    # applied once: the same plan is now stale (the images it planned for have changed)
    proc = vdisk("apply", plan)
    assert proc.returncode == 1 and "the plan is stale: " in proc.stderr


def drift_manifest(d):
    with open(str(d / "m.yml"), "a") as f:
        f.write("  - {path: extra.qcow2, size: 1M}\n")


def drift_resize(d):
    qemu_img("resize", "-q", d / "grow.qcow2", "12M")


def drift_snapshot(d):
    qemu_img("snapshot", "-c", "s1", d / "grow.qcow2")


def drift_delete(d):
    os.unlink(str(d / "keep.qcow2"))


def drift_create(d):
    qemu_img("create", "-q", "-f", "qcow2", d / "copy.qcow2", "4M")


def drift_mode(d):
    os.chmod(str(d / "keep.qcow2"), 0o600)


def drift_content(d):
    time.sleep(0.01)          # a new mtime even on coarse clocks
    helpers.qemu_io("qcow2", str(d / "keep.qcow2"), "write -P 1 0 64k")


def drift_backing(d):
    time.sleep(0.01)
    helpers.qemu_io("qcow2", str(d / "base.qcow2"), "write -P 2 0 64k")


def drift_source(d):
    time.sleep(0.01)
    helpers.qemu_io("raw", str(d / "src.raw"), "write -P 3 0 64k")


def drift_replace(d):
    qemu_img("create", "-q", "-f", "qcow2", d / "keep.new", "8M")
    os.chmod(str(d / "keep.new"), 0o640)
    os.replace(str(d / "keep.new"), str(d / "keep.qcow2"))


@pytest.mark.parametrize("drift, reason", [
    (drift_manifest, "m.yml changed since the plan was made"),
    (drift_resize, "images[1] (grow.qcow2): %(d)s/grow.qcow2 changed since the plan was made (virtual-size "
                   "8 MiB -> 12 MiB"),
    (drift_snapshot, "images[1] (grow.qcow2): %(d)s/grow.qcow2 changed since the plan was made (snapshots none -> "
                     "s1"),
    (drift_delete, "images[4] (keep.qcow2): %(d)s/keep.qcow2 was deleted since the plan was made"),
    (drift_create, "images[3] (copy.qcow2): %(d)s/copy.qcow2 was created since the plan was made"),
    (drift_mode, "images[4] (keep.qcow2): %(d)s/keep.qcow2 changed since the plan was made (mode 0640 -> 0600)"),
    (drift_content, "images[4] (keep.qcow2): %(d)s/keep.qcow2 changed since the plan was made"),
    (drift_backing, "images[2] (overlay.qcow2): %(d)s/base.qcow2 changed since the plan was made"),
    (drift_source, "images[3] (copy.qcow2): %(d)s/src.raw changed since the plan was made"),
    (drift_replace, "images[4] (keep.qcow2): %(d)s/keep.qcow2 changed since the plan was made (replaced by"),
], ids=lambda v: v.__name__[6:] if callable(v) else "")
def test_stale_saved_plan_is_refused_and_changes_nothing(tmp_path, drift, reason):
    _manifest, plan = saved_fleet(tmp_path)
    drift(tmp_path)
    before = snapshot_of(tmp_path)
    proc = vdisk("apply", plan)
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout == ""
    assert "vdisk: apply: the plan is stale: " in proc.stderr
    assert reason % {"d": tmp_path} in proc.stderr, proc.stderr
    after = snapshot_of(tmp_path)
    after.pop(".m.yml.lock", None)
    assert after == before
    proc = vdisk("apply", "--output=json", plan)
    data = json.loads(proc.stdout)
    check_diagnostics(data["diagnostics"])
    assert proc.returncode == 1
    assert not data["ok"]
    assert data["done"] == []
    assert any(d["message"].startswith("the plan is stale: ") for d in data["diagnostics"])


def test_saved_plan_takes_no_other_paths(tmp_path):
    _manifest, plan = saved_fleet(tmp_path)
    proc = vdisk("apply", "--allow-path", tmp_path, plan)
    assert proc.returncode != 0 and "applied with the --allow-path and --cache it was made with" in proc.stderr


# -- the apply lock ---------------------------------------------------------------------------------
HOLD = """
import sys, time
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.lock import apply_lock
with apply_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(manifest, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, manifest, str(seconds)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_apply_fails_at_once_while_one_holds_the_lock(tmp_path):
    manifest = write(tmp_path / "m.yml", "version: 1\nimages:\n  - {path: a.qcow2, size: 1M}\n")
    holder = hold_lock(manifest, 30)
    try:
        started = time.monotonic()
        proc = vdisk("apply", manifest)
        assert time.monotonic() - started < 10
        assert proc.returncode == 1
        assert proc.stderr == "vdisk: apply: another apply holds %s (pid %d); try again later, or wait for it " \
                              "with --lock-timeout SECONDS\n" % (lock_path(manifest), holder.pid)
        assert not (tmp_path / "a.qcow2").exists()
        assert vdisk("plan", manifest).returncode == 2          # plan does not take the lock
    finally:
        holder.kill()
        holder.wait()
    assert vdisk("apply", manifest).returncode == 0


def test_apply_waits_for_the_lock_with_a_timeout(tmp_path):
    manifest = write(tmp_path / "m.yml", "version: 1\nimages:\n  - {path: a.qcow2, size: 1M}\n")
    holder = hold_lock(manifest, 1.5)
    try:
        proc = vdisk("apply", "--lock-timeout", "60", manifest)
    finally:
        holder.wait()
    assert proc.returncode == 0, proc.stderr
    assert info(tmp_path / "a.qcow2")["virtual-size"] == M
    proc = vdisk("apply", "--lock-timeout", "soon", manifest)
    assert proc.returncode != 0 and "invalid --lock-timeout" in proc.stderr


def test_two_concurrent_applies_run_one_after_the_other(tmp_path):
    qemu_img("create", "-q", "-f", "raw", tmp_path / "src.raw", "64M")
    helpers.qemu_io("raw", str(tmp_path / "src.raw"), "write -P 7 0 32M")
    manifest = write(tmp_path / "m.yml", """
        version: 1
        images:
          - {path: a.qcow2, source: src.raw, compress: true}
          - {path: b.qcow2, size: 8M, snapshots: [s1]}
        """)
    cmd = [sys.executable, "-m", helpers.CLI_MODULE, "apply", "--output=json", "--lock-timeout", "120", manifest]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for dummy in range(2)]
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    for proc in procs:
        proc.stdout.close()
        proc.stderr.close()
    assert [r[0] for r in results] == [0, 0], results
    done = sorted(len(json.loads(r[1])["done"]) for r in results)
    assert done == [0, 3]              # one made everything; the other, after it, found nothing to do
    assert helpers.qemu_compare(str(tmp_path / "a.qcow2"), str(tmp_path / "src.raw"))
    assert helpers.qemu_check(str(tmp_path / "b.qcow2"))["rc"] == 0


def test_lock_is_beside_the_first_manifest_and_outlives_the_run(tmp_path):
    manifest = str(tmp_path / "m.yml")
    with apply_lock(manifest) as path:
        assert path == str(tmp_path / ".m.yml.lock")
        with open(path) as f:
            assert f.read() == "%d\n" % os.getpid()
    assert os.path.exists(path)
    with apply_lock(manifest):           # released: taken again at once
        pass


def test_anchors_merge_keys_and_block_scalars(tmp_path):
    manifest = write(tmp_path / "m.yml", """
        version: 1
        x-small: &small {format: qcow2, size: 4M, snapshots: [pristine]}
        images:
          - {<<: *small, path: a.qcow2}
          - <<: *small
            size: 8M
            path: >-
              b.qcow2
          - path: |-
              c.qcow2
            <<: *small
            mode: 0640
        """)
    assert vdisk("validate", manifest).returncode == 0
    assert vdisk("apply", manifest).returncode == 0
    assert [info(tmp_path / n)["virtual-size"] for n in ("a.qcow2", "b.qcow2", "c.qcow2")] == [4 * M, 8 * M, 4 * M]
    assert [s["name"] for s in info(tmp_path / "b.qcow2")["snapshots"]] == ["pristine"]
    assert os.stat(str(tmp_path / "c.qcow2")).st_mode & 0o7777 == 0o640
    assert vdisk("plan", manifest).returncode == 0


def test_unquoted_decimal_mode_is_refused_with_its_line(tmp_path):
    manifest = write(tmp_path / "m.yml", "version: 1\nimages:\n  - path: a.qcow2\n    size: 1M\n    mode: 640\n")
    proc = vdisk("plan", manifest)
    assert proc.returncode == 1 and not (tmp_path / "a.qcow2").exists()
    assert proc.stderr == ("vdisk: plan: %s: line 5: images[0] (a.qcow2): mode: 640 is read as a decimal number: "
                           "write '0640' (quoted) or 0640 for an octal mode\n" % manifest)


# -- http sources through the CLI: --cache, progress, a saved plan --------------------------------------
def test_cli_downloads_with_progress_and_cache(tmp_path, server):
    import hashlib
    origin = tmp_path / "origin.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", origin, "8M")
    helpers.qemu_io("qcow2", str(origin), "write -P 5 0 1M")
    data = origin.read_bytes()
    url = server.serve("/cloud.qcow2", data)
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    fleet, cache = tmp_path / "fleet", tmp_path / "cache"
    fleet.mkdir()
    manifest = write(fleet / "m.yml", """
        version: 1
        images:
          - {path: cloud.qcow2, source: %s, source_checksum: %s, size: 16M}
        """ % (url, checksum))
    proc = vdisk("plan", "--cache", cache, manifest)
    assert proc.returncode == 2 and "convert: qcow2, size known after the download; content from %s" % url \
        in proc.stdout, proc.stdout
    assert server.requests == []                             # plan never downloads
    proc = vdisk("apply", "--cache", cache, manifest)
    assert proc.returncode == 0, proc.stderr
    # not a terminal (a CI log): one line as the download starts, one as it ends
    assert proc.stderr == "vdisk: downloading %s (%s)\nvdisk: downloaded %s\n" % (url, format_size(len(data)), url)
    assert info(fleet / "cloud.qcow2")["virtual-size"] == 16 * M
    assert sorted(os.listdir(str(cache))) == ["sha256-" + checksum[7:]]
    # a second image from the cache, through a saved plan: the plan knows the size, nothing is downloaded
    os.unlink(str(fleet / "cloud.qcow2"))
    proc = vdisk("plan", "--cache", cache, "--out", tmp_path / "p.plan", manifest)
    assert proc.returncode == 2 and "convert: qcow2, 8 MiB; content from %s" % url in proc.stdout, proc.stdout
    proc = vdisk("apply", tmp_path / "p.plan")
    assert proc.returncode == 0, proc.stderr
    assert server.requests == ["/cloud.qcow2"]
    assert helpers.qemu_check(str(fleet / "cloud.qcow2"))["rc"] == 0
