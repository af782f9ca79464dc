"""qemu-img create: options, size rules, backing files."""
import os
from typing import Any, Dict, List, Optional

from ..driver import Policy
from ..errors import ImageError, InvalidOption
from ..registry import get_driver, probe_file
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
                detected = probe_file(full)
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
    driver.create(path, size, typed)
    typed["size"] = size
    return typed


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
