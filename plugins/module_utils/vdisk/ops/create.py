"""qemu-img create: options, size rules, backing files."""
import os
from typing import Any, Dict, List, Optional

from ..driver import Policy
from ..errors import ImageError, InvalidOption, UnsupportedFeature
from ..io import HostFile
from ..registry import PROBE_BYTES, get_driver, probe_scores
from ..units import round_up
from .chain import close_chain, open_image


def create(path: str, fmt: str, size: Optional[int], options: Dict[str, Any],
           backing_file: Optional[str] = None, backing_fmt: Optional[str] = None,
           policy: Optional[Policy] = None, notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """Create an image as ``qemu-img create`` does; returns the options actually used.

    *options* are raw ``-o`` values; ``-b``/``-F`` may come as arguments or options.
    A backing file named by the user is opened (inside its own directory) to take its
    size when none is given and, when no format is given, to detect and record its
    format, so it is never probed again; *notes* receives a line saying so.
    """
    driver = get_driver(fmt)
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
        full = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(os.path.abspath(path)), backing)
        if not os.path.exists(full):
            if size is None:
                raise ImageError("Could not open backing file '%s': No such file or directory" % full, path=path,
                                 field="backing_file")
        else:
            if not typed.get("backing_fmt"):
                detected = _detect_format(full, path)
                typed["backing_fmt"] = detected
                if notes is not None:
                    notes.append("backing file '%s' detected as %s; recorded as its backing format"
                                 % (backing, detected))
            if size is None:
                base_policy = Policy(allowed_dirs=tuple((policy or Policy()).allowed_dirs) +
                                     (os.path.dirname(os.path.realpath(full)),),
                                     lock=(policy or Policy()).lock)
                base = open_image(full, typed["backing_fmt"], policy=base_policy)
                try:
                    size = base.virtual_size
                finally:
                    close_chain(base)
    if size is None:
        raise InvalidOption("Image creation needs a size parameter", path=path, field="size")
    size = round_up(size, 512)
    if backing and typed.get("preallocation") == "falloc" and not typed.get("extended_l2"):
        _create_reserved(driver, path, size, typed, notes)
    else:
        driver.create(path, size, typed)
    typed["size"] = size
    return typed


def _detect_format(full: str, path: str) -> str:
    """The backing file's format by probing, refusing a file that two formats claim equally."""
    with HostFile(full) as f:       # refuses FIFOs and devices without blocking on them
        header = f.pread(min(PROBE_BYTES, f.size()), 0)
    scores = probe_scores(header, full)
    if len(scores) > 1 and scores[0][0] == scores[1][0]:
        raise ImageError("backing file '%s' could be %s or %s; name its format with -F"
                         % (full, scores[0][1], scores[1][1]), path=path, field="backing_fmt")
    return scores[0][1] if scores else "raw"


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
