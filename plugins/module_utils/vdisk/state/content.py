"""Is the guest content of two views equal?  Asked by idempotency checks, so cheap cases come first.

* two views of one file (a snapshot and the active layer) whose mappings are identical hold the
  same data without reading it: the extents are compared window by window, and only windows
  whose mappings differ are read;
* ranges that read as zeros in both views are never read.
"""
from typing import Optional

from ..driver import DATA, UNALLOCATED, Image, Policy
from ..ops.chain import close_chain, open_image
from .encryption import Encryption, unlocking

WINDOW = 8 * 1024 * 1024


def same_content(a: Image, b: Image, same_file: bool = False) -> bool:
    """True when *a* and *b* (open chains) read the same guest bytes over the same virtual size.

    *same_file*: both are views of one image file, so equal extents (host offsets included) mean
    equal data.
    """
    if a.virtual_size != b.virtual_size:
        return False
    size = a.virtual_size
    offset = 0
    while offset < size:
        n = min(WINDOW, size - offset)
        ea, eb = list(a.extents(offset, n)), list(b.extents(offset, n))
        if same_file and ea == eb and all(e.kind != DATA or e.host_offset is not None for e in ea):
            offset += n
            continue
        if not (_reads_zero(a, ea) and _reads_zero(b, eb)) and a.read(offset, n) != b.read(offset, n):
            return False
        offset += n
    return True


def _reads_zero(image: Image, extents) -> bool:
    for ext in extents:
        if ext.kind == DATA and not ext.reads_zero:
            return False
        if ext.kind == UNALLOCATED and image.backing is not None:
            return False
    return True


def snapshot_matches_active(path: str, name: str, fmt: Optional[str] = None,
                            policy: Optional[Policy] = None) -> bool:
    """True when the active layer of *path* equals its internal snapshot *name* (size and content),
    so applying the snapshot would change nothing."""
    active = open_image(path, fmt, writable=False, policy=policy)
    try:
        snap_size = None
        for snap in getattr(active, "snapshots_table", lambda: [])():
            if snap.name == name:
                snap_size = snap.disk_size
                break
        if snap_size is not None and snap_size != active.virtual_size:
            return False
        view = open_image(path, active.driver.name, writable=False, policy=policy)
        try:
            view.select_snapshot(None, name)
            return same_content(active, view, same_file=True)
        finally:
            close_chain(view)
    finally:
        close_chain(active)


def converted_content_matches(source: str, dest: str, src_format: Optional[str], dest_format: str,
                              snapshot: Optional[str] = None, policy: Optional[Policy] = None,
                              source_encryption: Optional[Encryption] = None,
                              encryption: Optional[Encryption] = None) -> bool:
    """True when *dest* (format *dest_format*) holds the guest content of *source* (or of its
    internal *snapshot*, qemu-img's ``-l`` syntax).  An encrypted source or destination opens with
    the passphrase of *source_encryption* or *encryption* (each its own)."""
    if snapshot is None and source_encryption is None and encryption is None:
        from ..ops.compare import compare
        return compare(source, dest, src_format, dest_format, strict=False, policy=policy,
                       say=lambda line: None) == 0
    from ..ops.convert import parse_snapshot_param
    src = open_image(source, src_format, writable=False, policy=unlocking(policy, source_encryption, source))
    try:
        if snapshot is not None:
            src.select_snapshot(*parse_snapshot_param(snapshot))
        out = open_image(dest, dest_format, writable=False, policy=unlocking(policy, encryption, dest))
        try:
            return same_content(src, out)
        finally:
            close_chain(out)
    finally:
        close_chain(src)
