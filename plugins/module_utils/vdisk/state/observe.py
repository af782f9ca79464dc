"""What an image on disk actually is: format, size, create options, backing file, snapshots.

Read with the engine, read-only and without opening the backing chain, so observing never
depends on other files and never changes anything.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..driver import Policy
from ..errors import ImageError
from ..ops.chain import close_chain, open_image
from ..ops.info import image_info
from ..registry import get_driver, probe_file
from .encryption import observed_encryption


@dataclass
class ObservedImage:
    """The observable state of the file at ``path``; ``exists`` False means there is no file."""
    path: str
    exists: bool = False
    format: Optional[str] = None
    virtual_size: Optional[int] = None
    options: Dict[str, Any] = field(default_factory=dict)   # create options whose value the image shows
    backing_file: Optional[str] = None
    backing_format: Optional[str] = None
    snapshots: List[Dict[str, Any]] = field(default_factory=list)   # qemu-img's SnapshotInfo dicts
    info: Dict[str, Any] = field(default_factory=dict)              # `vdisk info --output=json`
    encryption: Optional[Dict[str, Any]] = None     # state.encryption.observed_encryption: None when plain

    @property
    def snapshot_names(self) -> List[str]:
        """Names of the internal snapshots, in table order."""
        return [s["name"] for s in self.snapshots]


def observe(path: str, fmt: Optional[str] = None, policy: Optional[Policy] = None) -> ObservedImage:
    """Read the image at *path* (format *fmt*, probed when None); a missing file is ``exists=False``.

    Anything at *path* that is not a regular file is an error: it is never treated as absent.
    """
    if not os.path.lexists(path):
        return ObservedImage(path=path)
    if os.path.islink(path) or not os.path.isfile(path):
        raise ImageError("exists and is not a regular file", path=path)
    if fmt is None:
        fmt = probe_file(path)
    image = open_image(path, fmt, writable=False, policy=policy, backing=False)
    try:
        info = image_info(image)
        cluster_size = image.cluster_size
    finally:
        close_chain(image)
    return from_info(path, info, cluster_size)


def from_info(path: str, info: Dict[str, Any], cluster_size: Optional[int] = None) -> ObservedImage:
    """An :class:`ObservedImage` from an info dict (qemu-img's JSON keys)."""
    fmt = info["format"]
    return ObservedImage(path=path, exists=True, format=fmt, virtual_size=info["virtual-size"],
                         options=observed_options(fmt, info, cluster_size),
                         backing_file=info.get("backing-filename"),
                         backing_format=info.get("backing-filename-format"),
                         snapshots=list(info.get("snapshots") or []), info=info,
                         encryption=observed_encryption(info))


def observed_options(fmt: str, info: Dict[str, Any], cluster_size: Optional[int] = None) -> Dict[str, Any]:
    """The create options of format *fmt* whose values *info* shows, typed as the driver types them.

    An option ``a_b`` is shown as ``a-b`` in info or in its ``format-specific`` data (qemu-img's
    names); options an image does not record (preallocation...) are left out.
    """
    driver = get_driver(fmt)
    specific = (info.get("format-specific") or {}).get("data") or {}
    out: Dict[str, Any] = {}
    for spec in driver.create_options:
        if spec.name in ("size", "backing_file", "backing_fmt", "preallocation"):
            continue
        key = spec.name.replace("_", "-")
        if key in info:
            value = info[key]
        elif key in specific:
            value = specific[key]
        elif spec.name == "cluster_size" and cluster_size:
            value = cluster_size
        elif spec.unshown is not None:
            value = spec.unshown
        else:
            continue
        out[spec.name] = spec.canonical(value)
    return out


def normalize_option(fmt: str, name: str, value: Any) -> Any:
    """One spelling per value of option *name* of format *fmt* (``OptionSpec.canonical``), so desired
    and observed options compare equal when they mean the same."""
    try:
        spec = get_driver(fmt).option(name)
    except ImageError:
        return value
    return spec.canonical(value)
