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


def test_formatting():
    assert bench.fmt_seconds(1.234) == "1.23"
    assert bench.fmt_seconds(123.4) == "123"
    assert bench.fmt_seconds(None) == "-"
    assert bench.fmt_ratio(1.5) == "1.50x"
    assert bench.fmt_threshold(0.6) == "<= 0.6x"
    assert bench.fmt_threshold(None) == "-"
    assert bench.fmt_rss(40 * 1024 + 100) == "40 MiB"


def test_parse_only():
    assert bench.parse_only(None) == bench.CELL_NAMES
    assert bench.parse_only(["check,compare"]) == ["compare", "check"]
    assert bench.parse_only(["check", "raw-qcow2"]) == ["raw-qcow2", "check"]
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
    thresholds = {c.name: c.threshold for c in bench.CELLS}
    assert thresholds == {"raw-qcow2": 1.2, "compressed": 0.6, "qcow2-raw": 1.2, "backing": None,
                          "raw-vdi": 1.2, "raw-vpc": 1.2, "raw-vhdx": 1.2, "vmdk-stream": 0.6,
                          "compare": 1.2, "check": 1.5, "raw-luks": 1.2, "raw-qcow2-luks": 1.2}
    for cell in bench.CELLS:
        used = {m.group(1) for a in cell.args for m in bench.PLACEHOLDER.finditer(a) if m.group(1)}
        assert used <= set(cell.inputs) <= names, cell.name
        assert any("{out}" in a for a in cell.args) == (cell.output is not None), cell.name
        for fixture, _ in cell.links:
            assert fixture in cell.inputs


def _result(name, v, q, threshold=1.2, **extra):
    r = {"name": name, "threshold": threshold, "vdisk": {"times": v, "rss_kib": [2048, 4096]},
         "qemu": {"times": q, "rss_kib": [1024]}}
    r.update(extra)
    return bench.summarize(r)


def test_summarize():
    r = _result("compare", [1.0, 3.0, 2.0], [1.0, 1.0, 1.0])
    assert r["vdisk"]["median"] == 2.0 and r["qemu"]["median"] == 1.0
    assert r["ratio"] == 2.0 and r["verdict"] == "MISS"
    assert r["best_ratio"] == 1.0          # fastest against fastest
    assert r["vdisk"]["peak_rss_kib"] == 4096
    errored = bench.summarize({"name": "backing", "threshold": None, "error": "vdisk: boom"})
    assert errored["ratio"] is None and errored["verdict"] == "-"


def test_format_table():
    results = [_result("raw-qcow2", [1.1, 1.0, 1.2], [1.0, 1.0, 1.0]),
               _result("check", [3.0], [1.0], threshold=1.5, mismatch="exit status 2, qemu-img's 0"),
               {"name": "compressed", "error": "vdisk: convert: -c is not implemented"}]
    text = bench.format_table(results)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["cell", "vdisk", "s"]
    assert "1.10" in lines[1]
    assert "1.10x" in lines[1]
    assert "<= 1.2x" in lines[1]
    assert "PASS" in lines[1]
    assert "4 MiB" in lines[1] and "1 MiB" in lines[1]
    assert "WRONG" in lines[2] and "3.00x" in lines[2]
    assert lines[3].startswith("compressed  error: vdisk: convert: -c is not implemented")
    assert lines[1].startswith("raw-qcow2   ")     # the name column is as wide as the longest name
    # columns line up: every full row as long as the header's right-aligned last column
    assert len(lines[1]) == len(lines[0]) == len(lines[2])
    md = bench.format_table(results, markdown=True).splitlines()
    assert md[0].startswith("| cell |") and md[1].startswith("|---|")
    assert all(line.count("|") == md[0].count("|") for line in md[2:])


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
