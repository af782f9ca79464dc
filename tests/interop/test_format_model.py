"""Model-based test over the writable formats: random write / write_zeroes / discard / reopen sequences.

Generic: the model cells of each entry of the FORMATS table (``conformance.py``) give create
options and a virtual size, and say whether qemu-img check judges the format. Each hypothesis
example creates an image with vdisk, applies a
random sequence of operations to it and to a bytearray model, and checks that the content
equals the model (also after reopening), that ``qemu-img compare`` agrees, and, for formats
qemu-img can check, that ``qemu-img check`` finds no errors, leaks or corruptions.

VDISK_MODEL_EXAMPLES=N raises the number of examples per configuration.
"""
import os
import shutil

import pytest

import helpers
from conformance import FORMATS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image  # noqa
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.create import create  # noqa: E402

EXAMPLES = int(os.environ.get("VDISK_MODEL_EXAMPLES", "12"))
CELLS = [pytest.param(fmt, cell, id=cell.label) for fmt in FORMATS for cell in fmt.model_cells]


def operations(size):
    offset = st.integers(0, size - 1)
    return st.lists(st.one_of(
        st.tuples(st.just("write"), offset, st.integers(1, 20000), st.integers(1, 255)),
        st.tuples(st.just("zero"), offset, st.integers(1, 40000), st.just(0)),
        st.tuples(st.just("discard"), offset, st.integers(1, 40000), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    ), min_size=1, max_size=12)


@pytest.mark.parametrize("fmt,cell", CELLS)
def test_model(tmp_path, fmt, cell):
    size, options = cell.size, cell.opts
    examples = iter(range(1 << 30))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(ops=operations(size))
    def run(ops):
        d = str(tmp_path / ("example%d" % next(examples)))
        os.mkdir(d)
        try:
            path = os.path.join(d, "img.%s" % fmt.ext)
            create(path, fmt.name, size, dict(options))
            model = bytearray(size)
            img = open_image(path, fmt.name, writable=True)
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
                        img = open_image(path, fmt.name, writable=True)
                assert img.read(0, size) == bytes(model)
            finally:
                close_chain(img)
            img = open_image(path, fmt.name)
            try:
                assert img.read(0, size) == bytes(model)
            finally:
                close_chain(img)
            raw = os.path.join(d, "model.raw")
            with open(raw, "wb") as f:
                f.write(model)
            assert helpers.qemu_compare(path, raw, fmt.name, "raw")
            if cell.checkable:
                result = helpers.qemu_check(path, fmt.name)
                assert result["rc"] == 0, result
                assert "leaks" not in result, result
                assert "corruptions" not in result, result
        finally:
            shutil.rmtree(d)
    run()
