"""qemu-img compare: 0 identical, 1 different (errors are the caller's: the CLI exits 2).

Both images are walked by block status through their backing chains (:mod:`.status`), so
ranges that read as zeros in both are never read; the rest is read in large batches and
compared in C.  An unallocated range equals a range of zeros.

Messages and offsets are qemu-img's:

* the common part is compared first; a difference there is reported without any size
  warning; only then "Warning: Image size mismatch!" and the longer image's tail must read
  as zeros;
* the offset is the first differing 512-byte sector, counted from the start of qemu-img's
  request, a run of constant block status in both images (so ``Content mismatch at offset
  N!`` can name an unaligned N: after the unaligned end of a raw file);
* strict mode (``-s``) also fails on a size difference (before comparing anything) and on
  the first range whose block status differs: allocation, zero, data, whether it maps to
  a host offset, and whether its run reaches the end of the image.

:func:`compare_images` returns the same findings as a :class:`Verdict` (``vdisk compare
--output=json``, which qemu-img does not have; its keys are spelled as QAPI's).
"""
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..errors import ImageError
from ..driver import Image, Policy
from ..interrupt import main_thread_only
from .chain import close_chain, open_image
from .readahead import aligned_bytearray
from .status import S_ALLOCATED, S_EOF, S_ZERO, SECTOR, guest_length, status_runs

BATCH = 2 * 1024 * 1024       # bytes read at once here: small enough to stay in the CPU caches
PARALLEL_READ = 1024 * 1024   # from this size on, the two images are read at the same time

BOTH, ONLY_A, ONLY_B = "both", "a", "b"     # what a range needs: compare, or check one side for zeros


class Verdict:
    """What a comparison found.  Each finding is said as qemu-img words it (through *say*) when
    it is made, and kept for :meth:`to_json`."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.identical = False
        self.first_difference: Optional[int] = None      # "Content mismatch at offset N!"
        self.block_status_mismatch: Optional[int] = None  # strict: "Offset N block status mismatch!"
        self.size_mismatch = False                        # the virtual sizes differ

    @property
    def exit_code(self) -> int:
        return 0 if self.identical else 1

    def content_mismatch(self, offset: int) -> None:
        self.first_difference = offset
        self.say("Content mismatch at offset %d!" % offset)

    def status_mismatch(self, offset: int) -> None:
        self.block_status_mismatch = offset
        self.say("Strict mode: Offset %d block status mismatch!" % offset)

    def sizes_differ(self, strict: bool) -> None:
        self.size_mismatch = True
        self.say("Strict mode: Image size mismatch!" if strict else "Warning: Image size mismatch!")

    def same(self) -> None:
        self.identical = True
        self.say("Images are identical.")

    def to_json(self) -> Dict[str, Any]:
        """``vdisk compare --output=json``: null where there is no such finding."""
        return {"identical": self.identical, "first-difference": self.first_difference,
                "size-mismatch": self.size_mismatch, "block-status-mismatch": self.block_status_mismatch}


def compare(path_a: str, path_b: str, fmt_a: Optional[str] = None, fmt_b: Optional[str] = None,
            strict: bool = False, policy: Optional[Policy] = None, say: Callable[[str], None] = print,
            progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Compare the guest content of two images, printing qemu-img's messages through *say*.

    Returns 0 (identical) or 1 (different); errors (an image that cannot be opened or read)
    raise :class:`ImageError` or :class:`OSError`.  *progress* is called with (done, total).
    """
    return compare_images(path_a, path_b, fmt_a, fmt_b, strict, policy, say, progress).exit_code


def compare_images(path_a: str, path_b: str, fmt_a: Optional[str] = None, fmt_b: Optional[str] = None,
                   strict: bool = False, policy: Optional[Policy] = None, say: Callable[[str], None] = print,
                   progress: Optional[Callable[[int, int], None]] = None, policy_b: Optional[Policy] = None
                   ) -> Verdict:
    """:func:`compare`, returning what it found; *policy_b* opens B when it differs from A's
    (its own passphrase)."""
    verdict = Verdict(say)
    a = open_image(path_a, fmt_a, policy=policy)
    try:
        b = open_image(path_b, fmt_b, policy=policy if policy_b is None else policy_b)
        try:
            _compare(a, b, strict, verdict, progress or (lambda done, total: None))
        finally:
            close_chain(b)
    finally:
        close_chain(a)
    return verdict


def _compare(a: Image, b: Image, strict: bool, verdict: Verdict, progress) -> None:
    size_a, size_b = guest_length(a), guest_length(b)
    progress(0, max(size_a, size_b))
    if strict and size_a != size_b:
        verdict.sizes_differ(strict=True)
        return
    checker = _Checker(a, b, verdict)
    try:
        if _walk(a, size_a, b, size_b, strict, checker, verdict, progress):
            verdict.same()
    finally:
        checker.close()


def _walk(a: Image, size_a: int, b: Image, size_b: int, strict: bool, checker: "_Checker", verdict: Verdict,
          progress) -> bool:
    """True when the images compare equal; a difference has been reported otherwise."""
    common, total = min(size_a, size_b), max(size_a, size_b)
    for start, n, flags_a, flags_b in _paired(a, size_a, b, size_b, common):
        if strict and flags_a != flags_b:
            if not checker.flush():
                verdict.status_mismatch(start)
            return False
        if not (flags_a & S_ZERO and flags_b & S_ZERO):
            # a side that reads as zeros need not be read: check only the other one
            kind = ONLY_B if flags_a & S_ZERO else ONLY_A if flags_b & S_ZERO else BOTH
            if checker.add(start, n, kind):
                return False
        progress(start + n, total)
    if checker.flush():
        return False
    if size_a != size_b:
        verdict.sizes_differ(strict=False)
        longer, kind = (a, ONLY_A) if size_a > size_b else (b, ONLY_B)
        for start, n, flags in status_runs(longer, common):
            if flags & S_ALLOCATED and not flags & S_ZERO:
                if checker.add(start, n, kind):
                    return False
            progress(start + n, total)
        if checker.flush():
            return False
    progress(total, total)
    return True


def _paired(a: Image, size_a: int, b: Image, size_b: int, end: int) -> Iterator[Tuple[int, int, int, int]]:
    """``(offset, length, flags_a, flags_b)`` over ``[0, end)``, cut wherever either status changes;
    S_EOF marks a range whose run reaches its image's end."""
    runs_a, runs_b = _with_eof(status_runs(a), size_a), _with_eof(status_runs(b), size_b)
    pos = 0
    end_a = end_b = 0
    flags_a = flags_b = 0
    while pos < end:
        if pos >= end_a:
            end_a, flags_a = _next_run(runs_a, a, pos)
        if pos >= end_b:
            end_b, flags_b = _next_run(runs_b, b, pos)
        stop = min(end_a, end_b, end)
        yield pos, stop - pos, flags_a, flags_b
        pos = stop


def _next_run(runs: Iterator[Tuple[int, int, int]], image: Image, pos: int) -> Tuple[int, int]:
    """The end and flags of the next run; a driver whose runs stop short of its size is a bug."""
    run = next(runs, None)
    if run is None:
        raise ImageError("block status ends at offset %d, before the end of the image" % pos,
                         path=getattr(image, "path", None))
    return pos + run[1], run[2]


def _with_eof(runs: Iterator[Tuple[int, int, int]], size: int) -> Iterator[Tuple[int, int, int]]:
    for start, n, flags in runs:
        yield start, n, flags | (S_EOF if start + n == size else 0)


class _Checker:
    """Collects adjacent ranges that need the same check and reads them in large batches.

    Remembers where each qemu-img request would have started (*piece* starts) so a
    difference is reported at the offset qemu-img names.
    """

    def __init__(self, a: Image, b: Image, verdict: Verdict):
        self.a, self.b, self.verdict = a, b, verdict
        self.kind: Optional[str] = None
        self.start = self.end = 0       # the range collected and not yet checked
        self.pieces: List[int] = []     # starts of the ranges added, ascending
        # Reused buffers.  The kernel copies into page-aligned memory several times faster than
        # into a plain bytearray, and bytearrays compare in C (memcmp): page-aligned bytearrays.
        self.mapped = aligned_bytearray(BATCH)
        self.mapped_b = aligned_bytearray(BATCH)
        self.zeros = bytearray(BATCH)
        self.pool: Optional[ThreadPoolExecutor] = None    # reads the second image meanwhile

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def add(self, start: int, length: int, kind: str) -> bool:
        """Queue a range; True once a difference has been reported."""
        if kind != self.kind or start != self.end:
            if self.flush():
                return True
            self.kind, self.start = kind, start
        self.pieces.append(start)
        self.end = start + length
        while self.end - self.start >= BATCH:
            if self._check(self.start, self.start + BATCH):
                return True
            self.start += BATCH
        return False

    def flush(self) -> bool:
        """Check what is queued; True when it differs (the message is out)."""
        if self.end > self.start and self._check(self.start, self.end):
            return True
        self.start = self.end
        self.pieces = self.pieces[-1:]
        return False

    def _check(self, lo: int, hi: int) -> bool:
        n = hi - lo
        x = memoryview(self.mapped)[:n]
        if self.kind == BOTH:
            xb = memoryview(self.mapped_b)[:n]
            if n >= PARALLEL_READ:
                # both kernel copies at once, on two CPUs (preadv drops the GIL)
                if self.pool is None:
                    self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdisk-compare",
                                                   initializer=main_thread_only)
                pending = self.pool.submit(_read_into, self.b, lo, xb)
                try:
                    _read_into(self.a, lo, x)
                finally:
                    pending.result()
            else:
                _read_into(self.a, lo, x)
                _read_into(self.b, lo, xb)
            y = self.mapped_b if n == BATCH else self.mapped_b[:n]
        else:
            _read_into(self.a if self.kind == ONLY_A else self.b, lo, x)
            y = self.zeros if n == BATCH else bytearray(n)
        if y == x:
            # keep only the piece that may continue past hi
            keep = bisect_right(self.pieces, hi) - 1
            del self.pieces[:max(keep, 0)]
            return False
        self.verdict.content_mismatch(self._reported(lo + first_difference(bytes(x), bytes(y))))
        return True

    def _reported(self, pos: int) -> int:
        """qemu-img's offset for a difference at *pos*: the first differing sector of its request.
        Its 2 MiB requests start at sector multiples from the piece's start, so only that matters."""
        piece = self.pieces[bisect_right(self.pieces, pos) - 1]
        return piece + (pos - piece) // SECTOR * SECTOR


def _read_into(image: Image, offset: int, view: memoryview) -> None:
    """Fill *view* with guest bytes; zeros past the virtual size (QEMU counts whole sectors)."""
    avail = max(0, min(len(view), image.virtual_size - offset))
    if avail:
        image.read_into(offset, view[:avail])
    if avail < len(view):
        view[avail:] = bytes(len(view) - avail)


def first_difference(x: bytes, y: bytes) -> int:
    """Index of the first byte where *x* and *y* (same length) differ, or their length."""
    lo, hi = 0, len(x)
    # halve the range while it is large: equal-prefix tests stay in C
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if x[lo:mid] != y[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if x[i] != y[i]:
            return i
    return hi
