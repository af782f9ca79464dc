"""Model-based test over the writable formats: random write / write_zeroes / discard / reopen sequences.

Generic: each entry of FORMATS names a format, its create options and a virtual size; others
add their formats to the list. Each hypothesis example creates an image with vdisk, applies a
random sequence of operations to it and to a bytearray model, and checks that the content
equals the model (also after reopening), that ``qemu-img compare`` agrees, and, for formats
qemu-img can check, that ``qemu-img check`` finds no errors, leaks or corruptions.

VDISK_MODEL_EXAMPLES=N raises the number of examples per configuration.
"""
import os
import subprocess
import tempfile

import pytest

import helpers

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image  # noqa
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.create import create  # noqa: E402

EXAMPLES = int(os.environ.get("VDISK_MODEL_EXAMPLES", "12"))
KiB = 1024

# id, format, create options, virtual size, qemu-img can check it
FORMATS = [
    ("parallels-4k", "parallels", {"cluster_size": "4k"}, 256 * KiB + 512, True),
    ("parallels-1000", "parallels", {"cluster_size": "1000"}, 64 * KiB, True),
    ("qed-4k-t2", "qed", {"cluster_size": "4k", "table_size": "2"}, 9 * 1024 * KiB, True),
    ("qed-64k", "qed", {}, 1024 * KiB, True),
    ("vdi-dynamic", "vdi", {}, 3 * 1024 * KiB + 512, True),
    ("vdi-static", "vdi", {"static": "on"}, 2 * 1024 * KiB, True),
    ("vpc-dynamic", "vpc", {}, 5222400, False),                  # 150 x 4 x 17 sectors: no CHS rounding
    ("vpc-fixed", "vpc", {"subformat": "fixed"}, 5222400, False),
    ("vpc-force-size", "vpc", {"force_size": "on"}, 3 * 1024 * KiB + 512, False),
    ("qcow", "qcow", {}, 2 * 1024 * KiB + 3 * 512, False),        # past one L2 table's 2 MiB; a short cluster
    ("vmdk-sparse", "vmdk", {}, 3 * 1024 * KiB + 512, True),
    ("vmdk-zeroed-grain", "vmdk", {"zeroed_grain": "on"}, 1024 * KiB, True),
    ("vmdk-flat", "vmdk", {"subformat": "monolithicFlat"}, 1024 * KiB + 512, True),
    ("vmdk-2gb-sparse", "vmdk", {"subformat": "twoGbMaxExtentSparse"}, 1024 * KiB, True),
    ("vhdx-dynamic", "vhdx", {"block_size": "1M"}, 3 * 1024 * KiB + 512, True),
    ("vhdx-fixed", "vhdx", {"subformat": "fixed", "block_size": "1M", "block_state_zero": "off"}, 2 * 1024 * KiB,
     True),
]


def operations(size):
    offset = st.integers(0, size - 1)
    return st.lists(st.one_of(
        st.tuples(st.just("write"), offset, st.integers(1, 20000), st.integers(1, 255)),
        st.tuples(st.just("zero"), offset, st.integers(1, 40000), st.just(0)),
        st.tuples(st.just("discard"), offset, st.integers(1, 40000), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    ), min_size=1, max_size=12)


@pytest.mark.parametrize("ident,fmt,options,size,checkable", FORMATS, ids=[f[0] for f in FORMATS])
def test_model(ident, fmt, options, size, checkable):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(ops=operations(size))
    def run(ops):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "img.%s" % fmt)
            create(path, fmt, size, dict(options))
            model = bytearray(size)
            img = open_image(path, fmt, writable=True)
            try:
                for op, off, n, byte in ops:
                    n = min(n, size - off)
                    if op == "write":
                        data = bytes([byte]) * n
                        img.write(off, data)
                        model[off:off + n] = data
                    elif op == "zero":
                        img.write_zeroes(off, n)
                        model[off:off + n] = bytes(n)
                    elif op == "discard":
                        img.discard(off, n)      # optional: these formats keep the data
                    else:
                        close_chain(img)
                        img = open_image(path, fmt, writable=True)
                assert img.read(0, size) == bytes(model)
            finally:
                close_chain(img)
            img = open_image(path, fmt)
            try:
                assert img.read(0, size) == bytes(model)
            finally:
                close_chain(img)
            raw = os.path.join(d, "model.raw")
            with open(raw, "wb") as f:
                f.write(model)
            assert helpers.qemu_compare(path, raw, fmt, "raw")
            if checkable:
                result = helpers.qemu_check(path, fmt)
                assert result["rc"] == 0 and "leaks" not in result and "corruptions" not in result, result
    run()
