"""qemu-img compare: 0 identical, 1 different, 2 error; an unallocated area equals zeros."""
from typing import Callable, Optional

from ..driver import Policy
from .chain import close_chain, open_image

CHUNK = 2 * 1024 * 1024


def compare(path_a: str, path_b: str, fmt_a: Optional[str] = None, fmt_b: Optional[str] = None,
            strict: bool = False, policy: Optional[Policy] = None,
            say: Callable[[str], None] = print) -> int:
    """Compare the guest content of two images; prints qemu-img's messages through *say*."""
    a = open_image(path_a, fmt_a, policy=policy)
    try:
        b = open_image(path_b, fmt_b, policy=policy)
        try:
            return _compare(a, b, strict, say)
        finally:
            close_chain(b)
    finally:
        close_chain(a)


def _first_difference(x: bytes, y: bytes) -> int:
    lo, hi = 0, len(x)
    # binary search on equal prefixes keeps the comparison in C
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


def _compare(a, b, strict: bool, say) -> int:
    size_a, size_b = a.virtual_size, b.virtual_size
    if size_a != size_b:
        if strict:
            say("Strict mode: Image size mismatch!")
            return 1
        say("Warning: Image size mismatch!")
    common = min(size_a, size_b)
    pos = 0
    while pos < common:
        n = min(CHUNK, common - pos)
        x = a.read(pos, n)
        y = b.read(pos, n)
        if x != y:
            at = pos + _first_difference(x, y) // 512 * 512
            say("Content mismatch at offset %d!" % at)
            return 1
        pos += n
    longer = a if size_a > size_b else b
    pos = common
    zeros = bytes(CHUNK)
    while pos < longer.virtual_size:
        n = min(CHUNK, longer.virtual_size - pos)
        data = longer.read(pos, n)
        if data != zeros[:n]:
            at = pos + _first_difference(data, zeros[:n]) // 512 * 512
            say("Content mismatch at offset %d!" % at)
            return 1
        pos += n
    say("Images are identical.")
    return 0
