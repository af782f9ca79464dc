"""qemu-img rebase: change an image's backing file, keeping the guest's view (safe) or not (-u)."""
import os
from typing import Callable, Optional

from ..driver import UNALLOCATED, Policy
from ..errors import ImageError
from ..registry import get_driver, probe_file
from .chain import attach_backing_chain, close_chain, open_image

COMPARE_CHUNK = 1024 * 1024


def rebase(path: str, backing: str, backing_fmt: Optional[str] = None, fmt: Optional[str] = None,
           unsafe: bool = False, policy: Optional[Policy] = None,
           progress: Optional[Callable[[int, int], None]] = None) -> Optional[str]:
    """Point *path* at *backing* (``""`` = none).  Safe mode copies into the image every cluster whose
    content differs between the old and the new backing chain.  Returns the recorded backing format."""
    policy = policy or Policy()
    if unsafe:
        image = open_image(path, fmt, writable=True, policy=policy, backing=False)
    else:
        image = open_image(path, fmt, writable=True, policy=policy)
    try:
        new_fmt = backing_fmt
        new_image = None
        if backing and unsafe and new_fmt is None:
            raise ImageError("backing format must be specified with -F for an unsafe rebase", path=path,
                             field="backing format")
        if backing:
            full = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                       backing)
            if not os.path.exists(full):
                if not unsafe:
                    raise ImageError("Could not open new backing file '%s': No such file or directory" % full,
                                     path=path, field="backing file")
            elif new_fmt is None:
                new_fmt = probe_file(full)   # the user named it; recorded below so it is never probed again
            if not unsafe:
                # the user named this file: allow its directory, then open it with its own chain
                allowed = policy.replace(allowed_dirs=tuple(policy.allowed_dirs) +
                                         (os.path.dirname(os.path.realpath(full)),))
                new_image = get_driver(new_fmt).open(full, writable=False, policy=allowed)
                try:
                    attach_backing_chain(new_image, allowed.with_root(full))
                except BaseException:
                    close_chain(new_image)
                    raise
        if not unsafe:
            try:
                _copy_differences(image, new_image, progress)
            finally:
                close_chain(new_image)
        image.set_backing(backing or None, new_fmt if backing else None)
        return new_fmt
    finally:
        close_chain(image)


def _copy_differences(image, new_backing, progress) -> None:
    old = image.backing
    gran = image.cluster_size or 65536
    unallocated = [(e.offset, e.length) for e in image.extents() if e.kind == UNALLOCATED]
    total = sum(n for dummy, n in unallocated) or 1
    done = 0

    def view(layer, off, n):
        if layer is None or off >= layer.virtual_size:
            return bytes(n)
        avail = min(n, layer.virtual_size - off)
        data = layer.read(off, avail)
        return data + bytes(n - avail)

    for start, length in unallocated:
        pos = start
        end = start + length
        while pos < end:
            n = min(COMPARE_CHUNK, end - pos)
            a = view(old, pos, n)
            b = view(new_backing, pos, n)
            if a != b:
                # write back the old content of each differing cluster-sized piece
                i = 0
                while i < n:
                    j = min(n, i + gran - (pos + i) % gran)
                    if a[i:j] != b[i:j]:
                        k = j
                        while k < n and a[k:min(n, k + gran)] != b[k:min(n, k + gran)]:
                            k = min(n, k + gran)
                        image.write(pos + i, a[i:k])
                        i = k
                    else:
                        i = j
            pos += n
            done += n
            if progress:
                progress(done, total)
