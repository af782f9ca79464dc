"""tests/bench/bench.py's pure helpers, so that the benchmark script cannot rot unnoticed.

Nothing here builds disks or times anything: the benchmark itself is `make bench`.
"""
import importlib.util
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load(name):
    spec = importlib.util.spec_from_file_location("vdisk_bench_" + name, os.path.join(BENCH_DIR, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("bench")
build_disks = _load("build_disks")


def test_median():
    assert bench.median([3.0]) == 3.0
    assert bench.median([5, 1, 3]) == 3
    assert bench.median([4, 1, 3, 2]) == 2.5
    with pytest.raises(ValueError):
        bench.median([])


def test_ratios_are_per_round():
    assert bench.ratios([2.0, 3.0, 4.0], [1.0, 2.0, 4.0]) == [2.0, 1.5, 1.0]
    assert bench.ratios([1.0, 1.0], [0.0, 2.0]) == [0.5]


def test_verdict():
    assert bench.verdict(1.2, 1.2) == "PASS"
    assert bench.verdict(1.21, 1.2) == "MISS"
    assert bench.verdict(0.5, None) == "-"
    assert bench.verdict(None, 1.5) == "-"


def test_best_ratio():
    assert bench.best_ratio([3.0, 1.2, 2.0], [1.0, 0.6, 5.0]) == 2.0
    assert bench.best_ratio([1.0], []) is None
    assert bench.best_ratio([], [1.0]) is None
    assert bench.best_ratio([1.0], [0.0]) is None


def test_formatting():
    assert bench.fmt_seconds(1.234) == "1.23"
    assert bench.fmt_seconds(123.4) == "123"
    assert bench.fmt_seconds(None) == "-"
    assert bench.fmt_ratio(1.5) == "1.50x"
    assert bench.fmt_threshold(0.6) == "<= 0.6x"
    assert bench.fmt_threshold(1.0) == "<= 1.0x"
    assert bench.fmt_threshold(0.25) == "<= 0.25x"
    assert bench.fmt_threshold(None) == "-"
    assert bench.fmt_threshold(2.0, bench.SECONDS) == "<= 2 s"
    assert bench.fmt_threshold(100, bench.RSS_MB) == "RSS <= 100 MB"
    assert bench.fmt_rss(40 * 1024 + 100) == "40 MiB"


def test_parse_only():
    assert bench.parse_only(None) == bench.CELL_NAMES
    assert bench.parse_only(["check,compare"]) == ["compare", "check"]
    assert bench.parse_only(["check", "raw-qcow2"]) == ["raw-qcow2", "check"]
    assert bench.parse_only(["sparse-1t,plan-1000", "startup,backing-os"]) == [
        "backing-os", "startup", "plan-1000", "sparse-1t"]
    for name in bench.CELL_NAMES:                 # every cell can be run alone
        assert bench.parse_only([name]) == [name]
    with pytest.raises(ValueError, match="nope"):
        bench.parse_only(["nope"])


def test_first_line():
    assert bench.first_line("\n  vdisk: convert: -c is not supported\nmore") == "vdisk: convert: -c is not supported"
    assert bench.first_line("") == ""
    assert len(bench.first_line("x" * 500)) == 160


def test_expand():
    argv = bench.expand(["convert", "{in:big.raw}", "{out}"], {"big.raw": "/c/big.raw"}, "/s/out.qcow2")
    assert argv == ["convert", "/c/big.raw", "/s/out.qcow2"]
    # inside QEMU's image options too
    argv = bench.expand(["driver=raw,file.filename={in:big.raw}", "driver=luks,file.filename={out}"],
                        {"big.raw": "/c/big.raw"}, "/s/out.luks")
    assert argv == ["driver=raw,file.filename=/c/big.raw", "driver=luks,file.filename=/s/out.luks"]


def test_cells_are_consistent():
    names = set(build_disks.DEPENDS)
    # issue 21's targets
    targets = {c.name: (c.threshold, c.target) for c in bench.CELLS}
    r = bench.RATIO
    assert targets == {"raw-qcow2": (1.0, r), "compressed": (0.3, r), "compressed-raw": (1.0, r),
                       "qcow2-raw": (1.0, r), "backing": (None, r),
                       "raw-vdi": (1.0, r), "raw-vpc": (1.0, r), "raw-vhdx": (1.0, r), "vmdk-stream": (0.3, r),
                       "compare": (1.0, r), "check": (0.8, r), "backing-os": (1.0, r), "startup": (2.0, r),
                       "plan-1000": (2.0, bench.SECONDS), "sparse-1t": (100, bench.RSS_MB),
                       "raw-luks": (1.2, r), "raw-qcow2-luks": (1.2, r)}
    assert len(set(bench.CELL_NAMES)) == len(bench.CELL_NAMES)
    for cell in bench.CELLS:
        args = [a for argv in cell.argvs() for a in argv]
        used = {m.group(1) for a in args for m in bench.PLACEHOLDER.finditer(a) if m.group(1)}
        assert used <= set(cell.inputs) <= names, cell.name
        assert any("{out}" in a for a in args) == (cell.output is not None), cell.name
        for fixture, _ in cell.links:
            assert fixture in cell.inputs
        # a cell without qemu-img cannot have a target relative to it, nor a qemu-img verification
        assert cell.qemu or (cell.target != bench.RATIO and cell.expect_rc is not None and not cell.verify)
        if cell.backing:
            assert "-B" in cell.args and cell.args[cell.args.index("-B") + 1] == cell.backing
            assert (cell.backing in [name for _, name in cell.links])


def _cell(name):
    return {c.name: c for c in bench.CELLS}[name]


FIXTURES = {name: "/c/" + name for name in build_disks.DEPENDS}


def test_backing_os_cell():
    cell = _cell("backing-os")
    assert bench.expand(cell.args, FIXTURES, "/s/out.qcow2") == [
        "convert", "-f", "qcow2", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
        "/c/os-overlay.qcow2", "/s/out.qcow2"]
    assert cell.links == [("big.qcow2", "base.qcow2")]     # the overlay's own backing file, as base
    assert build_disks.DEPENDS["os-overlay.qcow2"] == ("big.qcow2",)
    assert [v[0] for v in cell.verify] == ["compare", "check"]
    assert bench.expand(cell.verify[0], FIXTURES, "/s/out.qcow2")[-2:] == ["/c/os-overlay.qcow2", "/s/out.qcow2"]


def test_startup_cell():
    cell = _cell("startup")
    assert [bench.expand(a, FIXTURES, None) for a in cell.argvs()] == [
        ["info", "-f", "qcow2", "/c/startup.qcow2"], ["check", "-f", "qcow2", "/c/startup.qcow2"]]
    assert cell.invocations == 2 * bench.STARTUP_REPEAT >= 20
    assert cell.output is None and cell.qemu


def test_plan_cell():
    cell = _cell("plan-1000")
    assert bench.expand(cell.args, FIXTURES, None) == ["plan", "/c/plan-1000/manifest.yml"]
    assert not cell.qemu and cell.expect_rc == 0      # 0: no changes (docs/manifest.md)
    assert cell.invocations == 1


def test_sparse_cell():
    cell = _cell("sparse-1t")
    assert bench.expand(cell.args, FIXTURES, "/s/out.qcow2") == [
        "convert", "-f", "raw", "-O", "qcow2", "/c/sparse-1t.raw", "/s/out.qcow2"]
    assert cell.qemu and cell.target == bench.RSS_MB


def test_expected_status():
    cell = _cell("plan-1000")
    ok, changes = bench.Run(), bench.Run()
    ok.rc, ok.stdout, ok.stderr = 0, "No changes: 1000 images are as the manifests describe.\n", ""
    assert bench.expected_status(cell, [ok]) is None
    changes.rc, changes.stdout, changes.stderr = 2, "~ img-0001.qcow2\n    grow\n", ""
    assert bench.expected_status(cell, [changes]) == "plan: exit status 2, expected 0 (~ img-0001.qcow2)"


def _run(rc, wall, cpu, rss, out=""):
    r = bench.Run()
    r.rc, r.wall, r.cpu, r.rss_kib, r.stdout, r.stderr, r.timed_out = rc, wall, cpu, rss, out, "", False
    return r


def test_combine_times_processes_together():
    c = bench.combine([_run(0, 0.1, 0.08, 100, "a"), _run(0, 0.2, 0.1, 300, "b"), _run(0, 0.1, 0.1, 200, "c")])
    assert abs(c.wall - 0.4) < 1e-9 and abs(c.cpu - 0.28) < 1e-9
    assert c.rss_kib == 300 and c.rc == 0 and c.stdout == "c" and not c.timed_out
    c = bench.combine([_run(0, 0.1, 0.1, 100, "a"), _run(3, 0.1, 0.1, 100, "bad"), _run(0, 0.1, 0.1, 100)])
    assert c.rc == 3 and c.stdout == "bad"
    with pytest.raises(ValueError):
        bench.combine([])


def _result(name, v, q, threshold=1.2, **extra):
    r = {"name": name, "threshold": threshold, "vdisk": {"times": v, "rss_kib": [2048, 4096]},
         "qemu": {"times": q, "rss_kib": [1024]}}
    r.update(extra)
    return bench.summarize(r)


def test_summarize_headline_is_best_against_best():
    r = _result("compare", [1.0, 3.0, 2.0], [1.0, 1.0, 1.0])
    assert r["vdisk"]["median"] == 2.0 and r["qemu"]["median"] == 1.0
    assert r["vdisk"]["best"] == 1.0 and r["qemu"]["best"] == 1.0
    assert r["best_ratio"] == r["ratio"] == 1.0       # fastest against fastest: the headline
    assert r["verdict"] == "PASS"                     # on best/best, not on the median ratio
    assert r["median_ratio"] == 2.0 and r["ratios"] == [1.0, 3.0, 2.0]
    assert r["vdisk"]["peak_rss_kib"] == 4096
    # a noisy qemu-img round does not make vdisk look faster: the median ratio would PASS, best/best MISSes
    r = _result("raw-qcow2", [1.3, 1.3, 1.3], [1.0, 4.0, 4.0], threshold=1.0)
    assert r["median_ratio"] < 1.0 and r["best_ratio"] == 1.3 and r["verdict"] == "MISS"
    errored = bench.summarize({"name": "backing", "threshold": None, "error": "vdisk: boom"})
    assert errored["ratio"] is None and errored["median_ratio"] is None and errored["verdict"] == "-"


def test_summarize_absolute_targets():
    # plan-1000: vdisk alone, the verdict on its best time
    r = bench.summarize({"name": "plan-1000", "threshold": 2.0, "target": bench.SECONDS,
                         "vdisk": {"times": [2.5, 1.9], "rss_kib": [40000]}, "qemu": {"times": [], "rss_kib": []}})
    assert r["judged"] == 1.9 and r["verdict"] == "PASS"
    assert r["ratio"] is None and r["qemu"]["best"] is None and r["qemu"]["peak_rss_kib"] is None
    r["vdisk"]["times"] = [2.5, 2.1]
    assert bench.summarize(r)["verdict"] == "MISS"
    # sparse-1t: the verdict on vdisk's peak RSS (MB, 10**6 bytes), whatever the time ratio
    r = _result("sparse-1t", [9.0], [1.0], threshold=100, target=bench.RSS_MB)
    assert r["best_ratio"] == 9.0 and r["verdict"] == "PASS"     # 4096 KiB
    r = _result("sparse-1t", [0.5], [1.0], threshold=100, target=bench.RSS_MB)
    r["vdisk"]["rss_kib"] = [97657]                               # 100.0001 MB
    assert bench.summarize(r)["verdict"] == "MISS"
    r["vdisk"]["rss_kib"] = [97656]
    assert bench.summarize(r)["verdict"] == "PASS"


def test_round_lines():
    r = _result("startup", [4.0, 3.0], [0.2, 0.25], threshold=2.0, invocations=20)
    lines = bench.round_lines(r)
    assert lines[0] == "rounds: vdisk 4.00 3.00 s; qemu-img 0.20 0.25 s; vdisk/qemu 20.00x 12.00x"
    assert lines[1] == "per process (best run / 20): vdisk 150 ms, qemu-img 10 ms"
    r = bench.summarize({"name": "plan-1000", "threshold": 2.0, "target": bench.SECONDS,
                         "vdisk": {"times": [1.0]}, "qemu": {}})
    assert bench.round_lines(r) == ["rounds: vdisk 1.00 s"]


def test_format_table():
    results = [_result("raw-qcow2", [1.1, 1.0, 1.2], [0.9, 0.8, 1.0]),
               _result("check", [3.0], [1.0], threshold=1.5, mismatch="exit status 2, qemu-img's 0"),
               {"name": "compressed", "error": "vdisk: convert: -c is not implemented"}]
    text = bench.format_table(results)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["cell", "vdisk", "s", "qemu-img"]
    assert lines[0].split()[5] == "best/best"         # the first ratio column: the headline
    row = lines[1].split()
    assert row[:6] == ["raw-qcow2", "1.00", "0.80", "1.25x", "<=", "1.2x"]
    assert row[6] == "MISS"                           # best/best 1.25x > 1.2x (the median ratio 1.22x too)
    assert row[7:10] == ["1.10", "0.90", "1.22x"]     # medians and the median of per-round ratios beside it
    assert "4 MiB" in lines[1] and "1 MiB" in lines[1]
    assert "WRONG" in lines[2] and "3.00x" in lines[2]
    assert lines[3].startswith("compressed  error: vdisk: convert: -c is not implemented")
    assert lines[1].startswith("raw-qcow2   ")     # the name column is as wide as the longest name
    # columns line up: every full row as long as the header's right-aligned last column
    assert len(lines[1]) == len(lines[0]) == len(lines[2])
    # a vdisk-only cell with an absolute target: "-" for qemu-img
    plan = bench.summarize({"name": "plan-1000", "threshold": 2.0, "target": bench.SECONDS,
                            "vdisk": {"times": [1.5, 1.4], "rss_kib": [40 * 1024]}, "qemu": {}})
    row = bench.format_table([plan]).splitlines()[1].split()
    assert row == ["plan-1000", "1.40", "-", "-", "<=", "2", "s", "PASS", "1.45", "-", "-", "40", "MiB", "-"]
    md = bench.format_table(results, markdown=True).splitlines()
    assert md[0].startswith("| cell |") and md[1].startswith("|---|")
    assert all(line.count("|") == md[0].count("|") for line in md[2:])


def test_overlay_writes_are_spread_inside_the_data():
    extents = [(0, 1 << 30), (2 << 30, 100 << 20), (3 << 30, 8192)]
    writes = build_disks.overlay_writes(extents, 48 << 20)
    assert writes == build_disks.overlay_writes(extents, 48 << 20)       # deterministic
    total = sum(length for _, length, _ in writes)
    assert 48 << 20 <= total < (48 << 20) + (1 << 20)
    assert {length for _, length, _ in writes} == set(build_disks.OVERLAY_WRITE_SIZES)
    offsets = [o for o, _, _ in writes]
    assert offsets == sorted(offsets) and all(o % 4096 == 0 for o in offsets)
    for (o, length, pattern), nxt in zip(writes, offsets[1:] + [None]):
        assert 1 <= pattern <= 255                    # never zeros
        assert nxt is None or o + length <= nxt       # no overlaps
        inside = [s for s, n in extents if s <= o < s + n]
        assert inside, o                              # every write starts in the base's data
    # spread over all the data, not bunched at its start
    assert any(o >= 2 << 30 for o in offsets) and offsets[len(offsets) // 2] > 256 << 20
    with pytest.raises(ValueError):
        build_disks.overlay_writes([], 1)


def test_sparse_pieces():
    pieces = build_disks.sparse_pieces(1 << 40, 1 << 20, 1024)
    assert len(pieces) == 1024 and pieces == sorted(pieces)
    stride = (1 << 40) // 1024
    for i, o in enumerate(pieces):
        assert i * stride <= o and o + (1 << 20) <= (i + 1) * stride and o % 4096 == 0
    assert len({o % stride for o in pieces}) > 500        # not all at the same place in their GiB


def test_plan_manifest():
    text = build_disks.plan_manifest(3)
    assert build_disks.plan_image_name(7) == "img-0007.qcow2"
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(text) == {"version": 1, "images": [
        {"path": "img-%04d.qcow2" % i, "format": "qcow2", "size": "1M"} for i in range(3)]}


def test_fixture_recipes_exist():
    for name in build_disks.DEPENDS:
        assert callable(getattr(build_disks.Fixtures, "_build_" + name.replace(".", "_").replace("-", "_")))


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("VDISK_BENCH_CACHE", str(tmp_path / "c"))
    assert build_disks.default_cache_root() == str(tmp_path / "c")
    monkeypatch.delenv("VDISK_BENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build_disks.default_cache_root() == str(tmp_path / "vdisk-bench")


def test_run_once_reports_child_rss_and_status(tmp_path):
    r = bench.run_once([sys.executable, "-c", "import sys; b = bytearray(64 << 20); sys.stderr.write('oops\\n');"
                        " sys.exit(3)"], str(tmp_path), 60)
    assert r.rc == 3 and not r.timed_out
    assert r.rss_kib >= 64 * 1024
    assert bench.failure("vdisk", r, 60) == "vdisk: oops"
    r.stderr = "vdisk: convert: -c is not supported\n"
    assert bench.failure("vdisk", r, 60) == "vdisk: convert: -c is not supported"
    r.stderr = ""
    assert bench.failure("qemu-img", r, 60) == "qemu-img: exit status 3"
    r.timed_out = True
    assert bench.failure("qemu-img", r, 60) == "qemu-img: timed out after 60 s"
