"""qcow2 preallocation (create and resize with ``preallocation=metadata|falloc|full``): every
cluster of a guest range mapped to host clusters, in the layout QEMU produces.

A function of an open image (``formats/qcow2/image.py``), kept apart from the driver so that the
image, which preallocates on resize, and the driver, which preallocates on create, both import it
and neither imports the other back.
"""
from .header import OFLAG_COPIED


def preallocate(image, offset: int, length: int, mode: str) -> None:
    """Map every cluster of the range to host clusters (metadata); reserve (falloc) or zero (full) them."""
    cs = image.cs
    span = image.l2e * cs
    first = offset // cs
    last = (offset + length - 1) // cs
    if length <= 0:
        return
    # L2 tables first, then the data clusters in one contiguous run: the layout QEMU produces
    for l1i in range(first * cs // span, last * cs // span + 1):
        image._writable_l2(l1i)
    count = last - first + 1
    # with a backing file, reserved clusters must not hide it: allocated but every subcluster unallocated
    bitmap = (0 if image.backing_filename else 0xFFFFFFFF) if image.ext else 0
    # data-file clusters sit at their guest offsets, unrefcounted; the data file keeps the disk's size
    host = image._alloc_data(first, count)
    target = image._data()
    end = min(host + count * cs, image.virtual_size) if image.data_file is not None else host + count * cs
    if mode == "falloc":
        target.fallocate(host, end - host)
    elif mode == "full":
        target.write_zeroes_full(host, end - host)
    if target.size() < end:
        target.truncate(end)
    ci = first
    while ci <= last:
        l1i = ci // image.l2e
        l2_off, table = image._writable_l2(l1i)
        stop = min(last + 1, (l1i + 1) * image.l2e)
        for c in range(ci, stop):
            entry = (host + (c - first) * cs) | OFLAG_COPIED
            image._set_entry(table, c % image.l2e, entry, bitmap)
        image._write_l2_span(l2_off, table, ci % image.l2e, (stop - 1) % image.l2e)
        ci = stop
