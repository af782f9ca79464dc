"""vdisk convert against the qemu-img oracle.

Every output vdisk writes must pass ``qemu-img check`` (no errors, no leaks) and
``qemu-img compare`` against its source, over a matrix of sources (raw and qcow2 made by
qemu-img/qemu-io: unaligned sizes ending mid-cluster, compressed clusters, zero clusters,
extended L2, version 2, backing chains) x targets (raw, qcow2 with create options) x modes
(plain, ``-c``, ``-S 0``, ``-B``), plus the flags of qemu-img convert and interruptions.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import helpers
from helpers import MiB, qemu_img, qemu_io, run, vdisk_cli
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.convert import ConvertOptions, convert

KiB = 1024
SIZE = 5 * MiB + 3 * 512          # ends mid-cluster for every cluster size above 512 bytes


def _noise(seed, n):
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, "little")


def _fill_raw(path):
    """Pattern data at unaligned offsets, incompressible noise, explicit zero data and holes."""
    helpers.make_raw(path, SIZE, [(1000, 70 * KiB + 5), (MiB - 4096, 8192), (2 * MiB + 512, 300 * KiB),
                                  (SIZE - 2000, 2000)])
    with open(path, "r+b") as f:
        f.seek(3 * MiB + 4096)
        f.write(_noise(1, 200 * KiB))            # does not compress: stored uncompressed by -c
        f.seek(4 * MiB)
        f.write(bytes(256 * KiB))                # allocated zeros: detected, never written
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert-sources")
    raw = _fill_raw(d / "src.raw")
    out = {"raw": (raw, "raw")}
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, d / "plain.qcow2", check=True)
    out["qcow2"] = (str(d / "plain.qcow2"), "qcow2")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, d / "comp.qcow2", check=True)
    out["qcow2-compressed"] = (str(d / "comp.qcow2"), "qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k", raw,
             d / "ext.qcow2", check=True)
    qemu_io("qcow2", d / "ext.qcow2", "write -z 8k 4k", "write -P 0x5a 70k 1k", "discard 2m 256k")
    out["qcow2-extl2"] = (str(d / "ext.qcow2"), "qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10,cluster_size=512", raw, d / "v2.qcow2",
             check=True)
    out["qcow2-v2-512"] = (str(d / "v2.qcow2"), "qcow2")
    # a 3-level chain: base <- mid <- top, with zeros written over data of lower layers
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, d / "base.qcow2", check=True)
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "mid.qcow2", check=True)
    qemu_io("qcow2", d / "mid.qcow2", "write -P 0x21 100k 200k", "write -z 2200k 64k")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2", check=True)
    qemu_io("qcow2", d / "top.qcow2", "write -P 0x31 150k 10k", "write -z 1000 3000", "discard 3m 64k",
            "write -P 0x32 %d 100" % (SIZE - 100))
    out["qcow2-chain"] = (str(d / "top.qcow2"), "qcow2")
    return out


TARGETS = [
    ("raw", [], False),
    ("raw-S0", ["-S", "0"], False),
    ("qcow2", [], False),
    ("qcow2-S0", ["-S", "0"], False),
    ("qcow2-512", ["-o", "cluster_size=512"], False),
    ("qcow2-2M-v2", ["-o", "cluster_size=2M,compat=0.10"], False),
    ("qcow2-extl2", ["-o", "extended_l2=on"], False),
    ("qcow2-refcount1", ["-o", "refcount_bits=1"], False),
    ("qcow2-prealloc-metadata", ["-o", "preallocation=metadata"], False),
    ("qcow2-c", ["-c"], True),
    ("qcow2-c-4k", ["-c", "-o", "cluster_size=4096"], True),
    ("qcow2-c-512-v2", ["-c", "-o", "cluster_size=512,compat=0.10"], True),
    ("qcow2-c-extl2", ["-c", "-o", "extended_l2=on,cluster_size=128k"], True),
    ("qcow2-c-refcount1", ["-c", "-o", "refcount_bits=1"], True),
    ("qcow2-c-2M", ["-c", "-o", "cluster_size=2M"], True),
]


def _assert_clean(path):
    result = helpers.qemu_check(path)
    assert result["rc"] == 0, result
    assert not result.get("leaks"), result
    assert not result.get("corruptions"), result
    return result


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("source", ["raw", "qcow2", "qcow2-compressed", "qcow2-extl2", "qcow2-v2-512",
                                    "qcow2-chain"])
def test_convert_matrix_is_valid_and_equal_for_qemu(tmp_path, sources, source, target):
    name, flags, compressed = target
    src, src_fmt = sources[source]
    out_fmt = name.split("-")[0]
    dest = tmp_path / ("out." + out_fmt)
    vdisk_cli("convert", "-f", src_fmt, "-O", out_fmt, *flags, src, dest, check=True)
    assert helpers.qemu_compare(src, dest, src_fmt, out_fmt), "content differs from the source"
    assert helpers.qemu_info(dest)["virtual-size"] == SIZE
    if out_fmt == "qcow2":
        result = _assert_clean(dest)
        if compressed:
            assert result.get("compressed-clusters", 0) > 0, result
            # packing as dense as qemu-img's own -c output (within 10% and two clusters of metadata)
            ref = tmp_path / "ref.qcow2"
            qemu_img("convert", "-f", src_fmt, "-O", "qcow2", *flags, src, ref, check=True)
            cluster = helpers.qemu_info(ref)["cluster-size"]
            assert os.path.getsize(dest) <= os.path.getsize(ref) * 1.1 + 2 * cluster
    if "-S" in flags:
        _assert_fully_allocated(dest, out_fmt)
    if out_fmt == "qcow2" and not compressed:
        # zeros detected and data allocated per target cluster (subcluster) as qemu-img does
        ref = tmp_path / "ref.qcow2"
        qemu_img("convert", "-f", src_fmt, "-O", "qcow2", *flags, src, ref, check=True)
        assert _allocation(dest) == _allocation(ref)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".vdisk-tmp")]


def _allocation(path):
    """qemu-img map's view of an image without host offsets: which ranges hold data or zeros."""
    extents = json.loads(qemu_img("map", "--output=json", path, check=True).stdout)
    merged = []
    for e in extents:
        key = (e["data"], e["zero"])
        if merged and merged[-1][2] == key and merged[-1][0] + merged[-1][1] == e["start"]:
            merged[-1][1] += e["length"]
        else:
            merged.append([e["start"], e["length"], key])
    return merged


def _assert_fully_allocated(path, fmt):
    if fmt == "raw":
        assert os.stat(path).st_blocks * 512 >= SIZE, "-S 0 output has holes"
    else:
        extents = json.loads(qemu_img("map", "--output=json", path, check=True).stdout)
        assert all(e["data"] and not e["zero"] for e in extents), extents


def test_compressed_output_stores_incompressible_clusters_uncompressed(tmp_path, sources):
    src, _ = sources["raw"]
    dest = tmp_path / "c.qcow2"
    vdisk_cli("convert", "-c", "-f", "raw", "-O", "qcow2", src, dest, check=True)
    extents = json.loads(qemu_img("map", "--output=json", dest, check=True).stdout)
    noise = [e for e in extents if e["start"] <= 3 * MiB + 64 * KiB < e["start"] + e["length"]]
    assert noise, "noise cluster should be a plain data cluster"
    assert noise[0]["data"], "noise cluster should be a plain data cluster"
    assert "offset" in noise[0], "noise cluster should be a plain data cluster"


# -- -B: output with a backing file ------------------------------------------------------------
def _depth0_bytes(path):
    extents = json.loads(qemu_img("map", "--output=json", path, check=True).stdout)
    return sum(e["length"] for e in extents if e["depth"] == 0 and e["present"])


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
@pytest.mark.parametrize("options", ["", "compat=0.10", "extended_l2=on"])
def test_backing_output_holds_only_what_differs(tmp_path, sources, compress, options):
    raw, _ = sources["raw"]
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base, check=True)
    modified = tmp_path / "mod.raw"
    modified.write_bytes(open(raw, "rb").read())
    qemu_io("raw", modified, "write -P 0x77 %d 1000" % (MiB + 100), "write -z %d %d" % (2 * MiB + 512, 128 * KiB),
            "write -P 0x78 %d 64k" % (4 * MiB + 128 * KiB))
    dest = tmp_path / "ov.qcow2"
    flags = (["-c"] if compress else []) + (["-o", options] if options else [])
    vdisk_cli("convert", "-f", "raw", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", *flags, modified, dest,
              check=True)
    info = helpers.qemu_info(dest)
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    _assert_clean(dest)
    assert helpers.qemu_compare(modified, dest, "raw", "qcow2")
    # three changed places, each within at most three 64 KiB clusters
    assert 0 < _depth0_bytes(dest) <= 9 * 64 * KiB, _depth0_bytes(dest)


def test_backing_output_from_an_overlay_of_that_backing_copies_only_the_overlay(tmp_path, sources):
    top, _ = sources["qcow2-chain"]
    d = os.path.dirname(top)
    dest = tmp_path / "flat-over-base.qcow2"
    vdisk_cli("convert", "-f", "qcow2", "-O", "qcow2", "-B", os.path.join(d, "base.qcow2"), "-F", "qcow2",
              "--allow-path", d, top, dest, check=True)
    _assert_clean(dest)
    assert helpers.qemu_compare(top, dest, "qcow2", "qcow2")
    # mid and top changed ~300 KiB: the output holds those, nothing of base
    assert _depth0_bytes(dest) <= 600 * KiB


def test_backing_errors_are_one_line(tmp_path, sources):
    raw, _ = sources["raw"]
    out = vdisk_cli("convert", "-O", "raw", "-B", raw, raw, tmp_path / "x.raw")
    assert out.returncode == 1 and "Backing file not supported for file format 'raw'" in out.stderr
    out = vdisk_cli("convert", "-O", "qcow2", "-B", tmp_path / "missing.qcow2", "-F", "qcow2", raw,
                    tmp_path / "x.qcow2")
    assert out.returncode == 1 and "Could not open backing file" in out.stderr
    out = vdisk_cli("convert", "-O", "qcow2", "-F", "qcow2", raw, tmp_path / "x.qcow2")
    assert out.returncode == 1 and "-B" in out.stderr
    for out in [vdisk_cli("convert", "-c", "-O", "raw", raw, tmp_path / "y.raw")]:
        assert out.returncode == 1 and "Compression not supported for this file format" in out.stderr
        assert out.stderr.count("\n") == 1
    assert not os.listdir(tmp_path)


# -- -l: from an internal snapshot ---------------------------------------------------------------
def test_convert_from_internal_snapshot_equals_qemu(tmp_path, sources):
    raw, _ = sources["raw"]
    img = tmp_path / "snap.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, img, check=True)
    qemu_img("snapshot", "-c", "first", img, check=True)
    qemu_io("qcow2", img, "write -P 0x44 0 1m", "write -z 3m 1m")
    qemu_img("resize", img, "+3M", check=True)
    qemu_img("snapshot", "-c", "second", img, check=True)
    qemu_io("qcow2", img, "write -P 0x45 2m 2m")
    for param in ["first", "1", "snapshot.name=second", "snapshot.id=1", "snapshot.id=2,snapshot.name=second"]:
        for flags in ([], ["-c"]):
            ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.raw"
            vdisk_cli("convert", "-l", param, *flags, "-f", "qcow2", "-O", "qcow2", img, ours, check=True)
            qemu_img("convert", "-l", param, "-f", "qcow2", "-O", "raw", img, theirs, check=True)
            _assert_clean(ours)
            assert helpers.qemu_compare(ours, theirs, "qcow2", "raw"), param
            assert helpers.qemu_info(ours)["virtual-size"] == os.path.getsize(theirs)
    for param, message in [("nope", "Can't find snapshot"), ("snapshot.id=1,snapshot.name=second", "Can't find"),
                           ("snapshot.size=1", "Invalid parameter 'snapshot.size'")]:
        out = vdisk_cli("convert", "-l", param, "-O", "raw", img, tmp_path / "x.raw")
        assert out.returncode == 1, out.stderr
        assert message in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1, out.stderr
    out = vdisk_cli("convert", "-l", "first", "-O", "raw", img, img, tmp_path / "x.raw")
    assert out.returncode == 1 and "No support for concatenating multiple snapshot" in out.stderr


# -- several sources, -n, --target-is-zero ---------------------------------------------------------
def test_several_sources_are_concatenated(tmp_path, sources):
    a, _ = sources["raw"]
    b, _ = sources["qcow2-chain"]
    dest = tmp_path / "cat.qcow2"
    vdisk_cli("convert", "-O", "qcow2", "--allow-path", os.path.dirname(b), a, b, dest, check=True)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", a, b, ref, check=True)
    _assert_clean(dest)
    assert helpers.qemu_compare(dest, ref, "qcow2", "raw")
    assert helpers.qemu_info(dest)["virtual-size"] == os.path.getsize(ref)


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_existing_target_is_overwritten_in_place(tmp_path, sources, out_fmt):
    raw, _ = sources["raw"]
    dest = tmp_path / ("t." + out_fmt)
    qemu_img("create", "-f", out_fmt, dest, str(SIZE + MiB), check=True)
    qemu_io(out_fmt, dest, "write -P 0xee 0 %d" % (SIZE + MiB))      # old content everywhere
    vdisk_cli("convert", "-n", "-O", out_fmt, raw, dest, check=True)
    ref = tmp_path / "ref.raw"
    helpers.make_raw(ref, SIZE + MiB)
    with open(ref, "r+b") as f:
        f.write(open(raw, "rb").read())
        f.write(b"\xee" * MiB)                                       # past the source: untouched
    if out_fmt == "qcow2":
        _assert_clean(dest)
    assert helpers.qemu_compare(dest, ref, out_fmt, "raw", strict=False)
    # --target-is-zero: the target is trusted to read as zeros, so zero ranges are not written
    zero = tmp_path / ("z." + out_fmt)
    qemu_img("create", "-f", out_fmt, zero, str(SIZE), check=True)
    vdisk_cli("convert", "-n", "--target-is-zero", "-O", out_fmt, raw, zero, check=True)
    assert helpers.qemu_compare(zero, raw, out_fmt, "raw")
    small = tmp_path / ("s." + out_fmt)
    qemu_img("create", "-f", out_fmt, small, "1M", check=True)
    out = vdisk_cli("convert", "-n", "-O", out_fmt, raw, small)
    assert out.returncode == 1 and "smaller" in out.stderr


def test_progress_lines_when_not_a_terminal(tmp_path, sources):
    raw, _ = sources["raw"]
    out = vdisk_cli("convert", "-p", "-O", "qcow2", raw, tmp_path / "p.qcow2", check=True)
    lines = out.stdout.splitlines()
    assert lines and lines[-1].strip() == "(100.00/100%)", out.stdout
    assert vdisk_cli("convert", "-p", "-q", "-O", "qcow2", raw, tmp_path / "q.qcow2", check=True).stdout == ""


# -- interruptions -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("convert-big") / "big.raw"
    with open(path, "wb") as f:
        # incompressible noise makes `-c` slow enough (seconds) to be caught under way
        for i in range(128):
            f.write(_noise(i, MiB // 4) + helpers.pattern(i * MiB, 3 * MiB // 4))
    return str(path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_interrupted_convert_leaves_no_partial_destination(tmp_path, big_source, sig, existing):
    dest = tmp_path / "out.qcow2"
    if existing:
        qemu_img("create", "-f", "qcow2", dest, "1M", check=True)
        qemu_io("qcow2", dest, "write -P 0x42 0 1M")
        before = dest.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", helpers.CLI_MODULE, "convert", "-c", "-O", "qcow2",
                             big_source, str(dest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=helpers.default_signals)
    deadline = time.time() + 30
    # wait until the temporary output exists and has grown: the conversion is under way; then
    # freeze the process so it cannot finish between that observation and the signal
    while time.time() < deadline:
        assert proc.poll() is None, "convert finished before it could be interrupted"
        tmps = [f for f in os.listdir(tmp_path) if f.endswith(".vdisk-tmp")]
        try:
            grown = bool(tmps) and os.path.getsize(tmp_path / tmps[0]) > 256 * KiB
        except FileNotFoundError:  # renamed into place meanwhile: the poll above fails next
            grown = False
        if grown:
            proc.send_signal(signal.SIGSTOP)
            if os.path.exists(tmp_path / tmps[0]):
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    if existing:
        assert dest.read_bytes() == before, "the old destination was changed"
    else:
        assert not dest.exists(), "a partial destination exists under the destination's name"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.decode().count("\n") == 1, err
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".vdisk-tmp")], "temporary file left behind"


def test_engine_convert_api_in_process(tmp_path, sources):
    """The engine's convert() without the CLI: what the Ansible module calls."""
    src, _ = sources["qcow2-compressed"]
    dest = str(tmp_path / "api.qcow2")
    seen = []
    convert([src], dest, ConvertOptions(src_fmt="qcow2", out_fmt="qcow2", options={"cluster_size": "16k"},
                                        compress=True),
            progress=lambda done, total: seen.append((done, total)))
    _assert_clean(dest)
    assert helpers.qemu_compare(src, dest, "qcow2", "qcow2")
    assert seen and seen[-1] == (SIZE, SIZE)
    assert run("qemu-img", "info", dest).returncode == 0


# -- bounded memory ------------------------------------------------------------------------------
_MEASURE_RSS = ("import resource, subprocess, sys\n"
                "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
                "sys.stderr.buffer.write(r.stderr)\n"
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
                "sys.exit(r.returncode)\n")


def _peak_rss_mib(*args):
    """Peak RSS of a vdisk command.  It runs under a small wrapper process: a child forked straight
    from pytest would count pytest's own pages (shared until exec) in its ru_maxrss."""
    proc = run(sys.executable, "-c", _MEASURE_RSS, sys.executable, "-m", helpers.CLI_MODULE, *args)
    return int(proc.stdout.split()[-1]) / 1024


def test_converting_a_sparse_terabyte_uses_bounded_memory(tmp_path):
    """1 TiB guests with data scattered over the whole disk: RSS stays far under 200 MB."""
    src = tmp_path / "tb.raw"
    extents = [(i * (64 << 30) + 12345 * 512, 3 * MiB) for i in range(16)]
    helpers.make_raw(src, 1 << 40, extents)
    assert _peak_rss_mib("convert", "-f", "raw", "-O", "qcow2", src, tmp_path / "tb.qcow2") < 200
    assert _peak_rss_mib("convert", "-c", "-f", "qcow2", "-O", "qcow2", tmp_path / "tb.qcow2",
                         tmp_path / "tbc.qcow2") < 200
    assert _peak_rss_mib("convert", "-f", "qcow2", "-O", "raw", tmp_path / "tbc.qcow2", tmp_path / "back.raw") < 200
    for offset, length in extents:
        with open(tmp_path / "back.raw", "rb") as f:
            f.seek(offset)
            assert f.read(length) == helpers.pattern(offset, length)
    assert os.path.getsize(tmp_path / "back.raw") == 1 << 40
    assert os.stat(tmp_path / "back.raw").st_blocks * 512 < 256 * MiB
    _assert_clean(tmp_path / "tbc.qcow2")


def test_copy_offload_raw_to_raw_and_its_conflicts(tmp_path, sources):
    raw, _ = sources["raw"]
    dest = tmp_path / "offload.raw"
    vdisk_cli("convert", "-C", "-f", "raw", "-O", "raw", raw, dest, check=True)
    assert dest.read_bytes() == open(raw, "rb").read()
    qc = tmp_path / "offload.qcow2"          # no host-file layout to copy into: copied by reading
    vdisk_cli("convert", "-C", "-f", "raw", "-O", "qcow2", raw, qc, check=True)
    assert helpers.qemu_compare(qc, raw, "qcow2", "raw")
    for flags, message in [(["-c"], "Cannot enable copy offloading when -c is used"),
                           (["-S", "0"], "Cannot enable copy offloading when -S is used")]:
        out = vdisk_cli("convert", "-C", *flags, "-O", "qcow2", raw, tmp_path / "x.qcow2")
        assert out.returncode == 1
        assert message in out.stderr
        assert out.stderr.count("\n") == 1


@pytest.mark.parametrize("fmt", ["dmg", "cloop"])
def test_convert_to_a_read_only_format_names_the_destination(tmp_path, fmt):
    src = tmp_path / "s.raw"
    src.write_bytes(bytes(MiB))
    dest = tmp_path / ("o." + fmt)
    r = vdisk_cli("convert", "-O", fmt, str(src), str(dest))
    assert r.returncode == 1
    assert r.stderr.strip() == "vdisk: convert: %s: Format driver '%s' does not support image creation" % (dest, fmt)
    assert os.listdir(str(tmp_path)) == ["s.raw"]       # no temporary file left either
