"""qemu-img measure: how many bytes a new image needs, for a size or for converting an image.

Written once against the Driver interface: the target format's :meth:`Driver.measure` does
the arithmetic; this module checks the arguments in qemu-img's order, types the ``-o``
options with qemu's messages, and describes the source image (its length, the clusters
that hold data through its backing chain, its persistent bitmaps).
"""
import json
import re
from typing import Any, Dict, Optional

from ..driver import MeasureSource, Policy
from ..errors import InvalidOption
from ..registry import get_driver
from ..units import MAX_DIGITS, parse_size, shown
from .chain import close_chain, open_image
from .convert import parse_snapshot_param
from .status import allocated_bytes, guest_length

# create options of QEMU's file protocol layer: every file-based target format accepts them
FILE_OPTIONS = {"nocow": "bool", "extent_size_hint": "size"}
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
UINT64_MAX = (1 << 64) - 1
_NUMBER_RE = re.compile(r"^\s*(?:0[xX]([0-9a-fA-F]+)|0([0-7]+)|([0-9]+))$")


def measure(out_fmt: str = "raw", options: Optional[Dict[str, str]] = None, size: Optional[int] = None,
            path: Optional[str] = None, fmt: Optional[str] = None, snapshot: Optional[str] = None,
            policy: Optional[Policy] = None) -> Dict[str, int]:
    """The sizes ``qemu-img measure`` prints: ``required``, ``fully-allocated`` and maybe ``bitmaps``.

    Give either *size* (``--size``) or *path* (an image, format *fmt* or probed, shown at
    internal snapshot *snapshot* if given).  *options* are the ``-o`` options as strings.
    """
    if path is None and (fmt is not None or snapshot is not None):
        raise InvalidOption("--image-opts, -f, and -l require a filename argument.", field="-f")
    if path is not None and size is not None:
        raise InvalidOption("--size N cannot be used together with a filename.", field="--size")
    if path is None and size is None:
        raise InvalidOption("Either --size N or one filename must be specified.", field="--size")
    image = None
    try:
        if path is not None:
            image = open_image(path, fmt, writable=False, policy=policy)
            if snapshot is not None:
                image.select_snapshot(*parse_snapshot_param(snapshot))
        driver = get_driver(out_fmt)
        typed = parse_measure_options(driver, options or {})
        option_size = typed.pop("size", None)
        if size is not None:
            option_size = size      # --size wins over -o size
        source = None
        if image is not None:
            source = _describe(image)
        return driver.measure(option_size, typed, source)
    finally:
        close_chain(image)


def _describe(image) -> MeasureSource:
    def allocated(cluster_size: int) -> int:
        return allocated_bytes(image, cluster_size)
    return MeasureSource(guest_length(image), allocated, image.driver.persistent_bitmaps(image))


def parse_measure_options(driver, options: Dict[str, str]) -> Dict[str, Any]:
    """Type ``-o`` values as QEMU's option parser does (sizes, numbers, on/off), with its messages.

    Enumerations and strings stay text: each format checks those itself, as QEMU does, and
    some (raw's preallocation) are not checked by measure at all.
    """
    typed: Dict[str, Any] = {}
    for name, value in options.items():
        kind = FILE_OPTIONS.get(name)
        if kind is None:
            kind = driver.option(name).type     # unknown names: "Invalid parameter 'NAME'"
        typed[name] = _typed(name, kind, value)
    return typed


def _typed(name: str, kind: str, value: str) -> Any:
    if kind == "size":
        try:
            return parse_size(value, name)
        except InvalidOption:
            raise InvalidOption("Parameter '%s' expects a non-negative number below 2^64 (optional suffix k, M, "
                                "G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes)" % name,
                                field=name) from None
    if kind == "bool":
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise InvalidOption("Parameter '%s' expects 'on' or 'off'" % name, field=name)
    if kind == "int":
        number = _c_number(value)
        if number is None:
            raise InvalidOption("Parameter '%s' expects a number" % name, field=name)
        if number > UINT64_MAX:
            raise InvalidOption("Value %s is too large for parameter '%s'" % (shown(value), name), field=name)
        return number
    return value


def _c_number(text: str) -> Optional[int]:
    """An unsigned number as C's strtoull with base 0 reads it: decimal, 0x hex, 0 octal (one
    longer than MAX_DIGITS significant digits reads as 2**64, over every limit, as strtoull's ERANGE)."""
    match = _NUMBER_RE.match(text)
    if not match:
        return None
    if len("".join(d for d in match.groups() if d).lstrip("0")) > MAX_DIGITS:
        return UINT64_MAX + 1
    hex_digits, octal_digits, decimal = match.groups()
    if hex_digits is not None:
        return int(hex_digits, 16)
    if octal_digits is not None:
        return int(octal_digits, 8)
    return int(decimal, 10)


def render_human(result: Dict[str, int]) -> str:
    """qemu-img's text: required, fully allocated, and the bitmaps line when there is one."""
    lines = ["required size: %d" % result["required"], "fully allocated size: %d" % result["fully-allocated"]]
    if "bitmaps" in result:
        lines.append("bitmaps size: %d" % result["bitmaps"])
    return "\n".join(lines)


def render_json(result: Dict[str, int]) -> str:
    """qemu-img's JSON (BlockMeasureInfo), indented by four spaces."""
    return json.dumps(result, indent=4)
