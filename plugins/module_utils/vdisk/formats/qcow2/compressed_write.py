"""Writing compressed clusters (qemu-img convert -c), as docs/interop/qcow2.txt describes them.

A compressed cluster is stored byte-packed: payloads follow each other in host clusters,
may cross into the next host cluster when it is contiguous, and every host cluster's refcount
is the number of payloads touching it.  The L2 entry holds the payload's host offset and the
number of 512-byte sectors it occupies beyond the first.  Payloads are written (and their
refcounts raised) before the L2 entries that point to them, so an interruption leaks at most.
"""
from typing import List, Optional, Sequence, Tuple

from ...errors import ImageError
from . import header as hdr
from .compress import compress_cluster

ALL_ZERO_BITMAP = 0


def compress_for_cluster(data: bytes, cluster_size: int, ctype: int) -> Optional[bytes]:
    """The payload for one guest cluster, or None when it would not be smaller than the cluster
    (QEMU then stores the cluster uncompressed).  A short last cluster is padded with zeros."""
    if len(data) < cluster_size:
        data = bytes(data) + bytes(cluster_size - len(data))
    payload = compress_cluster(data, ctype)
    return payload if len(payload) < cluster_size else None


def descriptor(cluster_bits: int, host_offset: int, length: int) -> int:
    """The L2 entry of a compressed cluster whose payload is *length* bytes at *host_offset*."""
    x = 62 - (cluster_bits - 8)
    extra_sectors = ((host_offset + length - 1) >> 9) - (host_offset >> 9)
    return hdr.OFLAG_COMPRESSED | (extra_sectors << x) | host_offset


def _place(img, payloads: List[bytes]) -> List[int]:
    """Write *payloads* into host space with refcounts; return each one's host offset.

    No host cluster gets more payloads than its refcount can count (refcount_bits=1 allows one):
    a payload that would overflow one starts at the next cluster instead, as QEMU does."""
    cs = img.cs
    rc = img.refcounts
    limit = rc.max_refcount
    offsets: List[int] = []
    i = 0
    tail = rc.compressed_tail
    if tail and rc.get(tail // cs) < limit:
        # first fill the rest of the partly used host cluster (its refcount counts its payloads)
        room = cs - tail % cs
        count = min(limit - rc.get(tail // cs), len(payloads))
        used = 0
        while i < count and used + len(payloads[i]) <= room:
            offsets.append(tail + used)
            used += len(payloads[i])
            i += 1
        if i:
            img.host.pwrite(b"".join(payloads[:i]), tail)
            rc.change(tail // cs, 1, i)
            tail += used
    rc.compressed_tail = 0
    rest = payloads[i:]
    if not rest:
        rc.compressed_tail = tail if tail % cs else 0
        return offsets
    # lay the rest out in a new contiguous region: positions relative to its start
    touching: List[int] = []
    relative: List[int] = []
    pos = 0
    for p in rest:
        first, last = pos // cs, (pos + len(p) - 1) // cs
        if first < len(touching) and touching[first] >= limit:
            pos = (first + 1) * cs
            first, last = pos // cs, (pos + len(p) - 1) // cs
        while len(touching) <= last:
            touching.append(0)
        for c in range(first, last + 1):
            touching[c] += 1
        relative.append(pos)
        pos += len(p)
    count = len(touching)
    buf = bytearray(count * cs)
    for rel, p in zip(relative, rest):
        buf[rel:rel + len(p)] = p
    base = rc.alloc(count)                 # refcount 1 each; raised below to the payload count
    img.host.pwrite(bytes(buf[:pos]), base)
    c = 0
    while c < count:
        extra = touching[c] - 1
        run = c
        while run < count and touching[run] - 1 == extra:
            run += 1
        if extra:
            rc.change(base // cs + c, run - c, extra)
        c = run
    offsets.extend(base + rel for rel in relative)
    rc.compressed_tail = base + pos if pos % cs and touching[-1] < limit else 0
    return offsets


def write_compressed(img, offset: int, blocks: Sequence[Tuple[bytes, Optional[bytes]]]) -> None:
    """Store consecutive guest clusters from cluster-aligned *offset*; each block is
    ``(data, payload)``, payload from :func:`compress_for_cluster` (None: written uncompressed)."""
    cs, cb = img.cs, img.cb
    if offset % cs:
        raise ImageError("compressed writes must start at a cluster boundary (offset %d)" % offset,
                         path=img.path, field="offset")
    total = sum(len(d) for d, dummy in blocks)
    img._prepare_write(offset, total)
    compressed: List[Tuple[int, bytes]] = []
    g = offset
    for data, payload in blocks:
        if payload is None:
            img.write(g, data)
        else:
            if len(data) != cs and g + len(data) != img.virtual_size:
                raise ImageError("a compressed write covers whole clusters (offset %d, length %d)"
                                 % (g, len(data)), path=img.path, field="length")
            compressed.append((g, payload))
        g += len(data)
    if not compressed:
        return
    hosts = _place(img, [p for dummy, p in compressed])
    # L2 entries, one table at a time; the clusters they replace are released afterwards
    span = img.l2e
    i = 0
    while i < len(compressed):
        l1i = (compressed[i][0] >> cb) // span
        l2_off, table = img._writable_l2(l1i)
        first = last = None
        releases = []
        while i < len(compressed) and (compressed[i][0] >> cb) // span == l1i:
            g, payload = compressed[i]
            idx = (g >> cb) % span
            old_entry, dummy = img._entry(table, idx)
            if old_entry & hdr.OFLAG_COMPRESSED:
                releases.append(("compressed", None, old_entry))
            elif old_entry & hdr.OFFSET_MASK:
                releases.append(("data", old_entry & hdr.OFFSET_MASK, old_entry))
            img._set_entry(table, idx, descriptor(cb, hosts[i], len(payload)), ALL_ZERO_BITMAP)
            first = idx if first is None else first
            last = idx
            i += 1
        img._write_l2_span(l2_off, table, first, last)
        for kind, host, entry in releases:
            img._release(kind, host, entry)
