"""qemu-img convert, written once against the Image interface: any readable format to any writable one.

The source is opened read-only.  Its allocation map is walked so that holes and zero
extents are never read; data is read in large batches and zero-detected at the
``-S`` granularity; only non-zero runs are written.  A new destination is created
beside its final path and renamed into place when complete (unless ``-n``).
"""
import os
from typing import Any, Callable, Dict, List, Optional

from ..driver import DATA, UNALLOCATED, ZERO, Image, Policy
from ..errors import ImageError, InvalidOption, UnsupportedFeature
from ..io import AtomicOutput, find_nonzero_runs
from ..registry import get_driver
from .chain import close_chain, open_image

CHUNK = 8 * 1024 * 1024
DEFAULT_SPARSE = 4096


class _Concat:
    """Several source images read as one disk, one after another (qemu-img convert SRC... DST)."""

    def __init__(self, images: List[Image]):
        self.images = images
        self.virtual_size = sum(i.virtual_size for i in images)

    def parts(self, offset: int, length: int):
        base = 0
        for img in self.images:
            end = base + img.virtual_size
            if offset < end and offset + length > base:
                a = max(offset, base)
                b = min(offset + length, end)
                yield img, a - base, b - a, a
            base = end


def convert(sources: List[str], dest: str, src_fmt: Optional[str] = None, out_fmt: str = "raw",
            options: Optional[Dict[str, Any]] = None, compress: bool = False, sparse_size: int = DEFAULT_SPARSE,
            existing: bool = False, target_is_zero: bool = False, snapshot: Optional[str] = None,
            policy: Optional[Policy] = None, progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Copy the guest content of *sources* (concatenated) into *dest* in format *out_fmt*."""
    options = dict(options or {})
    driver = get_driver(out_fmt)
    if compress and "compression" not in driver.capabilities:
        raise UnsupportedFeature("Compression not supported for this file format", path=dest, field="-c")
    if compress:
        raise UnsupportedFeature("compressed output (-c) is not implemented yet", path=dest, field="-c")
    if snapshot is not None:
        raise UnsupportedFeature("converting from an internal snapshot (-l) is not implemented yet",
                                 path=sources[0], field="-l")
    if sparse_size % 512:
        raise InvalidOption("Invalid buffer size for sparse output specified", field="-S")
    images: List[Image] = []
    try:
        for src in sources:
            if os.path.exists(dest) and os.path.samefile(src, dest):
                raise ImageError("source and destination are the same file", path=dest)
            images.append(open_image(src, src_fmt, writable=False, policy=policy))
        source = _Concat(images)
        size = source.virtual_size
        if existing:
            out = open_image(dest, out_fmt, writable=True, policy=policy, backing=False)
            try:
                if out.virtual_size < size:
                    raise ImageError("output file is smaller than input file", path=dest)
                _copy(source, out, sparse_size, progress, zero_unwritten=not target_is_zero)
                out.flush()
            finally:
                close_chain(out)
            return
        typed = driver.parse_options(options)
        tmp = AtomicOutput(dest)
        try:
            os.unlink(tmp.tmp_path)
            driver.create(tmp.tmp_path, size, typed)
            out = driver.open(tmp.tmp_path, writable=True, policy=Policy(lock=False))
            try:
                _copy(source, out, sparse_size, progress, zero_unwritten=False)
                out.flush()
            finally:
                out.close()
            tmp.commit()
        except BaseException:
            tmp.abort()
            raise
    finally:
        for img in images:
            close_chain(img)


def _copy(source: _Concat, out: Image, sparse_size: int, progress, zero_unwritten: bool) -> None:
    size = source.virtual_size
    done = 0
    gran = sparse_size or None
    for img, offset, length, dest_offset in source.parts(0, size):
        for run_offset, run_length, kind in _data_runs(img, offset, length):
            dpos = dest_offset + run_offset - offset
            if kind != DATA:
                if zero_unwritten or sparse_size == 0:
                    if sparse_size == 0:
                        _write_real_zeros(out, dpos, run_length)
                    else:
                        out.write_zeroes(dpos, run_length)
                done += run_length
                if progress:
                    progress(done, size)
                continue
            pos = run_offset
            end = run_offset + run_length
            while pos < end:
                n = min(CHUNK, end - pos)
                data = img.read(pos, n)
                target = dest_offset + pos - offset
                if gran is None:
                    out.write(target, data)
                else:
                    for off, rn, is_zero in find_nonzero_runs(data, gran):
                        if not is_zero:
                            out.write(target + off, data[off:off + rn])
                        elif zero_unwritten:
                            out.write_zeroes(target + off, rn)
                pos += n
                done += n
                if progress:
                    progress(done, size)


def _write_real_zeros(out: Image, offset: int, length: int) -> None:
    zeros = bytes(min(CHUNK, length))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        out.write(offset, zeros[:n])
        offset += n


def _data_runs(img: Image, offset: int, length: int):
    """``(offset, length, DATA|ZERO)`` of the guest view of a chain: unallocated ranges resolve downwards."""
    for ext in img.extents(offset, length):
        if ext.kind == UNALLOCATED and img.backing is not None:
            inside = max(0, min(ext.offset + ext.length, img.backing.virtual_size) - ext.offset)
            if inside:
                yield from _data_runs(img.backing, ext.offset, inside)
            if inside < ext.length:
                yield ext.offset + inside, ext.length - inside, ZERO
        elif ext.kind == DATA and not ext.reads_zero:
            yield ext.offset, ext.length, DATA
        else:
            yield ext.offset, ext.length, ZERO
