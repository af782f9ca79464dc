"""Copying guest data between open images in large chunks, skipping zeros."""
from typing import Callable, Iterable, Optional, Tuple

from ..driver import Image
from ..io import find_nonzero_runs

CHUNK = 4 * 1024 * 1024


def copy_allocated_ranges(src: Image, dst: Image, ranges: Iterable[Tuple[int, int]],
                          progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Copy *src*'s guest content in *ranges* to the same offsets of *dst*; zero runs become zero writes."""
    ranges = list(ranges)
    total = sum(n for dummy, n in ranges) or 1
    done = 0
    gran = dst.cluster_size or 65536
    for start, length in ranges:
        pos = start
        end = start + length
        while pos < end:
            n = min(CHUNK, end - pos)
            data = src.read(pos, n)
            for off, run, is_zero in find_nonzero_runs(data, gran):
                if is_zero:
                    dst.write_zeroes(pos + off, run)
                else:
                    dst.write(pos + off, data[off:off + run])
            pos += n
            done += n
            if progress:
                progress(done, total)
