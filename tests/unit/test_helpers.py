"""The shared fill pattern: MiB i starts with byte i, neighbouring sectors differ, any range verifies."""
import helpers


def test_pattern_layout():
    MiB = helpers.MiB
    for i in (0, 1, 5, 255, 256, 300):
        assert helpers.pattern(i * MiB, 1) == bytes([i & 0xFF])
    whole = helpers.pattern(0, 2 * MiB)
    assert len(whole) == 2 * MiB
    assert helpers.pattern(12345, 70000) == whole[12345:12345 + 70000]      # any sub-range agrees
    sectors = [whole[o:o + 512] for o in range(0, 2 * MiB, 512)]
    assert all(len(set(s)) == 1 for s in sectors)                              # constant per sector
    assert all(a != b for a, b in zip(sectors, sectors[1:]))                   # neighbours differ
    assert helpers.pattern(MiB + 512, 512) != helpers.pattern(512, 512)        # misplacement by 1 MiB shows


def test_make_raw_and_qemu_io_agree(tmp_path):
    path = helpers.make_raw(tmp_path / "p.raw", 4 * helpers.MiB, [(helpers.MiB - 512, 1024)])
    helpers.qemu_io("raw", path, "read -P %d %d 512" % ((1 + 7 * 2048) & 0xFF, helpers.MiB),
                    "read -P 0 0 512")
    assert helpers.qemu_compare(path, path, "raw", "raw")
