"""The check's whole-table shortcuts must decide exactly as the entry-by-entry walk."""
import random
import struct

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import check as qcheck

COPIED = 1 << 63


def _table(first, n, step):
    return struct.pack(">%dQ" % n, *[first + i * step for i in range(n)])


@pytest.mark.parametrize("n,step", [(512, 4096), (8192, 65536), (256 * 1024, 2 * 1024 * 1024), (64, 512)])
def test_a_progression_is_one_big_integer(n, step):
    ones, steps = qcheck._progression_terms(n, step)
    for first in (step, COPIED | step * 3, COPIED | (1 << 50)):
        assert int.from_bytes(_table(first, n, step), "big") == first * ones + steps


def test_any_other_table_is_not_a_progression():
    rnd = random.Random(7)
    n, step = 512, 65536
    ones, steps = qcheck._progression_terms(n, step)
    first = COPIED | step
    good = bytearray(_table(first, n, step))
    for _ in range(300):
        bad = bytearray(good)
        i = rnd.randrange(len(bad))
        bad[i] ^= 1 << rnd.randrange(8)
        assert int.from_bytes(bad, "big") != first * ones + steps
    # one entry repeated, one missing (the same sum of offsets) is not a progression either
    words = list(struct.unpack(">%dQ" % n, good))
    words[10], words[11] = words[11], words[10]
    assert int.from_bytes(struct.pack(">%dQ" % n, *words), "big") != first * ones + steps
