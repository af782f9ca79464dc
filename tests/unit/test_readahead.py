"""ReadAhead: order kept, buffers not refilled while the caller holds them, errors and early stops."""
import ctypes
import mmap
import threading

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.readahead import ReadAhead, aligned_buffer


def _jobs(count, size=4096, fail_at=None):
    def read_into(offset, view):
        if offset == fail_at:
            raise OSError(5, "Input/output error")
        view[:] = bytes([offset % 251]) * len(view)
    for i in range(count):
        if i % 5 == 4:
            yield ("hole", i), 0, 0, None
        else:
            yield ("data", i), i, size - i, read_into


def test_items_arrive_in_order_with_their_own_content():
    seen = []
    for (kind, i), view in ReadAhead(_jobs(40), 4096, depth=3):
        if kind == "hole":
            assert view is None
        else:
            assert len(view) == 4096 - i and bytes(view) == bytes([i % 251]) * (4096 - i)
        seen.append(i)
    assert seen == list(range(40))


def test_a_held_buffer_is_not_overwritten_by_the_worker():
    held = []
    for (kind, i), view in ReadAhead(_jobs(30), 4096, depth=2):
        if kind == "data":
            snapshot = bytes(view)
            threading.Event().wait(0.002)           # let the worker run ahead if it could
            assert bytes(view) == snapshot
            held.append(i)
    assert len(held) == 24


def test_a_read_error_reaches_the_caller():
    with pytest.raises(OSError, match="Input/output error"):
        for _ in ReadAhead(_jobs(20, fail_at=7), 4096):
            pass


def test_stopping_early_ends_the_worker():
    reader = ReadAhead(_jobs(1000), 4096, depth=2)
    for (_, i), _view in reader:
        if i == 3:
            break
    assert not reader._thread.is_alive()


def test_aligned_buffer_is_page_aligned_and_zeroed():
    buf = aligned_buffer(1 << 20)
    assert len(buf) == 1 << 20
    assert buf[:16] == bytes(16)
    assert buf.find(b"\x01") == -1
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert address % mmap.PAGESIZE == 0


def test_aligned_bytearray_is_page_aligned_and_compares_by_content():
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.readahead import aligned_bytearray
    for size in (4096, 1 << 20, 8 << 20):
        a, b = aligned_bytearray(size), aligned_bytearray(size)
        assert len(a) == size and a == bytes(size)
        assert ctypes.addressof(ctypes.c_char.from_buffer(a)) % mmap.PAGESIZE == 0
        b[size // 2] = 1
        assert a != b and a == memoryview(bytearray(size))
