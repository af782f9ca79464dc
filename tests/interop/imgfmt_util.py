"""Helpers of the qed / qcow (v1) / parallels interop tests: engine reads, samples, mutation runs.

(``tests/conftest.py`` makes the engine importable from the source tree.)
"""
import bz2
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import DATA, Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image

MiB = 1 << 20
SAMPLES = os.environ.get("VDISK_SAMPLES", "/work/shared/samples")
CLI = [sys.executable, "-m", helpers.CLI_MODULE]


def cells(values, fast):
    """pytest parameters: the values in *fast* run by default, the others only with ``-m slow``."""
    import pytest
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


def sample(name, tmp_path):
    """Decompress ``SAMPLES/name.bz2`` into *tmp_path*; skips when the samples are not here."""
    src = os.path.join(SAMPLES, name + ".bz2")
    if not os.path.exists(src):
        import pytest
        pytest.skip("sample %s not available" % src)
    dst = os.path.join(str(tmp_path), name)
    with bz2.open(src) as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out)
    return dst


def read_all(path, fmt, policy=None):
    """Every guest byte of *path* read through vdisk (with its backing chain)."""
    img = open_image(str(path), fmt, policy=policy)
    try:
        out = bytearray()
        pos = 0
        while pos < img.virtual_size:
            n = min(8 * MiB, img.virtual_size - pos)
            out += img.read(pos, n)
            pos += n
        return bytes(out)
    finally:
        close_chain(img)


def qemu_raw(path, fmt, tmp_path, name="ref.raw"):
    out = os.path.join(str(tmp_path), name)
    helpers.run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def assert_same_as_qemu(path, fmt, tmp_path):
    """vdisk's guest content equals ``qemu-img convert -O raw``, compared as files (sparse-friendly)."""
    ref = os.path.join(str(tmp_path), "ref.raw")
    mine = os.path.join(str(tmp_path), "mine.raw")
    helpers.run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, ref)
    vdisk("convert", "-f", fmt, "-O", "raw", path, mine, check=True)
    # qemu-img compare skips holes: cmp would read every byte of a 64 GiB sparse file
    assert os.path.getsize(ref) == os.path.getsize(mine)
    assert helpers.qemu_compare(ref, mine, "raw", "raw", strict=False)
    os.unlink(ref)
    os.unlink(mine)


def write_engine(path, fmt, writes):
    """Write ``(offset, bytes)`` pairs through vdisk's engine."""
    img = open_image(str(path), fmt, writable=True)
    try:
        for offset, data in writes:
            img.write(offset, data)
    finally:
        close_chain(img)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_bytes(path, rng, regions, count):
    """Overwrite *count* random bytes inside the ``(start, length)`` *regions* with random values."""
    with open(path, "r+b") as f:
        for _ in range(count):
            start, length = rng.choice(regions)
            f.seek(start + rng.randrange(length))
            f.write(bytes([rng.randrange(256)]))


def exercise(path, fmt, budget=16 * MiB):
    """What a mutated image must survive in-process: open, info, map, bounded reads, check.
    Only ImageError may escape (it is returned); anything else fails the test."""
    try:
        img = open_image(str(path), fmt, policy=Policy(max_chain_depth=2))
    except errors.ImageError as exc:
        return exc
    try:
        img.info()
        left = budget
        n = 0
        for ext in img.extents(0, img.virtual_size):
            n += 1
            if n > 4096 or left <= 0:
                break
            if ext.kind == DATA:
                length = min(ext.length, left)
                img.read(ext.offset, length)
                left -= length
        img.read(0, min(img.virtual_size, 64 * 1024))
        if img.virtual_size:
            img.read(img.virtual_size - 1, 1)
        try:
            img.check(None)
        except errors.UnsupportedFeature:
            pass
    except errors.ImageError as exc:
        return exc
    finally:
        close_chain(img)
    return None


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def cli_limited(*args, timeout=30):
    """The vdisk CLI under a 1 GiB address-space limit and a timeout."""
    start = time.time()
    proc = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limits, env=dict(os.environ))
    return proc, time.time() - start


def assert_clean_cli(proc, allow_multiline=False):
    """No traceback; a failure is one ``vdisk: `` line (check may print per-item lines first)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 1:
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert lines and lines[-1].startswith("vdisk: "), proc.stderr
        if not allow_multiline:
            assert len(lines) == 1, proc.stderr


def mutation_run(good, fmt, regions, seed, cases, tmp_path, cli_every=6):
    """Seeded random byte flips of *good* inside *regions*: in-process for every case, the CLI (info
    and check under memory/time limits) for every *cli_every*-th; the input file never changes."""
    rng = random.Random(seed)
    outcomes = {"error": 0, "clean": 0}
    for case in range(cases):
        path = os.path.join(str(tmp_path), "mut-%d" % case)
        shutil.copyfile(good, path)
        flip_bytes(path, rng, regions, rng.randint(1, 4))
        before = sha(path)
        start = time.time()
        exc = exercise(path, fmt)
        assert time.time() - start < 10, "case %d took %.1f s" % (case, time.time() - start)
        if exc is not None:
            assert "\n" not in str(exc), str(exc)
        outcomes["error" if exc else "clean"] += 1
        if case % cli_every == 0:
            for cmd in (("info", "-f", fmt, path), ("check", "-f", fmt, path)):
                proc, took = cli_limited(*cmd)
                assert took < 20
                assert_clean_cli(proc, allow_multiline=cmd[0] == "check")
        assert sha(path) == before, "case %d changed the input" % case
        os.unlink(path)
    return outcomes


def vdisk(*args, check=False):
    """The vdisk CLI run in this process (its ``main``), as ``helpers.vdisk_cli`` runs it as a
    subprocess: same arguments, exit status and text output, without a Python start per call
    (0.3-0.6 s each on a loaded machine). The subprocess path itself is covered by test_cli."""
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    args = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    proc = subprocess.CompletedProcess(["vdisk"] + args, rc, out.getvalue(), err.getvalue())
    if check and rc != 0:
        raise AssertionError("vdisk %s failed (rc=%d):\n%s%s" % (" ".join(args), rc, proc.stdout, proc.stderr))
    return proc


def options_text(opts):
    return ",".join("%s=%s" % kv for kv in opts.items())


def create(tool, path, fmt, size, **opts):
    """``create -f FMT [-o ...] PATH SIZE`` by qemu-img or vdisk; returns the path."""
    o = options_text(opts)
    args = ["create", "-q", "-f", fmt] + (["-o", o] if o else []) + [path, size]
    if tool == "qemu":
        helpers.run("qemu-img", *args)
    else:
        vdisk(*args, check=True)
    return str(path)


def info_json(path, fmt, tool):
    """``info --output=json`` of qemu-img or vdisk, without the file name."""
    if tool == "qemu":
        out = helpers.qemu_info(path, fmt)
    else:
        out = json.loads(vdisk("info", "--output=json", "-f", fmt, path, check=True).stdout)
    out.pop("filename")
    return out
