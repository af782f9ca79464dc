"""Model-based test of qcow2 with snapshot and resize steps.

Hypothesis draws sequences of write / zero / discard / snapshot create, apply, delete /
resize (grow, and shrink) and runs them against a vdisk qcow2 image and a plain
bytearray model that keeps a copy per snapshot.  Afterwards the active content and
every snapshot's content (read by qemu-img) equal the model, and qemu-img check is clean.
"""
import json
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver

QCOW2 = get_driver("qcow2")
KiB = 1024
SIZE = 512 * KiB
CONFIGS = [
    {"cluster_size": "4k"},
    {"cluster_size": "16k", "extended_l2": "on"},
    {"cluster_size": "512", "compat": "0.10"},
    {"cluster_size": "4k", "refcount_bits": "8", "lazy_refcounts": "on"},
]

offsets = st.integers(min_value=0, max_value=SIZE - 1)
lengths = st.integers(min_value=1, max_value=80 * KiB)
steps = st.lists(st.one_of(
    st.tuples(st.just("write"), offsets, lengths, st.integers(1, 255)),
    st.tuples(st.just("zero"), offsets, lengths, st.booleans()),
    st.tuples(st.just("discard"), offsets, lengths),
    st.tuples(st.just("snapshot"),),
    st.tuples(st.just("apply"), st.integers(0, 7)),
    st.tuples(st.just("delete"), st.integers(0, 7)),
    st.tuples(st.just("resize"), st.integers(SIZE // 2, 2 * SIZE).map(lambda n: n // 512 * 512)),
), min_size=1, max_size=14)


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True)


def run_sequence(tmp_path, options, sequence):
    path = tmp_path / "m.qcow2"
    if path.exists():
        path.unlink()
    QCOW2.create(str(path), SIZE, QCOW2.parse_options(options))
    cs = QCOW2.parse_options(options)["cluster_size"]
    model = bytearray(SIZE)
    snaps = []        # (name, bytes)
    counter = 0
    img = open_image(str(path), "qcow2", writable=True)
    try:
        for step in sequence:
            kind = step[0]
            size = len(model)
            if kind == "write":
                _, off, n, value = step
                off %= size
                n = min(n, size - off)
                img.write(off, bytes([value]) * n)
                model[off:off + n] = bytes([value]) * n
            elif kind == "zero":
                _, off, n, unmap = step
                off %= size
                n = min(n, size - off)
                img.write_zeroes(off, n, unmap=unmap)
                model[off:off + n] = bytes(n)
            elif kind == "discard":
                _, off, n = step
                off %= size
                n = min(n, size - off)
                img.discard(off, n)
                start = -(-off // cs) * cs
                end = off + n if off + n == size else (off + n) // cs * cs
                if start < end:   # no backing file: discarded clusters read as zeros in v2 and v3
                    model[start:end] = bytes(end - start)
            elif kind == "snapshot":
                counter += 1
                name = "s%d" % counter
                img.create_snapshot(name)
                snaps.append((name, bytes(model)))
            elif kind == "apply" and snaps:
                name, content = snaps[step[1] % len(snaps)]
                img.apply_snapshot(name)
                model = bytearray(content)
            elif kind == "delete" and snaps:
                name, _ = snaps.pop(step[1] % len(snaps))
                img.delete_snapshot(name)
            elif kind == "resize":
                new = step[1]
                img.resize(new, shrink=True)
                model = model[:new] + bytearray(max(0, new - len(model)))
            assert img.virtual_size == len(model)
        assert img.read(0, img.virtual_size) == model
    finally:
        close_chain(img)
    check = run("qemu-img", "check", "--output=json", path)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert "corruptions" not in report
    assert "leaks" not in report
    out = tmp_path / "active.raw"
    assert run("qemu-img", "convert", "-O", "raw", path, out).returncode == 0
    assert out.read_bytes() == bytes(model)
    for name, content in snaps:
        out = tmp_path / (name + ".raw")
        assert run("qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=" + name, path, out).returncode == 0
        data = out.read_bytes()
        # qemu-img reads a snapshot at the image's current size
        n = min(len(data), len(content))
        assert data[:n] == content[:n], name


def _test(config):
    # the same examples in every run, and no example database written outside tmp_path
    @settings(max_examples=20, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(sequence=steps)
    def test(tmp_path, sequence):
        run_sequence(tmp_path, config, sequence)
    return test


test_model_4k = _test(CONFIGS[0])
test_model_extended_l2 = _test(CONFIGS[1])
test_model_512_v2 = _test(CONFIGS[2])
test_model_refcount8_lazy = _test(CONFIGS[3])
