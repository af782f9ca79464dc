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
# Every number a user gives (sizes, numeric options) is parsed here or in parse_int: a number
# with more significant digits than this is too large for any field (2**64 has 20), so it is
# refused before int() sees it -- int() of a long decimal string is quadratic, and over Python's
# 4300-digit limit it raises ValueError instead of a one-line error naming the field.
MAX_DIGITS = 32
# digits of a fraction that can change a size: the value is floor(fraction * unit) with unit
# at most 2**60, whose multiples of 2**-60 end within 60 decimal places; later digits never do
_FRACTION_DIGITS = 64


def shown(value) -> str:
    """*value* as an error message shows it: repr, cut short (a 5000-digit number is not echoed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return "a %d-bit number" % value.bit_length()
    text = repr(value)
    length = len(value) if isinstance(value, str) else len(text)
    return text if len(text) <= 40 else "%s...%s (%d characters)" % (text[:24], text[-1], length)


def _too_large(what: str, text) -> InvalidOption:
    return InvalidOption("invalid %s %s: too large; must be between 0 and %d" % (what, shown(text), INT64_MAX),
                         field=what)


def _digits(digits: str, what: str, text) -> str:
    """*digits* without leading zeros, or the "too large" error when more than MAX_DIGITS remain."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > MAX_DIGITS:
        raise _too_large(what, text)
    return significant


def parse_size(text, what: str = "size") -> int:
    """Parse a qemu-img size (``20G``, ``512``, ``1.5T``, ``0x1000``) into bytes."""
    if isinstance(text, bool):
        raise InvalidOption("invalid %s %r" % (what, text), field=what)
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise InvalidOption("invalid %s %s; %s" % (what, shown(text), _HINT), field=what)
        number, suffix = match.groups()
        unit = _SUFFIXES[suffix.upper()]
        if number[:2].lower() == "0x":
            if suffix and unit != 1:
                raise InvalidOption("invalid %s %s: hexadecimal with a suffix" % (what, shown(text)), field=what)
            value = int(_digits(number[2:], what, text), 16)
        elif "." in number:
            if unit == 1:
                raise InvalidOption("invalid %s %s; a fraction needs a suffix. %s" % (what, shown(text), _HINT),
                                    field=what)
            whole, dummy, frac = number.partition(".")
            frac = frac[:_FRACTION_DIGITS]
            # exact integer arithmetic: no float rounding for huge sizes
            value = int(_digits(whole, what, text)) * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        else:
            value = int(_digits(number, what, text)) * unit
    if value < 0 or value > INT64_MAX:
        if value.bit_length() > 128:
            raise _too_large(what, text)
        raise InvalidOption("invalid %s %s: must be between 0 and %d" % (what, shown(text), INT64_MAX), field=what)
    return value


def parse_int(value, what: str) -> int:
    """A numeric option (``refcount_bits=16``, ``0x10``): Python's integer literals, at most MAX_DIGITS digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 64:
            raise InvalidOption("invalid value %s for %s: too large" % (shown(value), what), field=what)
        return value
    text = str(value).strip()
    body = text.lstrip("+-")
    if body[:2].lower() in ("0x", "0o", "0b"):
        body = body[2:]
    if len(body.replace("_", "").lstrip("0")) > MAX_DIGITS:
        raise InvalidOption("invalid value %s for %s: too large" % (shown(text), what), field=what)
    try:
        return int(text, 0)
    except ValueError:
        raise InvalidOption("invalid value %s for %s: expected a number" % (shown(value), what),
                            field=what) from None


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
