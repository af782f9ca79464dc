"""The fuzzer's own harness: a forked command's traceback, memory blow-up, CPU spin, stray stderr
line and a change to the image are each reported as failures (so a quiet fuzz run means something)."""
import os
import time

import pytest

import fuzz

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli import main as cli_main


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(65536))
    return str(path)


def _with_info(monkeypatch, fn):
    monkeypatch.setitem(cli_main.COMMANDS, "info", fn)


def test_allowed_outcomes(image, tmp_path):
    status, stderr, dummy = fuzz.run_child(["info", "-f", "raw", image], str(tmp_path))
    assert status == 0 and fuzz.verdict("info", status, stderr) is None
    status, stderr, dummy = fuzz.run_child(["info", "-f", "qcow2", image], str(tmp_path))
    assert status == 1
    assert stderr.startswith("vdisk: info:")
    assert fuzz.verdict("info", status, stderr) is None


def test_traceback_is_a_failure(image, tmp_path, monkeypatch):
    _with_info(monkeypatch, lambda args: 1 // 0)
    status, stderr, dummy = fuzz.run_child(["info", image], str(tmp_path))
    assert "ZeroDivisionError" in fuzz.verdict("info", status, stderr)


def test_memory_limit(image, tmp_path, monkeypatch):
    _with_info(monkeypatch, lambda args: len(bytearray(2 << 30)))
    status, stderr, dummy = fuzz.run_child(["info", image], str(tmp_path))
    assert "MemoryError" in fuzz.verdict("info", status, stderr)


def test_cpu_and_wall_limits(image, tmp_path, monkeypatch):
    def spin(args):
        while True:
            pass
    _with_info(monkeypatch, spin)
    t0 = time.monotonic()
    status, stderr, dummy = fuzz.run_child(["info", image], str(tmp_path), cpu=1, wall=5)
    assert time.monotonic() - t0 < 5.5
    assert fuzz.verdict("info", status, stderr) in ("signal 24", "timeout")   # SIGXCPU or the wall clock


def test_two_lines_and_changed_image(image, tmp_path, monkeypatch):
    def noisy(args):
        import sys
        sys.stderr.write("vdisk: warning: one\nvdisk: info: two\n")
        with open(args[-1], "r+b") as f:
            f.write(b"x")
        return 1
    _with_info(monkeypatch, noisy)
    d, name = os.path.split(image)
    found = fuzz.run_mutant("raw", d, name, [name], str(tmp_path), commands=("info",))
    assert found
    assert "the image changed" in found[0][2]
    assert "2 stderr lines" in found[0][2]


@pytest.mark.parametrize("companions", [[], ["base"]])
def test_crasher_round_trip(companions, tmp_path, monkeypatch):
    """A kept crasher (one file, or a tar with its backing file) unpacks to the same bytes for the replay."""
    import test_crashers
    monkeypatch.setattr(fuzz, "CRASHERS", str(tmp_path / "crashers"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "img").write_bytes(b"QFI\xfb" + bytes(1000))
    for name in companions:
        (src / name).write_bytes(b"base" * 100)
    saved = fuzz.save_crasher("qcow2", "v", str(src), "img", ["img"] + companions, "info", "traceback: X",
                              "Traceback\n", False, 1)
    name = os.path.basename(saved)[:-4]
    out = tmp_path / "out"
    out.mkdir()
    note, main, names = test_crashers.unpack(name, str(out))
    assert (note["format"], main, names) == ("qcow2", "img", ["img"] + companions)
    for n in names:
        assert (out / n).read_bytes() == (src / n).read_bytes()


@pytest.mark.parametrize("length", [8, 39, 511, 512, 600, 1535])
def test_fix_checksums_on_truncated_mutants(length):
    """A mutant cut short inside a VHD footer or dynamic header is returned as it is, not a harness crash."""
    data = (b"conectix" + bytes(8) + (512).to_bytes(8, "big")).ljust(512, b"\1") + b"cxsparse"
    data = data.ljust(2048, b"\2")[:length]
    assert len(fuzz.fix_checksums(data)) == length
