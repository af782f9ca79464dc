"""Read ahead on a worker thread, into a small ring of reused buffers.

``os.preadv`` and ``os.pwrite`` release the GIL, so while the caller writes one chunk the
worker reads the next: the kernel's copying runs on two CPUs, as qemu-img's parallel requests do.
Buffers are reused (no fresh large allocation and page faults per chunk) and page-aligned:
the kernel copies into an aligned buffer about four times faster than into a bytearray's
(measured: 1.2 GB from the page cache in 0.12 s instead of 0.5 s of CPU).  A buffer handed
out is not refilled before the caller asks for the next item.
"""
import ctypes
import mmap
import threading
from queue import Queue
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple

from ..interrupt import main_thread_only

_END = object()


def aligned_buffer(size: int) -> mmap.mmap:
    """A writable, page-aligned, zero-filled buffer (anonymous memory) with ``find`` and slicing."""
    return mmap.mmap(-1, size)


def aligned_bytearray(size: int, align: int = mmap.PAGESIZE) -> bytearray:
    """A zeroed bytearray whose data starts on a page boundary: read into as fast as an mmap, and
    unlike an mmap it compares in C (memcmp) with ``==``.  Deleting a bytearray's head only moves
    its start pointer, which is how the alignment is reached."""
    buf = bytearray(size + align)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    del buf[:(-address) % align]
    del buf[size:]
    return buf


class ReadAhead:
    """Iterate ``(tag, view)`` for *jobs* ``(tag, offset, length, read_into)``; jobs with
    ``read_into=None`` pass through with ``view=None``.  Lengths are at most *chunk*."""

    def __init__(self, jobs: Iterable[Tuple[Any, int, int, Optional[Callable]]], chunk: int, depth: int = 3,
                 inspect: Optional[Callable[[memoryview], Any]] = None):
        self._jobs = jobs
        self._inspect = inspect     # run on each view in the worker; items become (tag, view, result)
        self._buffers = [aligned_buffer(chunk) for dummy in range(depth)]
        self._free = threading.Semaphore(depth)
        self._queue: "Queue" = Queue()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="vdisk-readahead", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        main_thread_only()
        slot = 0
        try:
            for tag, offset, length, read_into in self._jobs:
                if read_into is None:
                    self._queue.put(((tag, None) if self._inspect is not None else tag, None))
                    continue
                self._free.acquire()
                if self._stop:
                    return
                view = memoryview(self._buffers[slot])[:length]
                slot = (slot + 1) % len(self._buffers)
                read_into(offset, view)
                if self._inspect is not None:
                    tag = (tag, self._inspect(view))
                self._queue.put((tag, view))
        except BaseException as exc:        # handed to the consumer, raised there
            self._queue.put((_END, exc))
            return
        self._queue.put((_END, None))

    def __iter__(self) -> Iterator[Tuple[Any, Optional[memoryview]]]:
        held = False
        try:
            while True:
                if held:
                    self._free.release()    # the caller is done with the previous buffer
                    held = False
                tag, view = self._queue.get()
                if tag is _END:
                    if view is not None:
                        raise view
                    return
                held = view is not None
                yield tag, view
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker (also when the caller stopped early)."""
        self._stop = True
        for dummy in self._buffers:
            self._free.release()
        self._thread.join()
