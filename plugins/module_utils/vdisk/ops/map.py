"""qemu-img map: where each guest range comes from, across the backing chain."""
import json
from typing import Any, Dict, Iterator, List

from ..driver import UNALLOCATED, ZERO, Image
from ..errors import ImageError


def map_entries(image: Image) -> List[Dict[str, Any]]:
    """MapEntry dicts (start, length, depth, present, zero, data, offset) with adjacent equal ranges merged."""
    out: List[Dict[str, Any]] = []
    for entry in _walk(image, 0, image.virtual_size, 0):
        if out and _mergeable(out[-1], entry):
            out[-1]["length"] += entry["length"]
        else:
            out.append(entry)
    return out


def _walk(image: Image, offset: int, length: int, depth: int) -> Iterator[Dict[str, Any]]:
    for ext in image.extents(offset, length):
        if ext.kind == UNALLOCATED and image.backing is not None:
            inside = max(0, min(ext.offset + ext.length, image.backing.virtual_size) - ext.offset)
            if inside:
                yield from _walk(image.backing, ext.offset, inside, depth + 1)
            if inside < ext.length:   # past the end of the backing file: zeros, at this layer's depth
                host = None if ext.host_offset is None else ext.host_offset + inside
                yield _entry(ext.offset + inside, ext.length - inside, depth, False, True, False, host, image)
            continue
        if ext.kind == UNALLOCATED:
            yield _entry(ext.offset, ext.length, depth, False, True, False, ext.host_offset, image)
        elif ext.kind == ZERO:
            yield _entry(ext.offset, ext.length, depth, True, True, False, ext.host_offset, image)
        else:
            yield _entry(ext.offset, ext.length, depth, True, ext.reads_zero, True,
                         None if ext.compressed else ext.host_offset, image)


def _entry(start, length, depth, present, zero, data, offset, image) -> Dict[str, Any]:
    entry = {"start": start, "length": length, "depth": depth, "present": present, "zero": zero, "data": data}
    if offset is not None:
        entry["offset"] = offset
    # the file the offset points into: a qcow2 image's external data file holds its guest data
    entry["_file"] = getattr(image, "data_path", image.path) if offset is not None else image.path
    return entry


def _mergeable(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    if any(a[k] != b[k] for k in ("depth", "present", "zero", "data", "_file")):
        return False
    if ("offset" in a) != ("offset" in b):
        return False
    return "offset" not in a or a["offset"] + a["length"] == b["offset"]


def render_json(entries: List[Dict[str, Any]]) -> str:
    """qemu-img's map JSON: one object per line, keys in its order."""
    lines = []
    for e in entries:
        fields = ['"start": %d' % e["start"], '"length": %d' % e["length"], '"depth": %d' % e["depth"],
                  '"present": %s' % json.dumps(e["present"]), '"zero": %s' % json.dumps(e["zero"]),
                  '"data": %s' % json.dumps(e["data"])]
        if "offset" in e:
            fields.append('"offset": %d' % e["offset"])
        lines.append("{ %s}" % ", ".join(fields))
    return "[" + ",\n".join(lines) + "]"


HIDDEN_DATA = "File contains external, encrypted or compressed clusters."


def render_human(entries: List[Dict[str, Any]]) -> str:
    """Only ranges with data at a known host offset, as qemu-img prints them; data without one
    (compressed or encrypted clusters) is qemu-img's error, raised with the lines printed before
    it (:class:`HiddenData`)."""
    lines = ["%-16s%-16s%-16s%s" % ("Offset", "Length", "Mapped to", "File")]
    for e in entries:
        if e["data"] and "offset" not in e:
            raise HiddenData(HIDDEN_DATA, "\n".join(lines))
        if e["data"]:
            lines.append("%-16s%-16s%-16s%s" % ("%#x" % e["start"] if e["start"] else "0", "%#x" % e["length"],
                                                "%#x" % e["offset"] if e["offset"] else "0", e["_file"]))
    return "\n".join(lines)


class HiddenData(ImageError):
    """qemu-img map's human output stops at data it cannot show a host offset for; ``printed``
    holds what it printed before."""

    def __init__(self, message: str, printed: str):
        super().__init__(message)
        self.printed = printed


def public(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Entries without internal keys (for JSON consumers)."""
    return [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
