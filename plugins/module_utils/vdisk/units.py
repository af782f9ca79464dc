"""Sizes as qemu-img reads and prints them.

qemu-img takes binary suffixes (k/K=1024 ... E), an optional ``b``/``B`` meaning
bytes, hexadecimal integers, and decimal fractions only together with a suffix
(``1.5G``; a fraction of a byte is truncated).  It prints sizes with three
significant digits and IEC units (``196 KiB``, ``20 GiB``).
"""
import math
import re
from typing import Tuple

from .errors import InvalidOption

KiB = 1024
MiB = KiB * 1024
GiB = MiB * 1024
TiB = GiB * 1024
SECTOR = 512
INT64_MAX = (1 << 63) - 1

_SUFFIXES = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": TiB * 1024, "E": TiB * 1024 * 1024}
_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?|\.\d+)\s*([bBkKmMgGtTpPeE]?)\s*$")
_HINT = ("Optional suffix k, M, G, T, P or E means kilobytes, megabytes, gigabytes, "
         "terabytes, petabytes and exabytes")


def parse_size(text, what: str = "size") -> int:
    """Parse a qemu-img size (``20G``, ``512``, ``1.5T``, ``0x1000``) into bytes."""
    if isinstance(text, bool):
        raise InvalidOption("invalid %s %r" % (what, text), field=what)
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise InvalidOption("invalid %s %r; %s" % (what, text, _HINT), field=what)
        number, suffix = match.groups()
        unit = _SUFFIXES[suffix.upper()]
        if number[:2].lower() == "0x":
            if suffix and unit != 1:
                raise InvalidOption("invalid %s %r: hexadecimal with a suffix" % (what, text), field=what)
            value = int(number, 16)
        elif "." in number:
            if unit == 1:
                raise InvalidOption("invalid %s %r; a fraction needs a suffix. %s" % (what, text, _HINT),
                                    field=what)
            whole, dummy, frac = number.partition(".")
            # exact integer arithmetic: no float rounding for huge sizes
            value = int(whole or "0") * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        else:
            value = int(number) * unit
    if value < 0 or value > INT64_MAX:
        raise InvalidOption("invalid %s %r: must be between 0 and %d" % (what, text, INT64_MAX), field=what)
    return value


def parse_relative_size(text: str, what: str = "size") -> Tuple[str, int]:
    """Parse ``+5G``/``-1G``/``10G`` into ``(sign, bytes)``; sign is ``'+'``, ``'-'`` or ``''``."""
    text = str(text).strip()
    sign = text[:1] if text[:1] in "+-" else ""
    return sign, parse_size(text[len(sign):], what)


def round_up(value: int, alignment: int) -> int:
    """Round *value* up to a multiple of *alignment*."""
    return -(-value // alignment) * alignment


def format_size(value: int) -> str:
    """qemu's size_to_str(): three significant digits and an IEC unit (``196 KiB``)."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    if value <= 0:
        return "0 B"
    # the exponent of value*1024/1000: switch to the next unit once the integer part reaches 1000
    dummy, exp = math.frexp(value / (1000.0 / 1024.0))
    index = min((exp - 1) // 10, len(suffixes) - 1)
    return "%s %sB" % (_c_g3(value / float(1 << (index * 10))), suffixes[index])


def _c_g3(number: float) -> str:
    """printf's %0.3g (Python's 'g' matches it for the magnitudes used here)."""
    return format(number, ".3g")


def parse_bool(value, what: str) -> bool:
    """Accept qemu's on/off as well as YAML/Ansible style booleans."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "yes", "true", "1"):
        return True
    if text in ("off", "no", "false", "0"):
        return False
    raise InvalidOption("invalid value %r for %s: expected on or off" % (value, what), field=what)
