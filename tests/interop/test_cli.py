"""The vdisk command against qemu-img: same output, same keys, same exit codes, one-line errors."""
import json
import os
import subprocess
import sys

import pytest

import helpers

VDISK = [sys.executable, "-m", "ansible_collections.vdisk.images.plugins.module_utils.vdisk"]
MiB = 1 << 20


def vdisk(*args, cwd=None):
    return subprocess.run(VDISK + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


def qemu(*args, cwd=None, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, check=check)


@pytest.fixture()
def chain(tmp_path):
    """base.qcow2 <- ov.qcow2 (lazy refcounts, a snapshot, data) and a raw file, made by qemu-img."""
    qemu("qemu-img", "create", "-f", "qcow2", "base.qcow2", "64M", cwd=tmp_path)
    qemu("qemu-io", "-c", "write -P 1 0 3M", "-c", "write -P 2 40M 1M", "base.qcow2", cwd=tmp_path)
    qemu("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "lazy_refcounts=on",
         "ov.qcow2", cwd=tmp_path)
    qemu("qemu-img", "snapshot", "-c", "snap1", "ov.qcow2", cwd=tmp_path)
    qemu("qemu-io", "-c", "write -P 3 1M 64k", "-c", "write -z 2M 128k", "ov.qcow2", cwd=tmp_path)
    qemu("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", "v2.qcow2", "5M", cwd=tmp_path)
    qemu("qemu-img", "create", "-f", "raw", "r.raw", "3M", cwd=tmp_path)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 9 1M 4k", "r.raw", cwd=tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", ["ov.qcow2", "base.qcow2", "v2.qcow2", "r.raw"])
def test_info_human_is_qemus(chain, name):
    mine = vdisk("info", name, cwd=chain)
    assert mine.returncode == 0, mine.stderr
    theirs = qemu("qemu-img", "info", name, cwd=chain).stdout
    strip = lambda text: [l for l in text.splitlines() if not l.startswith("disk size:")]  # noqa: E731
    assert strip(mine.stdout) == strip(theirs)


@pytest.mark.parametrize("name", ["ov.qcow2", "base.qcow2", "v2.qcow2", "r.raw"])
def test_info_json_agrees_on_every_key_both_print(chain, name):
    mine = json.loads(vdisk("info", "--output=json", name, cwd=chain).stdout)
    theirs = json.loads(qemu("qemu-img", "info", "--output=json", name, cwd=chain).stdout)
    common = set(mine) & set(theirs)
    assert common >= {"filename", "format", "virtual-size", "dirty-flag"}
    for key in common - {"actual-size"}:
        assert mine[key] == theirs[key], key
    assert set(theirs) - set(mine) <= set(), set(theirs) - set(mine)


def test_info_backing_chain_json(chain):
    mine = json.loads(vdisk("info", "--backing-chain", "--output=json", "ov.qcow2", cwd=chain).stdout)
    theirs = json.loads(qemu("qemu-img", "info", "--backing-chain", "--output=json", "ov.qcow2", cwd=chain).stdout)
    assert [i["filename"] for i in mine] == [i["filename"] for i in theirs]
    for a, b in zip(mine, theirs):
        for key in (set(a) & set(b)) - {"actual-size"}:
            assert a[key] == b[key], key


@pytest.mark.parametrize("name", ["ov.qcow2", "base.qcow2", "r.raw"])
def test_map_is_qemus(chain, name):
    for output in ("json", "human"):
        mine = vdisk("map", "--output=" + output, name, cwd=chain)
        theirs = qemu("qemu-img", "map", "--output=" + output, name, cwd=chain)
        if name == "r.raw" and output == "json":
            # qemu-img's file driver allocates the first 4 KiB of a new raw file; compare from there
            assert json.loads(mine.stdout)[-1] == json.loads(theirs.stdout)[-1]
            continue
        if name == "r.raw":
            continue
        assert mine.stdout == theirs.stdout


def test_map_human_stops_at_compressed_data_as_qemu_img(tmp_path):
    """qemu-img map prints no host offset for compressed (or encrypted) data: its human output ends
    there with an error, exit 1, after the lines printed before it."""
    raw = tmp_path / "r.raw"
    qemu("qemu-img", "create", "-f", "raw", raw, "4M")
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0x61 2M 1M", raw)
    plain, packed = tmp_path / "p.qcow2", tmp_path / "c.qcow2"
    qemu("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, plain)
    qemu("qemu-io", "-f", "qcow2", "-c", "write -c -P 0x62 3M 64k", plain)     # one compressed cluster
    qemu("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, packed)
    for image in (plain, packed):
        mine = vdisk("map", image)
        theirs = qemu("qemu-img", "map", image, check=False)
        assert (mine.returncode, mine.stdout.replace(str(image), "F")) == (theirs.returncode, theirs.stdout.replace(str(image), "F"))
        assert mine.returncode == 1 and mine.stdout.count("\n") == (2 if image == plain else 1)
        assert mine.stderr == "vdisk: map: File contains external, encrypted or compressed clusters.\n"
        assert vdisk("map", "--output=json", image).returncode == 0


def test_snapshot_list_is_qemus(chain):
    mine = vdisk("snapshot", "-l", "ov.qcow2", cwd=chain)
    assert mine.stdout == qemu("qemu-img", "snapshot", "-l", "ov.qcow2", cwd=chain).stdout


def test_snapshot_cycle_and_check(chain):
    assert vdisk("snapshot", "-c", "mine", "ov.qcow2", cwd=chain).returncode == 0
    listing = qemu("qemu-img", "snapshot", "-l", "ov.qcow2", cwd=chain).stdout
    assert "mine" in listing
    assert vdisk("snapshot", "-a", "snap1", "ov.qcow2", cwd=chain).returncode == 0
    assert vdisk("snapshot", "-d", "mine", "ov.qcow2", cwd=chain).returncode == 0
    bad = vdisk("snapshot", "-a", "nosuch", "ov.qcow2", cwd=chain)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1
    assert "Could not apply snapshot 'nosuch'" in bad.stderr
    assert qemu("qemu-img", "check", "ov.qcow2", cwd=chain).returncode == 0


@pytest.mark.parametrize("fmt_args", [["-O", "raw"], ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"],
                                      ["-O", "qcow2", "-o", "compat=0.10"], ["-O", "raw", "-S", "0"]])
def test_convert_equals_source(chain, fmt_args):
    out = chain / "out.img"
    result = vdisk("convert", *fmt_args, "ov.qcow2", out, cwd=chain)
    assert result.returncode == 0, result.stderr
    fmt = fmt_args[1]
    assert qemu("qemu-img", "compare", "-F", fmt, "ov.qcow2", out, cwd=chain).returncode == 0
    if fmt == "qcow2":
        assert qemu("qemu-img", "check", out, cwd=chain).returncode == 0
    assert not [f for f in os.listdir(chain) if f.endswith(".vdisk-tmp")]


def test_convert_qemu_compressed_and_concatenated(chain):
    qemu("qemu-img", "convert", "-c", "-O", "qcow2", "ov.qcow2", "c.qcow2", cwd=chain)
    assert vdisk("convert", "-O", "raw", "c.qcow2", "r.raw", "cat.raw", cwd=chain).returncode == 0
    qemu("qemu-img", "convert", "-O", "raw", "c.qcow2", "want1.raw", cwd=chain)
    data = (chain / "cat.raw").read_bytes()
    assert data == (chain / "want1.raw").read_bytes() + (chain / "r.raw").read_bytes()


def test_convert_n_needs_a_big_enough_target(chain):
    qemu("qemu-img", "create", "-f", "raw", "small.raw", "1M", cwd=chain)
    result = vdisk("convert", "-n", "-O", "raw", "ov.qcow2", "small.raw", cwd=chain)
    assert result.returncode == 1
    assert "output file is smaller than input file" in result.stderr


def test_create_matches_qemu_layout_and_detects_backing_format(chain):
    result = vdisk("create", "-f", "qcow2", "-b", "base.qcow2", "new.qcow2", cwd=chain)
    assert result.returncode == 0
    assert "detected as qcow2" in result.stderr
    info = json.loads(qemu("qemu-img", "info", "--output=json", "new.qcow2", cwd=chain).stdout)
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 64 * MiB
    assert vdisk("create", "-f", "qcow2", "plain.qcow2", "64M", cwd=chain).returncode == 0
    qemu("qemu-img", "create", "-f", "qcow2", "q.qcow2", "64M", cwd=chain)
    assert (chain / "plain.qcow2").read_bytes() == (chain / "q.qcow2").read_bytes()


@pytest.mark.parametrize("args,needle", [
    (["info", "missing.qcow2"], "No such file"),
    (["create", "-f", "qcow2", "x.qcow2", "4P"], "too large"),
    (["create", "-f", "qcow2", "-o", "cluster_size=3k", "x.qcow2", "1M"], "Cluster size"),
    (["create", "-f", "qcow2", "-o", "nosuch=1", "x.qcow2", "1M"], "Invalid parameter 'nosuch'"),
    (["create", "-f", "nosuchfmt", "x.img", "1M"], "Unknown file format"),
    (["create", "-f", "qcow2", "x.qcow2", "1.5"], "invalid size"),
    (["resize", "ov.qcow2", "1M"], "--shrink"),
    (["amend", "-o", "cluster_size=4k", "ov.qcow2"], "only supported for image creation"),
    (["info", "--output=xml", "ov.qcow2"], "invalid choice"),
    (["bogus"], "Command not found"),
])
def test_errors_are_one_line_and_exit_1(chain, args, needle):
    result = vdisk(*args, cwd=chain)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("vdisk: "), result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_check_exit_codes_and_output(chain):
    mine = vdisk("check", "ov.qcow2", cwd=chain)
    theirs = qemu("qemu-img", "check", "ov.qcow2", cwd=chain, check=False)
    assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout)
    raw = vdisk("check", "r.raw", cwd=chain)
    assert raw.returncode == 63
    assert "does not support checks" in raw.stderr
    # a leak: vdisk check says 3, -r leaks repairs it
    with open(chain / "v2.qcow2", "r+b") as f:
        f.seek(2 * 4096)
        f.write(b"\x00\x02")
    assert vdisk("check", "v2.qcow2", cwd=chain).returncode == 3
    assert qemu("qemu-img", "check", "v2.qcow2", cwd=chain, check=False).returncode == 3
    fixed = vdisk("check", "-r", "leaks", "--output=json", "v2.qcow2", cwd=chain)
    assert fixed.returncode == 0
    assert json.loads(fixed.stdout)["leaks-fixed"] == 1
    assert qemu("qemu-img", "check", "v2.qcow2", cwd=chain).returncode == 0


def test_resize_commit_rebase_compare(chain):
    assert vdisk("resize", "v2.qcow2", "+5M", cwd=chain).stdout == "Image resized.\n"
    assert vdisk("resize", "--shrink", "v2.qcow2", "-2M", cwd=chain).returncode == 0
    assert json.loads(qemu("qemu-img", "info", "--output=json", "v2.qcow2", cwd=chain).stdout)["virtual-size"] == 8 * MiB
    qemu("qemu-img", "convert", "-O", "raw", "ov.qcow2", "want.raw", cwd=chain)
    assert vdisk("rebase", "-b", "", "ov.qcow2", cwd=chain).returncode == 0
    assert vdisk("compare", "ov.qcow2", "want.raw", cwd=chain).stdout == "Images are identical.\n"
    qemu("qemu-img", "create", "-f", "qcow2", "-b", "ov.qcow2", "-F", "qcow2", "top.qcow2", cwd=chain)
    qemu("qemu-io", "-c", "write -P 7 0 64k", "top.qcow2", cwd=chain)
    assert vdisk("commit", "top.qcow2", cwd=chain).stdout == "Image committed.\n"
    differ = vdisk("compare", "ov.qcow2", "want.raw", cwd=chain)
    assert differ.returncode == 1
    assert differ.stdout == "Content mismatch at offset 0!\n"
    assert qemu("qemu-img", "check", "ov.qcow2", cwd=chain).returncode == 0


def test_image_locked_by_qemu_io_is_refused_for_writing(chain):
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "ov.qcow2"], cwd=chain, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        helpers.wait_until_qemu_writes(holder, chain / "ov.qcow2")
        result = vdisk("resize", "ov.qcow2", "+1M", cwd=chain)
        assert result.returncode == 1, result
        assert "in use" in result.stderr, result
        assert result.stderr.count("\n") == 1, result
        shared = vdisk("info", "-U", "ov.qcow2", cwd=chain)
        assert shared.returncode == 0
    finally:
        holder.communicate(b"quit\n", timeout=10)


def test_backing_file_outside_allowed_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    qemu("qemu-img", "create", "-f", "qcow2", tmp_path / "a" / "base.qcow2", "1M")
    qemu("qemu-img", "create", "-f", "qcow2", "-b", "../a/base.qcow2", "-F", "qcow2", tmp_path / "b" / "ov.qcow2")
    refused = vdisk("info", tmp_path / "b" / "ov.qcow2")
    assert refused.returncode == 1
    assert "--allow-path" in refused.stderr
    assert refused.stderr.count("\n") == 1
    allowed = vdisk("info", "--allow-path", tmp_path / "a", tmp_path / "b" / "ov.qcow2")
    assert allowed.returncode == 0, allowed.stderr


def test_version_and_help():
    assert vdisk("--version").stdout.startswith("vdisk version ")
    assert "convert" in vdisk("--help").stdout


@pytest.mark.parametrize("make", [
    ["qemu-img", "create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "img", "3G"],
    ["qemu-img", "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", "img", "1M"],
    ["qemu-img", "create", "-f", "qcow2", "img", "1M"],
])
def test_info_human_nested_format_specific_data(tmp_path, make):
    """Lists and objects under "Format specific information" as qemu-img prints them (vmdk extents,
    qcow2 bitmaps with their flags)."""
    qemu(*make, cwd=tmp_path)
    if make[3] == "qcow2":
        qemu("qemu-img", "bitmap", "--add", "img", "b0", cwd=tmp_path)
        qemu("qemu-img", "bitmap", "--add", "--disable", "-g", "128k", "img", "b1", cwd=tmp_path)
    for name in ("img", str(tmp_path / "img")):
        mine = vdisk("info", name, cwd=tmp_path)
        assert mine.returncode == 0, mine.stderr
        assert mine.stdout == qemu("qemu-img", "info", name, cwd=tmp_path).stdout
        theirs = json.loads(qemu("qemu-img", "info", "--output=json", name, cwd=tmp_path).stdout)
        assert json.loads(vdisk("info", "--output=json", name, cwd=tmp_path).stdout) == theirs


def test_commit_from_a_format_that_cannot_empty_itself(tmp_path):
    """qed has no make_empty: qemu-img commits, says so, and keeps the overlay's data; so does vdisk."""
    qemu("qemu-img", "create", "-f", "raw", "b.raw", "4M", cwd=tmp_path)
    qemu("qemu-img", "create", "-f", "qed", "-b", "b.raw", "-F", "raw", "o.qed", cwd=tmp_path)
    qemu("qemu-io", "-c", "write -P 7 0 64k", "o.qed", cwd=tmp_path)
    r = vdisk("commit", "o.qed", cwd=tmp_path)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "Image committed.", "")
    assert qemu("qemu-img", "compare", "-f", "qed", "-F", "raw", "o.qed", "b.raw", cwd=tmp_path).returncode == 0
    assert "o.qed" in qemu("qemu-img", "map", "o.qed", cwd=tmp_path).stdout      # still allocated in the overlay
    assert qemu("qemu-img", "check", "o.qed", cwd=tmp_path).returncode == 0


def test_check_reports_a_vhdx_bat_entry_past_the_end_as_qemu_does(tmp_path):
    """A plain check opens a VHDX whose BAT is damaged and reports it (exit 2), as qemu-img check does."""
    import struct
    import uuid
    qemu("qemu-img", "create", "-f", "vhdx", "v.vhdx", "64M", cwd=tmp_path)
    qemu("qemu-io", "-c", "write -P 1 0 1M", "v.vhdx", cwd=tmp_path)
    path = tmp_path / "v.vhdx"
    data = path.read_bytes()
    at = data.find(uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le, 192 * 1024)   # the BAT region
    bat, = struct.unpack_from("<Q", data, at + 16)
    entry, = struct.unpack_from("<Q", data, bat)
    with open(str(path), "r+b") as f:
        f.seek(bat)
        f.write(struct.pack("<Q", (entry & 0xFFFFF) | (1 << 40)))       # block 0 at 1 TiB
    before = path.read_bytes()
    theirs = qemu("qemu-img", "check", "v.vhdx", cwd=tmp_path, check=False)
    mine = vdisk("check", "v.vhdx", cwd=tmp_path)
    assert theirs.returncode == mine.returncode == 2
    assert mine.stdout == theirs.stdout
    assert "points after end of file" in mine.stderr
    assert path.read_bytes() == before
    assert vdisk("info", "v.vhdx", cwd=tmp_path).returncode == 1      # other opens still refuse it
