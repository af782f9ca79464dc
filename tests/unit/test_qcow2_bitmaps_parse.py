"""The qcow2 bitmap directory and table parsers: QEMU's bounds, hostile values -> one-line CorruptImage."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import CorruptImage
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import bitmaps as bm

CS = 65536
FILE = 64 * CS


def entry(**kw):
    fields = dict(name=b"b0", table_offset=4 * CS, table_size=1, flags=bm.FLAG_AUTO, granularity_bits=16)
    fields.update(kw)
    return bm.BitmapEntry(**fields)


def parse(*entries, count=None):
    return bm.parse_directory(bm.pack_directory(list(entries)), len(entries) if count is None else count, CS, FILE,
                              "x.qcow2")


def test_round_trip():
    entries = [entry(), entry(name=b"second", flags=0, granularity_bits=9, table_offset=5 * CS, table_size=3)]
    parsed = parse(*entries)
    assert parsed == entries
    assert parsed[0].auto
    assert not parsed[0].in_use
    assert parsed[1].granularity == 512


@pytest.mark.parametrize("kw, words", [
    (dict(granularity_bits=8), "granularity bits 8"),
    (dict(granularity_bits=32), "granularity bits 32"),
    (dict(granularity_bits=255), "granularity bits 255"),
    (dict(name=b""), "empty name"),
    (dict(name=b"n" * 1024), "name longer than 1023"),
    (dict(type=2), "unknown type 2"),
    (dict(flags=1 << 3), "reserved flags"),
    (dict(extra_data=b"12345678"), "extra data"),
    (dict(table_size=0), "table size 0"),
    (dict(table_size=bm.MAX_TABLE_SIZE + 1), "table size"),
    (dict(table_size=65), "larger than the file allows"),
    (dict(table_offset=0), "not cluster aligned"),
    (dict(table_offset=CS + 512), "not cluster aligned"),
])
def test_entry_bounds(kw, words):
    with pytest.raises(CorruptImage) as exc:
        parse(entry(**kw))
    assert words in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("offset", [FILE, 0xFFFFFFFFFFFF0000])
def test_table_past_the_end_is_parsed(offset):
    """QEMU opens such an image (the table reads as zeros) and its check counts the table as a
    reference past the end: the parser keeps it; readers of the bits refuse it (read_directory)."""
    assert parse(entry(table_offset=offset))[0].table_offset == offset


def test_directory_bounds():
    with pytest.raises(CorruptImage, match="duplicate bitmap name"):
        parse(entry(), entry())
    with pytest.raises(CorruptImage, match="past the directory's end"):
        parse(entry(), count=2)
    with pytest.raises(CorruptImage, match="after the last entry"):
        bm.parse_directory(entry().pack() + bytes(8), 1, CS, FILE)
    with pytest.raises(CorruptImage, match="non-zero padding"):
        raw = bytearray(entry().pack())
        raw[-1] = 1
        bm.parse_directory(bytes(raw), 1, CS, FILE)
    with pytest.raises(CorruptImage, match="65536 bitmaps"):
        bm.parse_directory(b"", 65536, CS, FILE)
    with pytest.raises(CorruptImage, match="exceed the maximum"):
        bm.parse_directory(bytes(bm.MAX_DIRECTORY_SIZE + 8), 1, CS, FILE)


@pytest.mark.parametrize("value, words", [
    (1 << 1, "reserved bits"),
    (1 << 60, "reserved bits"),
    (5 * CS | 1, "all-ones flag"),
    (5 * CS + 512, "not cluster aligned"),
    (FILE, "past the end of the file"),
])
def test_table_entry_bounds(value, words):
    with pytest.raises(CorruptImage) as exc:
        bm.parse_table(bm.TABLE_ENTRY.pack(value), CS, FILE, "b0")
    assert words in str(exc.value)


def test_table_entries_allowed():
    raw = b"".join(bm.TABLE_ENTRY.pack(v) for v in (0, bm.TABLE_ALL_ONES, 5 * CS))
    assert bm.parse_table(raw, CS, FILE, "b0") == [0, 1, 5 * CS]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 70000))
def test_hostile_directory_only_corrupt_image(data, count):
    try:
        bm.parse_directory(data, count, CS, FILE)
    except CorruptImage as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 16), st.integers(0, 1 << 16), st.integers(9, 20))
def test_set_bits_matches_granules(offset, length, gbits):
    bits = bytearray(bm.data_bytes(1 << 17, gbits))
    bm.set_bits(bits, gbits, offset, length)
    want = set(range(offset >> gbits, ((offset + length - 1) >> gbits) + 1)) if length else set()
    got = {i for i in range(len(bits) * 8) if bits[i // 8] >> (i % 8) & 1}
    assert got == {i for i in want if i < len(bits) * 8}
