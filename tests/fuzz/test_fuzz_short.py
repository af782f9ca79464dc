"""A short, deterministic fuzz run over every format inside the default suite (~45 s in all):
the seed images of each format are built, then mutated and run through info, check, map,
convert and compare (tests/fuzz/fuzz.py). A failure prints the mutants and does not save them
(``make fuzz`` does: run it to keep a crasher as a regression fixture).
"""
import io
import time

import pytest

import fuzz

SEED = 20261125
# seconds of mutation per format: ~32 s in all for the 13 formats (the seed images add a few)
BUDGET = {"qcow2": 5, "vmdk": 4, "vhdx": 4, "vpc": 3, "qed": 2, "vdi": 2, "parallels": 2, "qcow": 2,
          "dmg": 2, "cloop": 2, "bochs": 2, "iso": 1, "raw": 1}


@pytest.mark.parametrize("fmt", sorted(BUDGET))
def test_fuzz_short(fmt, tmp_path):
    if fmt not in fuzz.all_formats():
        pytest.skip("no %s driver" % fmt)
    seeds = fuzz.build_seeds([fmt], str(tmp_path))
    assert seeds, "no seed image of %s could be made" % fmt
    fuzz.preload([fmt])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    log = io.StringIO()
    t0 = time.monotonic()
    count, failures = fuzz.fuzz(seeds, BUDGET[fmt], SEED, str(scratch), save=False, log=log)
    assert count > 0
    assert not failures, log.getvalue()
    # a mutant may still be running when the budget ends: bounded by the wall timeout
    assert time.monotonic() - t0 < BUDGET[fmt] + fuzz.WALL_TIMEOUT + 5
