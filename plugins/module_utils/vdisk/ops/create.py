"""qemu-img create: options, size rules, backing files."""
import os
from typing import Any, Dict, List, Optional

from ..driver import Image, Policy
from ..errors import ImageError, InvalidOption, UnsupportedFeature
from ..io import HostFile
from ..registry import PROBE_BYTES, get_driver, probe_scores
from ..units import round_up
from .chain import close_chain, open_image


def create(path: str, fmt: str, size: Optional[int], options: Dict[str, Any],
           backing_file: Optional[str] = None, backing_fmt: Optional[str] = None,
           policy: Optional[Policy] = None, notes: Optional[List[str]] = None, unsafe: bool = False) -> Dict[str, Any]:
    """Create an image as ``qemu-img create`` does; returns the options actually used.

    *options* are raw ``-o`` values; ``-b``/``-F`` may come as arguments or options.
    A backing file is opened, as qemu-img opens it (relative to the new image's directory, with
    its own backing chain, read-only, without image locks): a missing or unreadable one is
    refused before anything is written.  Its size is taken when none is given and, when no format
    is given, its format is detected and recorded, so it is never probed again; *notes* receives a
    line saying so.  *unsafe* (``-u``) records the backing file without opening it: then a size
    and the backing format must be given.
    """
    driver = get_driver(fmt)
    device = (policy or Policy()).named_device(path)
    raw = dict(options)
    if "size" in raw:
        if size is not None:
            raise InvalidOption("size given twice (argument and -o size=)", path=path, field="size")
        size = driver.option("size").parse(raw.pop("size"))
    if backing_file is not None:
        raw["backing_file"] = backing_file
    if backing_fmt is not None:
        raw["backing_fmt"] = backing_fmt
    typed = driver.parse_options(raw)
    backing = typed.get("backing_file")
    if backing:
        if "backing" not in driver.capabilities:
            raise InvalidOption("format %s does not support backing files" % fmt, path=path, field="backing_file")
        if not unsafe:
            base = _open_backing(path, backing, typed.get("backing_fmt"), policy)
            try:
                if not typed.get("backing_fmt"):
                    typed["backing_fmt"] = _detected_format(base, backing, path)
                    if notes is not None:
                        notes.append("backing file '%s' detected as %s; recorded as its backing format"
                                     % (backing, typed["backing_fmt"]))
                if size is None:
                    size = base.virtual_size
            finally:
                close_chain(base)
        elif not typed.get("backing_fmt"):
            raise InvalidOption("Backing file specified without backing format", path=path, field="backing_fmt")
    if size is None:
        raise InvalidOption("Image creation needs a size parameter", path=path, field="size")
    size = round_up(size, 512)
    if device is not None:
        _create_on_device(path, fmt, size, typed, policy or Policy())
    elif backing and typed.get("preallocation") == "falloc" and not typed.get("extended_l2"):
        _create_reserved(driver, path, size, typed, notes)
    else:
        driver.create(path, size, typed)
    typed["size"] = size
    return typed


def check_device_create(dest: str, fmt: str, typed: Dict[str, Any], context: str = "") -> None:
    """What qemu-img's "create" of a host device allows (block/file-posix.c): the device keeps its
    size and its blocks, so no preallocation; vdisk writes raw only (the format drivers grow files).
    *context* starts the preallocation message as qemu-img starts it (convert's "error while ...")."""
    if fmt != "raw":
        raise UnsupportedFeature("image format %s cannot be written onto a block device; vdisk writes only raw "
                                 "data onto a block device" % fmt, path=dest, field="format")
    mode = typed.get("preallocation") or "off"
    if mode != "off":
        raise InvalidOption("%sUnsupported preallocation mode '%s'" % (context, mode), path=dest,
                            field="preallocation")


def _create_on_device(path: str, fmt: str, size: int, typed: Dict[str, Any], policy: Policy) -> None:
    """``create -f raw DEVICE SIZE`` as qemu-img does it (block.c bdrv_create_file_fallback): the
    device must hold SIZE, and its first sector is zeroed so that no old image header is probed
    again; the rest is left as it is.  Under the device's locks: a device a VM uses is refused."""
    check_device_create(path, fmt, typed)
    image = open_image(path, "raw", writable=True, policy=policy, backing=False, replacing=True)
    try:
        if size > image.virtual_size:
            raise ImageError("Cannot grow device files", path=path, field="size")
        first = min(512, image.virtual_size)
        if first:
            image.write(0, bytes(first))
        image.flush()
    finally:
        close_chain(image)


def _open_backing(path: str, backing: str, fmt: Optional[str], policy: Optional[Policy]) -> Image:
    """The backing file *backing* of a new image at *path*, opened with its chain through ``open_image``.

    The name is taken relative to the new image's directory as qemu-img takes it (``sub/v.qcow2 -b
    base.qcow2`` opens ``sub/base.qcow2``); the user named it, so its directory is allowed
    (``Policy.with_root``) and the files it names are held to the policy from there.  Opened
    read-only and without image locks (qemu-img's force-share): a running VM's base is usable."""
    display = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(path), backing)
    try:
        # never a device: only the image the command creates may be one
        return open_image(display, fmt, policy=(policy or Policy()).replace(force_share=True, block_devices=False))
    except ImageError as exc:
        # qemu-img: "v.qcow2: Could not open 'nope.qcow2': No such file or directory"
        why = exc.message if exc.path is None or (exc.path == display and display in exc.message) else str(exc)
        raise exc.__class__(why, path=path, field="backing_file") from None


def _detected_format(base: Image, backing: str, path: str) -> str:
    """The format *base* was probed as, refusing a file that two formats claim equally."""
    host = getattr(base, "host", None)
    if host is not None:
        header = host.pread(min(PROBE_BYTES, host.size()), 0)
        scores = probe_scores(header, base.path)
        if len(scores) > 1 and scores[0][0] == scores[1][0]:
            raise ImageError("backing file '%s' could be %s or %s; name its format with -F"
                             % (backing, scores[0][1], scores[1][1]), path=path, field="backing_fmt")
    return base.driver.name


def _create_reserved(driver, path: str, size: int, typed: Dict[str, Any], notes: Optional[List[str]]) -> None:
    """``preallocation=falloc`` on an overlay: qemu-img refuses it, because preallocated clusters would
    hide the backing file.  The intent, host space held for the overlay's future data, is met by
    reserving the fully allocated size past the end of the file (fallocate KEEP_SIZE) with no cluster
    mapped; where the host cannot, by extended L2 entries whose subclusters stay unallocated."""
    try:
        fully = driver.measure(size, {k: v for k, v in typed.items()
                                      if k not in ("backing_file", "backing_fmt", "preallocation")})["fully-allocated"]
    except UnsupportedFeature:
        fully = size
    driver.create(path, size, dict(typed, preallocation="off"))
    with HostFile(path, writable=True) as host:
        reserved = host.reserve(0, fully)
    if reserved:
        note = ("preallocation=falloc with a backing file: reserved %d bytes of host space for the overlay's "
                "data without mapping clusters, so the backing file stays visible" % fully)
    elif "extended_l2" in {o.name for o in driver.create_options}:
        driver.create(path, size, dict(typed, extended_l2=True))
        typed["extended_l2"] = True
        note = ("preallocation=falloc with a backing file: the host cannot reserve space beyond the end of a "
                "file, so the clusters are preallocated with extended L2 entries whose subclusters stay "
                "unallocated (the backing file stays visible)")
    else:
        raise InvalidOption("Backing file and preallocation can only be used at the same time if extended_l2 "
                            "is on", path=path, field="preallocation")
    if notes is not None:
        notes.append(note)


def describe(path: str, fmt: str, used: Dict[str, Any]) -> str:
    """qemu-img's "Formatting ..." line."""
    parts = ["fmt=%s" % fmt]
    for name in sorted(k for k in used if k != "size" and used[k] is not None):
        value = used[name]
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append("%s=%s" % (name, value))
    parts.append("size=%d" % used["size"])
    return "Formatting '%s', %s" % (path, " ".join(parts))
