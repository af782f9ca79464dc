"""Model-based test of the qcow2 driver: random write / write_zeroes / discard sequences.

Each hypothesis example creates a qcow2 image with vdisk (cluster sizes 512, 4k, 64k,
extended L2, compat 0.10, preallocation, lazy refcounts, refcount widths; with and without a
backing file made by qemu-img) or with ``qemu-img convert -c`` (compressed clusters), applies a
random sequence of operations (vdisk writes, zero writes, discards, reopens, and qemu-io
writes between vdisk sessions) to it and to a bytearray model, and then checks: the content
equals the model, equals it again after reopening, ``qemu-img compare`` agrees, and
``qemu-img check`` finds no errors, leaks or corruptions.

Discard follows QEMU 7.2 (checked with qemu-io): whole clusters only, they read as zeros
afterwards; on a v2 image with a backing file discard does nothing.

VDISK_MODEL_EXAMPLES=N raises the number of examples per configuration; VDISK_MODEL_RANDOM=1
draws new examples on every run instead of the same derandomized ones.
"""
import os

import pytest

import qcow2_util as u
from qcow2_util import KiB

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("VDISK_MODEL_EXAMPLES", "25"))   # raise it for a longer hunt
DERANDOMIZE = not os.environ.get("VDISK_MODEL_RANDOM")          # CI runs the same examples every time

# id, cluster size, virtual size, create options, with a backing file
CONFIGS = [
    ("c512", 512, 128 * KiB, {"cluster_size": "512"}, False),
    ("c512-backing", 512, 128 * KiB, {"cluster_size": "512"}, True),
    ("c4k", 4096, 4096 * KiB, {"cluster_size": "4k"}, False),
    ("c4k-backing", 4096, 4096 * KiB, {"cluster_size": "4k"}, True),
    ("c64k", 65536, 1024 * KiB, {"cluster_size": "64k"}, False),
    ("c64k-backing", 65536, 1024 * KiB, {"cluster_size": "64k"}, True),
    ("extl2-16k", 16384, 1024 * KiB, {"cluster_size": "16k", "extended_l2": "on"}, False),
    ("extl2-64k-backing", 65536, 1024 * KiB, {"cluster_size": "64k", "extended_l2": "on"}, True),
    ("v2-4k", 4096, 2048 * KiB, {"cluster_size": "4k", "compat": "0.10"}, False),
    ("v2-4k-backing", 4096, 2048 * KiB, {"cluster_size": "4k", "compat": "0.10"}, True),
    ("v2-512-backing", 512, 128 * KiB, {"cluster_size": "512", "compat": "0.10"}, True),
    ("prealloc-4k", 4096, 1024 * KiB, {"cluster_size": "4k", "preallocation": "metadata"}, False),
    ("prealloc-extl2-32k-backing", 32768, 1024 * KiB,
     {"cluster_size": "32k", "extended_l2": "on", "preallocation": "metadata"}, True),
    ("lazy-4k-backing", 4096, 1024 * KiB, {"cluster_size": "4k", "lazy_refcounts": "on"}, True),
    ("refcount1-512", 512, 128 * KiB, {"cluster_size": "512", "refcount_bits": "1"}, False),
    ("refcount64-512", 512, 256 * KiB, {"cluster_size": "512", "refcount_bits": "64"}, False),
    # the image starts as qemu-img convert -c output: COW from and freeing of shared compressed clusters
    ("compressed-4k", 4096, 1024 * KiB, {"cluster_size": "4k", "start": "compressed"}, False),
    ("compressed-64k-v2", 65536, 1024 * KiB, {"compat": "0.10", "start": "compressed"}, False),
    ("compressed-16k-extl2", 16384, 1024 * KiB,
     {"cluster_size": "16k", "extended_l2": "on", "start": "compressed"}, False),
]

OPS = ["write", "write", "zero", "zero-unmap", "discard", "reopen", "qemu-write", "qemu-zero", "qemu-zero-unmap",
       "qemu-discard"]


def ops_strategy(cs, size):
    """Operations with offsets biased to cluster (and subcluster/sector) boundaries."""
    near = st.builds(lambda c, d: min(max(c * cs + d, 0), size - 1),
                     st.integers(0, size // cs - 1), st.sampled_from([0, 0, 1, -1, 511, 512, cs // 2, cs // 32]))
    offset = st.one_of(near, st.integers(0, size - 1))
    length = st.one_of(st.integers(1, 600), st.sampled_from([cs, 2 * cs, cs - 1, cs + 1, 3 * cs + 512]),
                       st.integers(1, 4 * cs), st.integers(1, size // 3))
    op = st.tuples(st.sampled_from(OPS),
                   offset, length, st.integers(0, 255))
    return st.lists(op, min_size=1, max_size=12)


class Case:
    """One configuration: a directory (the test's tmp_path) with the backing file (if any) and its content."""

    def __init__(self, directory, cs, size, options, backing):
        self.cs, self.size, self.options, self.backing = cs, size, dict(options), backing
        self.start = self.options.pop("start", None)
        self.v3 = options.get("compat", "1.1") in ("1.1", "v3")
        self.dir = str(directory)
        self.base_content = b""
        self.n = 0
        if backing:
            base = os.path.join(self.dir, "base.qcow2")
            bsize = size * 3 // 4            # smaller than the overlay: reads past its end are zeros
            u.qemu_create(base, bsize, options={"cluster_size": "4k"})
            u.qemu_io(base, "write -P 0x5a 0 %d" % (bsize // 2),
                      "write -P 0x6b %d %d" % (bsize // 2 + 1000, bsize // 8), "write -z 4096 8192")
            self.base_content = u.qemu_to_raw(base)
            self.options.update(backing_file="base.qcow2", backing_fmt="qcow2")

    def run(self, ops):
        self.n += 1
        path = os.path.join(self.dir, "img%d.qcow2" % self.n)
        raw = path + ".raw"
        try:
            self._run(path, raw, ops)
        finally:
            for p in (path, raw):
                if os.path.exists(p):
                    os.unlink(p)

    def _run(self, path, raw, ops):
        size, cs = self.size, self.cs
        model = bytearray(size)
        if self.start == "compressed":
            src = path + ".src"
            content = bytearray(size)
            for i in range(0, size, 3 * cs):
                content[i:i + cs + 700] = u.pattern(i // cs, cs + 700)[:len(content[i:i + cs + 700])]
            with open(src, "wb") as f:
                f.write(content)
            opts = ",".join("%s=%s" % kv for kv in self.options.items())
            u.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", *(["-o", opts] if opts else []), src, path)
            os.unlink(src)
            model[:] = content
        else:
            u.vdisk_create(path, size, **self.options)
            model[:len(self.base_content)] = self.base_content
        img = u.open_image(path, "qcow2", writable=True)
        try:
            for kind, off, n, seed in ops:
                n = min(n, size - off)
                if kind == "write":
                    data = u.pattern(seed, n)
                    img.write(off, data)
                    model[off:off + n] = data
                elif kind in ("zero", "zero-unmap"):
                    img.write_zeroes(off, n, unmap=kind == "zero-unmap")
                    model[off:off + n] = bytes(n)
                elif kind == "discard":
                    img.discard(off, n)
                    u.discard_like_qemu(model, off, n, cs, size, self.v3, self.backing)
                elif kind == "reopen":
                    u.close_chain(img)
                    img = None
                    img = u.open_image(path, "qcow2", writable=True)
                else:
                    # qemu-io changes the image between two vdisk sessions
                    u.close_chain(img)
                    img = None
                    if kind == "qemu-write":
                        u.qemu_io(path, "write -P 0x%02x %d %d" % (seed or 1, off, n))
                        model[off:off + n] = bytes([seed or 1]) * n
                    elif kind in ("qemu-zero", "qemu-zero-unmap"):
                        u.qemu_io(path, "write -z %s%d %d" % ("-u " if kind == "qemu-zero-unmap" else "", off, n))
                        model[off:off + n] = bytes(n)
                    else:
                        u.qemu_io(path, "discard %d %d" % (off, n))
                        u.discard_like_qemu(model, off, n, cs, size, self.v3, self.backing)
                    img = u.open_image(path, "qcow2", writable=True)
            got = u.read_image(img)
            assert got == bytes(model), "content differs from the model: %s" % u.first_diff(got, bytes(model))
        finally:
            if img is not None:
                u.close_chain(img)
        got = u.vdisk_read_all(path)
        assert got == bytes(model), "after reopen: %s" % u.first_diff(got, bytes(model))
        u.assert_check_clean(path)
        u.assert_map_agrees(path)
        with open(raw, "wb") as f:
            f.write(model)
        u.qemu_compare(path, raw)


@pytest.mark.parametrize("name,cs,size,options,backing", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_random_sequences_match_model(tmp_path, name, cs, size, options, backing):
    case = Case(tmp_path, cs, size, options, backing)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ops=ops_strategy(cs, size))
    def check(ops):
        case.run(ops)

    check()
