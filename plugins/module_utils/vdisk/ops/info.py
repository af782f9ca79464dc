"""qemu-img info: the ImageInfo dictionary (qemu-img's JSON keys) and its human rendering."""
import json
import os
import time
from typing import Any, Dict, List

from ..driver import Image
from ..units import format_size


def image_info(image: Image) -> Dict[str, Any]:
    """ImageInfo of one open layer, keys as ``qemu-img info --output=json`` prints them."""
    info: Dict[str, Any] = {"filename": image.path, "format": image.driver.name,
                            "virtual-size": image.virtual_size}
    host = getattr(image, "host", None)
    if host is not None:
        info["actual-size"] = host.allocated_bytes()
    if image.dirty is not None:     # None: the format has no dirty flag to show (parallels)
        info["dirty-flag"] = bool(image.dirty)
    info.update(image.info())
    if image.backing_filename:
        info["backing-filename"] = image.backing_filename
        info["full-backing-filename"] = full_backing_name(image.path, image.backing_filename)
        if image.backing_format:
            info["backing-filename-format"] = image.backing_format
    if image.encrypted:
        info["encrypted"] = True
    return info


def full_backing_name(image_path: str, backing: str) -> str:
    """The backing file's path as qemu-img resolves it: relative to the directory of the image path."""
    if os.path.isabs(backing):
        return backing
    directory = os.path.dirname(image_path)
    return os.path.join(directory, backing) if directory else backing


def chain_info(image: Image) -> List[Dict[str, Any]]:
    """ImageInfo of every layer, top first (``--backing-chain``)."""
    out = []
    while image is not None:
        out.append(image_info(image))
        image = image.backing
    return out


def render_json(value: Any) -> str:
    return json.dumps(value, indent=4)


def render_snapshot_table(snapshots: List[Dict[str, Any]]) -> List[str]:
    """The snapshot table as qemu-img prints it (``snapshot -l`` and ``info``)."""
    lines = ["%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60, s["vm-clock-nsec"] // 1000000)
        icount = "" if s.get("icount") is None else str(s["icount"])
        lines.append("%-9s %-16s %8s%20s%13s%11s" % (s["id"], s["name"], format_size(s["vm-state-size"]), date,
                                                     clock, icount))
    return lines


_SPECIFIC_NAMES = {"compression-type": "compression type", "lazy-refcounts": "lazy refcounts",
                   "refcount-bits": "refcount bits", "extended-l2": "extended l2", "data-file": "data file",
                   "data-file-raw": "data file raw", "create-type": "create type", "parent-cid": "parent cid"}


def _specific_lines(data: Dict[str, Any], indent: str) -> List[str]:
    """QEMU's dump of a QAPI object: ``key: value``, nested objects and lists indented by four
    spaces under ``key:``, list items as ``[i]:``."""
    lines: List[str] = []
    for key, value in data.items():
        _dump_value(lines, "%s%s:" % (indent, _SPECIFIC_NAMES.get(key, key.replace("-", " "))), value, indent)
    return lines


def _dump_value(lines: List[str], label: str, value: Any, indent: str) -> None:
    inner = indent + "    "
    if isinstance(value, dict):
        lines.append(label)
        lines.extend(_specific_lines(value, inner))
    elif isinstance(value, list):
        lines.append(label)
        for i, item in enumerate(value):
            _dump_value(lines, "%s[%d]:" % (inner, i), item, inner)
    else:
        if isinstance(value, bool):
            value = "true" if value else "false"
        lines.append("%s %s" % (label, value))


def render_human(info: Dict[str, Any]) -> str:
    """One image's ``qemu-img info`` text."""
    lines = ["image: %s" % info["filename"], "file format: %s" % info["format"],
             "virtual size: %s (%d bytes)" % (format_size(info["virtual-size"]), info["virtual-size"])]
    if "actual-size" in info:
        lines.append("disk size: %s" % format_size(info["actual-size"]))
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append("cluster_size: %d" % info["cluster-size"])
    if "backing-filename" in info:
        name, full = info["backing-filename"], info.get("full-backing-filename", info["backing-filename"])
        lines.append("backing file: %s" % name if name == full else
                     "backing file: %s (actual path: %s)" % (name, full))
        if "backing-filename-format" in info:
            lines.append("backing file format: %s" % info["backing-filename-format"])
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.extend(render_snapshot_table(info["snapshots"]))
    specific = info.get("format-specific")
    if specific and specific.get("data"):
        lines.append("Format specific information:")
        lines.extend(_specific_lines(specific["data"], "    "))
    return "\n".join(lines)
