"""qemu-img commit: write an overlay's data into its backing file (or a deeper base)."""
import os
from typing import Callable, List, Optional

from ..driver import UNALLOCATED, Image, Policy
from ..errors import ImageError
from .chain import chain_of, close_chain, open_image, open_reference
from .copy import copy_allocated_ranges


def _same_file(layer: Image, path: str) -> bool:
    """Whether the user's *path* is the file the backing *layer* has open (checked and verified)."""
    ref = layer.opened_as
    try:
        st = os.stat(path)
    except OSError:
        return False
    return ref is not None and ref.ident == (st.st_dev, st.st_ino)


def commit(path: str, fmt: Optional[str] = None, base: Optional[str] = None, drop: bool = False,
           policy: Optional[Policy] = None, progress: Optional[Callable[[int, int], None]] = None) -> str:
    """Commit *path* into *base* (default: its backing file); empty it afterwards unless *drop*.

    Returns the path of the image that received the data.
    """
    top = open_image(path, fmt, writable=not drop, policy=policy)
    try:
        layers = chain_of(top)
        if len(layers) < 2:
            raise ImageError("Image does not have a backing file", path=path)
        if base is None:
            index = 1
        else:
            matches = [i for i, layer in enumerate(layers[1:], 1) if _same_file(layer, base)]
            if not matches:
                raise ImageError("'%s' is not in the backing chain of '%s'" % (base, path), path=path,
                                 field="base")
            index = matches[0]
        target = layers[index]
        above = layers[:index]
        # the base is open read-only inside the chain: reopen it writable in its place
        parent = layers[index - 1]
        below = target.backing
        # the same resolved, checked file, verified again at this open: never the name reopened
        ref, target_path, target_fmt = target.opened_as, target.path, target.driver.name
        if ref is None:
            raise ImageError("backing file '%s' was not opened through the path policy" % target_path, path=path,
                             field="backing file")
        target.close()
        writable = open_reference(ref, target_fmt, True, (policy or Policy()).with_root(path))
        writable.backing = below
        parent.backing = writable
        if writable.virtual_size < top.virtual_size:
            writable.resize(top.virtual_size)
        ranges = _allocated_union(above, top.virtual_size)
        copy_allocated_ranges(top, writable, ranges, progress=progress)
        writable.flush()
        if not drop:
            top.make_empty()
        return target_path
    finally:
        close_chain(top)


def _allocated_union(layers: List[Image], size: int):
    """Guest ranges allocated (data or zero) in any of *layers*, merged and sorted."""
    ranges = []
    for layer in layers:
        for ext in layer.extents(0, min(size, layer.virtual_size)):
            if ext.kind != UNALLOCATED:
                ranges.append((ext.offset, ext.offset + ext.length))
    ranges.sort()
    merged = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e - s) for s, e in merged]
