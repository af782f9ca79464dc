"""The CLI beyond qemu-img 7.2's output: ``--help`` of every command, ``snapshot -l`` and
``compare`` with ``--output=json``, and a non-VMDK file opened as VMDK.

qemu-img 7.2 (and every later one) has no JSON output for snapshot or compare: vdisk's keys are
QAPI's, checked here against what qemu-img itself prints (``info --output=json`` for snapshots,
the messages and exit statuses of ``compare``).  vdisk runs in-process where that is enough; the
real entry point (``python -m``) is run for ``-h`` and the VMDK error.
"""
import json
import re
import subprocess

import pytest

import helpers
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import COMMANDS, main as vdisk_main


def vdisk(capsys, *args):
    """The vdisk command in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = vdisk_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def qemu(*args):
    return subprocess.run(["qemu-img"] + [str(a) for a in args], capture_output=True, text=True)


# -- a file that is not a VMDK, opened as one ---------------------------------------------
def _qcow2(path, size="1M", *options):
    qemu("create", "-f", "qcow2", *options, path, size)


NOT_VMDK = {
    "small qcow2": lambda p: _qcow2(p),
    # the case of the issue: a qcow2 image of 512 MiB, far over the descriptor bound (sparse)
    "large qcow2": lambda p: _qcow2(p, "512M", "-o", "preallocation=metadata"),
    "text": lambda p: p.write_text("hello\nthis is not a VMDK descriptor\nRW nonsense\n"),
    "descriptor without createType": lambda p: p.write_text(
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nRW 2048 FLAT "x.raw" 0\n'),
    "createType past the first MiB": lambda p: p.write_text(
        "# Disk DescriptorFile\n" + "# padding\n" * (MiB // 10) + 'createType="monolithicFlat"\n'),
}


@pytest.mark.parametrize("kind", sorted(NOT_VMDK))
def test_not_a_vmdk_is_an_invalid_descriptor_as_in_qemu(tmp_path, kind):
    path = tmp_path / "image"
    NOT_VMDK[kind](path)
    theirs = qemu("info", "-f", "vmdk", path)
    mine = helpers.vdisk_cli("info", "-f", "vmdk", path)
    assert theirs.returncode == mine.returncode == 1
    assert theirs.stderr == "qemu-img: Could not open '%s': invalid VMDK image descriptor\n" % path
    assert mine.stderr == "vdisk: info: %s: invalid VMDK image descriptor\n" % path


def test_real_descriptor_over_the_bound_is_refused(tmp_path):
    """QEMU reads the first MiB of a longer descriptor and ignores the rest; vdisk refuses it."""
    helpers.make_raw(tmp_path / "flat.raw", MiB)
    path = tmp_path / "long.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 2048 FLAT "flat.raw" 0\n'
                    + "# padding\n" * (MiB // 10))
    mine = helpers.vdisk_cli("info", "-f", "vmdk", path)
    assert mine.returncode == 1
    assert mine.stderr == "vdisk: info: %s: descriptor file too large (%d bytes, at most %d)\n" % (
        path, path.stat().st_size, MiB - 1)


# -- snapshot -l --output=json -------------------------------------------------------------
@pytest.fixture()
def snapshotted(tmp_path):
    """A qcow2 image with three snapshots taken by qemu-img, data written between them."""
    path = tmp_path / "snap.qcow2"
    _qcow2(path, "16M")
    for i, name in enumerate(("first", "second", "a name with spaces")):
        helpers.qemu_io("qcow2", path, "write -P %d %dM 64k" % (i + 1, i))
        assert qemu("snapshot", "-c", name, path).returncode == 0
    return path


def test_snapshot_list_json_is_qemu_info_snapshots(capsys, snapshotted):
    rc, out, err = vdisk(capsys, "snapshot", "-l", "--output=json", snapshotted)
    assert (rc, err) == (0, "")
    assert out.startswith("[\n    {\n        \"")        # QAPI's pretty-printing: 4-space indent
    assert json.loads(out) == helpers.qemu_info(snapshotted)["snapshots"]
    assert [s["name"] for s in json.loads(out)] == ["first", "second", "a name with spaces"]


def test_snapshot_list_json_without_snapshots_is_an_empty_list(capsys, tmp_path):
    path = tmp_path / "none.qcow2"
    _qcow2(path)
    assert "snapshots" not in helpers.qemu_info(path)
    assert vdisk(capsys, "snapshot", "-l", "--output=json", path) == (0, "[]\n", "")


def test_snapshot_list_human_is_unchanged(capsys, snapshotted):
    rc, out, dummy = vdisk(capsys, "snapshot", "-l", snapshotted)
    assert (rc, out) == (0, qemu("snapshot", "-l", snapshotted).stdout)


# -- compare --output=json -----------------------------------------------------------------
@pytest.fixture()
def pair(tmp_path):
    """Raw files with the fill pattern: a (4 MiB), same (a copy as qcow2), other (one byte
    changed at 1 MiB + 700), longer (a with 1 MiB of zeros after), tail (a with data after)."""
    extents = [(0, 64 * 1024), (MiB, 8192), (3 * MiB, 4096)]
    files = {"a": helpers.make_raw(tmp_path / "a.raw", 4 * MiB, extents),
             "longer": helpers.make_raw(tmp_path / "longer.raw", 5 * MiB, extents),
             "tail": helpers.make_raw(tmp_path / "tail.raw", 5 * MiB, extents + [(4 * MiB + 512, 512)]),
             "other": helpers.make_raw(tmp_path / "other.raw", 4 * MiB, extents)}
    with open(files["other"], "r+b") as f:
        f.seek(MiB + 700)
        f.write(b"\xff")
    files["same"] = str(tmp_path / "same.qcow2")
    assert qemu("convert", "-f", "raw", "-O", "qcow2", files["a"], files["same"]).returncode == 0
    return files


MISMATCH = re.compile(r"Content mismatch at offset (\d+)!")
STATUS_MISMATCH = re.compile(r"Strict mode: Offset (\d+) block status mismatch!")


@pytest.mark.parametrize("first, second, strict", [
    ("a", "same", False),          # identical
    ("a", "other", False),         # different content
    ("a", "longer", False),        # sizes differ, the tail reads as zeros: identical
    ("longer", "a", False),
    ("a", "tail", False),          # sizes differ and the tail holds data
    ("a", "longer", True),         # strict: a size difference is a difference
    ("a", "same", True),           # strict: raw and qcow2 allocation differ
    ("a", "a", True),
])
def test_compare_json_agrees_with_qemu(capsys, pair, first, second, strict):
    args = (["-s"] if strict else []) + [pair[first], pair[second]]
    theirs = qemu("compare", *args)
    assert theirs.returncode in (0, 1), theirs.stderr
    rc, out, err = vdisk(capsys, "compare", "--output=json", *args)
    assert (rc, err) == (theirs.returncode, "")
    found = json.loads(out)
    assert set(found) == {"identical", "first-difference", "size-mismatch", "block-status-mismatch"}
    assert found["identical"] == (theirs.returncode == 0)
    offset = MISMATCH.search(theirs.stdout)
    assert found["first-difference"] == (int(offset.group(1)) if offset else None)
    status = STATUS_MISMATCH.search(theirs.stdout)
    assert found["block-status-mismatch"] == (int(status.group(1)) if status else None)
    assert found["size-mismatch"] == ("Image size mismatch!" in theirs.stdout)
    # the human output is still qemu-img's, word for word
    assert vdisk(capsys, "compare", *args)[:2] == (theirs.returncode, theirs.stdout)


def test_compare_json_on_an_error_prints_no_json(capsys, pair, tmp_path):
    missing = tmp_path / "missing.raw"
    assert qemu("compare", pair["a"], missing).returncode == 2
    rc, out, err = vdisk(capsys, "compare", "--output=json", pair["a"], missing)
    assert (rc, out) == (2, "")
    assert err.startswith("vdisk: compare: ") and err.count("\n") == 1


def test_compare_json_ignores_quiet_and_progress(capsys, pair):
    """-q silences qemu-img's messages, not the JSON; -p would mix progress into it."""
    offset = int(MISMATCH.search(qemu("compare", pair["a"], pair["other"]).stdout).group(1))
    rc, out, err = vdisk(capsys, "compare", "-q", "-p", "--output=json", pair["a"], pair["other"])
    assert (rc, err) == (1, "")
    assert json.loads(out)["first-difference"] == offset


# -- --help of every command ---------------------------------------------------------------
# the flags each command has (docs/cli.md); the help must describe each of them, and every
# other option it lists
FLAGS = {
    "create": "-q -f -o -b -F -u --allow-path",
    "convert": "-q -p -c -f -O -o -B -F -t -T -S -C -n -m -W -l -U --force-share --target-is-zero --bitmaps --skip-broken-bitmaps --allow-path",
    "info": "-f --output --backing-chain -U --force-share --allow-path",
    "map": "-f --output -U --force-share --allow-path",
    "check": "-q -f -r --output -U --force-share --allow-path",
    "snapshot": "-q -f -l -c -a -d --output -U --force-share --allow-path",
    "resize": "-q -f --shrink --preallocation --allow-path",
    "commit": "-q -p -f -b -d -t --allow-path",
    "rebase": "-q -p -f -u -b -F -t -T --allow-path",
    "amend": "-q -p -f -o --force --allow-path",
    "bitmap": "--add --remove --clear --enable --disable --merge -b --source-file -F --source-format -g "
              "--granularity -f --object --allow-path",
    "compare": "-q -p -f -F -s -U --force-share --output --allow-path",
    "measure": "-O -o --size -f -l --output -U --force-share --allow-path",
    "inspect": "-f --output --allow-path",
    "validate": "--output --allow-path --color --no-color",
    "plan": "--output --allow-path --color --no-color --cache --out",
    "apply": "--output --allow-path --color --no-color --cache --lock-timeout",
}


def described_options(text):
    """``{option string: description}`` from argparse's help: an entry is a line indented by
    two spaces, its description follows after two spaces or on the lines indented further."""
    entries = {}
    current = None
    for line in text.splitlines():
        entry = re.match(r"^  (\S(?:\S| (?! ))*)(?: {2,}(\S.*))?$", line)
        if entry:
            current = entry.group(1)
            entries[current] = entry.group(2) or ""
        elif current is not None and re.match(r"^ {3,}\S", line):
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    described = {}
    for invocation, description in entries.items():
        for part in invocation.split(", "):
            described[part.split()[0]] = description
    return described


def test_every_command_has_a_flag_table():
    assert set(FLAGS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_lists_every_flag(capsys, command):
    rc, out, err = vdisk(capsys, command, "--help")
    assert (rc, err) == (0, "")
    assert out.startswith("usage: vdisk %s " % command)
    assert set(FLAGS[command].split()) | {"-h", "--help"} <= set(described_options(out)), out


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_describes_every_flag(capsys, command):
    out = vdisk(capsys, command, "--help")[1]
    assert {option: text for option, text in described_options(out).items() if not text} == {}, out


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_short_help_from_the_entry_point(command):
    proc = helpers.vdisk_cli(command, "-h")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("usage: vdisk %s " % command)


def test_help_is_not_a_usage_error_among_other_arguments(capsys, tmp_path):
    """argparse prints the help when it meets -h, whatever else is on the line; nothing runs."""
    target = tmp_path / "new.qcow2"
    rc, out, err = vdisk(capsys, "create", "-f", "qcow2", target, "1M", "--help")
    assert (rc, err) == (0, "") and out.startswith("usage: vdisk create ")
    assert not target.exists()


def test_global_help_names_per_command_help(capsys):
    rc, out, dummy = vdisk(capsys, "--help")
    assert rc == 0 and "vdisk COMMAND --help" in out
