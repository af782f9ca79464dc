"""Opening an image with its backing chain, under the safety policy.

The format is probed only when the caller gave none; a probed raw file is never
allowed to become a format that names other files, and backing files are opened
read-only, inside the allowed directories, with loop detection and a depth cap.
The image the command line names may be a block device (``Policy.named_device``); the
files an image names never are.
"""
import os
from typing import List, Optional

from ..driver import Image, Policy, ResolvedPath
from ..io import NamedDevice
from ..errors import FormatError, ImageError, PolicyError, UnsupportedFeature
from ..registry import get_driver, probe_file, probe_header, probe_scores


def open_image(path: str, fmt: Optional[str] = None, writable: bool = False,
               policy: Optional[Policy] = None, backing: bool = True, replacing: bool = False) -> Image:
    """Open *path* (format *fmt*, probed when None) and, if *backing*, its whole backing chain.

    *path* may be a block device where the policy grants it (``Policy.named_device``: the user
    named it on the command line).  A device is written only as raw, and its directory (``/dev``)
    is no image tree: the files it names come from the allowed directories alone (and are never
    devices).  *replacing*: the caller is about to overwrite all of it (convert onto a device
    without -n, qemu-img's "create" of a host device), so the format of its old content is not
    held against *fmt*."""
    policy = policy or Policy()
    if not os.path.exists(path):
        raise ImageError("Could not open '%s': No such file or directory" % path, path=path)
    device = policy.named_device(path)
    if device is None:
        policy = policy.with_root(path)
    image = _open_one(path, fmt, writable, policy, device, replacing)
    if backing and policy.follow_backing:
        try:
            attach_backing_chain(image, policy)
        except BaseException:
            image.close()
            raise
    return image


def _open_one(path: str, fmt: Optional[str], writable: bool, policy: Policy, device: Optional[NamedDevice] = None,
              replacing: bool = False) -> Image:
    """Open the one image *path*; *device* is its grant when it is the user's block device."""
    if fmt is None:
        if not policy.probe:
            raise FormatError("the image format must be given (probing is disabled)", path=path, field="format")
        fmt = probe_file(path, checked=device)
    elif writable and not replacing:
        check_declared_format(path, fmt, checked=device)
    if device is not None:
        if writable and fmt != "raw":
            # the format drivers grow their files as they allocate; a device has a fixed size
            raise UnsupportedFeature("image format %s cannot be written on a block device; vdisk writes only "
                                     "raw data onto a block device" % fmt, path=path, field="format")
        policy = policy.replace(opening=device)    # the drivers' HostFile(checked=) gets the grant
    return get_driver(fmt).open(path, writable=writable, policy=policy)


def is_raw_view(fmt: str) -> bool:
    """Whether a file detected as *fmt* may be declared raw (``Driver.raw_view``: its guest data is
    the file's bytes as they are)."""
    return get_driver(fmt).raw_view


def check_declared_format(path: str, fmt: str, checked: Optional[NamedDevice] = None) -> None:
    """Refuse to write to *path* as *fmt* when its content says it is something else.

    A guest can write a qcow2 header into its raw disk; a later write through a tool that
    trusts the content would follow the backing file that header names, and a write through a
    tool that trusts the declaration would corrupt a real image opened with the wrong ``-f``.
    Either way the mismatch is an error for every command that writes (REFERENCE "B").
    *checked*: the grant of the user's block device, read through it."""
    detected = [name for dummy, name in probe_scores(probe_header(path, checked), path)
                if name != "raw" and not (fmt == "raw" and is_raw_view(name))]
    if not detected or detected == [fmt]:
        return
    if fmt not in detected:
        raise FormatError("declared format %s, but the file's content is a %s image; refusing to write "
                          "to it" % (fmt, detected[0]), path=path, field="format")
    raise FormatError("the file matches more than one format (%s); refusing to write to it"
                      % ", ".join(detected), path=path, field="format")


def attach_backing_chain(image: Image, policy: Policy) -> None:
    """Open the backing files of *image* read-only, recursively, and attach them.

    Each name is resolved once (``Policy.resolve``); the driver opens the checked real path and
    verifies the descriptor (``HostFile(checked=)``), and a loop is a file whose device and inode
    are already in the chain."""
    seen = {_identity(image)}
    current = image
    depth = 0
    while current.backing_filename:
        depth += 1
        if depth > policy.max_chain_depth:
            raise PolicyError("backing chain is longer than %d images" % policy.max_chain_depth,
                              path=image.path, field="backing file")
        ref = policy.resolve(current.backing_filename, current.path)   # refuses what is not allowed
        if ref.ident is None:
            # the path as qemu-img shows it: relative to the directory of the overlay's path as given
            raise ImageError("Could not open backing file '%s': No such file or directory" % ref.display,
                             path=current.path, field="backing file")
        if ref.ident in seen:
            raise PolicyError("backing chain loop: '%s' is already in the chain" % current.backing_filename,
                              path=current.path, field="backing file")
        seen.add(ref.ident)
        fmt = current.backing_format
        if fmt is None:
            # an image without a recorded backing format: probe, but never into a format naming files
            fmt = probe_file(ref.display, checked=ref)
            if get_driver(fmt).names_other_files:
                raise PolicyError("backing file '%s' has no recorded format and probes as %s, which can name "
                                  "other files; record the format (rebase -u -F)" % (current.backing_filename, fmt),
                                  path=current.path, field="backing format")
        current.backing = open_reference(ref, fmt, False, policy)
        current = current.backing


def open_reference(ref: ResolvedPath, fmt: str, writable: bool, policy: Policy) -> Image:
    """Open the file an image names, resolved as *ref*, as *fmt*: the driver opens ``ref.display``
    (the name qemu-img shows), its HostFile the checked real path, verified (``Policy.checked``)."""
    opened = get_driver(fmt).open(ref.display, writable=writable, policy=policy.replace(opening=ref))
    if getattr(getattr(opened, "host", None), "checked", None) is not ref:
        opened.close()
        raise PolicyError("format %s did not open %s %r as it was checked; refused" % (fmt, ref.what, ref.name),
                          path=ref.image, field=ref.what)
    opened.opened_as = ref
    return opened


def chain_of(image: Image) -> List[Image]:
    """The images of a chain, top first."""
    out = []
    while image is not None:
        out.append(image)
        image = image.backing
    return out


def close_chain(image: Optional[Image]) -> None:
    """Close an image and every backing image attached to it."""
    while image is not None:
        nxt = image.backing
        image.close()
        image = nxt


def _identity(image: Image):
    """Device and inode of the file *image* has open (of its path when it keeps no host file)."""
    host = getattr(image, "host", None)
    st = os.fstat(host.fd) if host is not None and getattr(host, "fd", -1) >= 0 else os.stat(image.path)
    return (st.st_dev, st.st_ino)
