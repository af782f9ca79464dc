"""On-disk structures declared once: one line per field gives its name (the spec's), its Python
type, its struct code and its default; the dataclass, ``pack``/``unpack``, the field offsets that
partial writes use, the range checks and a debug dump are all derived from that table.

A structure is a dataclass that inherits :class:`Record`, is decorated with :func:`record`, and
declares its on-disk fields in on-disk order with :func:`disk`::

    @record("<")
    class Header(Record):
        signature: int = disk("I", 0xBEDA107F, shown="hex")
        version: int = disk("I", 0x00010001, shown="hex")
        description: bytes = disk("256s", b"", shown="text")
        blocks: List[int] = extra(default_factory=list)     # not on disk

Then ``Header.SIZE``, ``Header.unpack(buf)``, ``h.pack()``, ``Header.offset("version")``,
``h.pack_fields("version", "description")`` (bytes and offset of a run of fields, for
``pwrite(*...)``) and ``h.dump()`` exist.  In the style of QEMU's scripts/qcow2_format.py
and CPython's zipfile structures, without a metaclass.
"""
import dataclasses
import struct
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar

from .errors import ImageError

# Linters do not see that ``record`` makes a dataclass: they would take each field's class-level
# value for a ``dataclasses.Field`` (and refuse ``field()`` outside a dataclass).  Reached through
# vars(), the field factory is opaque to them, so they go by the annotations.
_make_field = vars(dataclasses)["field"]

CODE = "vdisk.code"          # dataclass field metadata: the field's struct code
SHOWN = "vdisk.shown"        # how the dump shows it: "hex", "text" (bytes as text) or "" (as is)

R = TypeVar("R", bound="Record")


def disk(code: str, default: Any = None, shown: str = "") -> Any:
    """An on-disk field: its struct code (``"I"``, ``"Q"``, ``"16s"``...) and its default (zero, or
    zero bytes for a string code, when None)."""
    if default is None:
        default = bytes(struct.calcsize("<" + code)) if code.endswith("s") else 0
    return _make_field(default=default, metadata={CODE: code, SHOWN: shown})


def extra(**kwargs: Any) -> Any:
    """A field of a record that is not on disk (``extra(default_factory=list)``): ``dataclasses.field``."""
    return _make_field(**kwargs)


class Layout:
    """Where each on-disk field of a structure lies: derived once from its field table."""

    def __init__(self, byte_order: str, table: List[Tuple[str, str, str]]):
        self.byte_order = byte_order
        self.names = [name for name, code, shown in table]
        self.codes = {name: code for name, code, shown in table}
        self.shown = {name: shown for name, code, shown in table}
        self.struct = struct.Struct(byte_order + "".join(code for name, code, shown in table))
        self.offsets: Dict[str, int] = {}
        self.structs: Dict[str, struct.Struct] = {}
        position = 0
        for name, code, shown in table:
            one = struct.Struct(byte_order + code)
            self.offsets[name] = position
            self.structs[name] = one
            position += one.size
        if position != self.struct.size:
            raise ValueError("padding between fields: declare it as a bytes field")
        self.bounds = {name: _int_bounds(code) for name, code, shown in table}


def _int_bounds(code: str) -> Optional[Tuple[int, int]]:
    kind = code[-1]
    if kind not in "bBhHiIlLqQ" or code[:-1]:
        return None
    bits = 8 * struct.calcsize("<" + kind)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if kind.islower() else (0, (1 << bits) - 1)


def record(byte_order: str):
    """Class decorator: make the class a dataclass and derive its :class:`Layout` from the fields
    declared with :func:`disk` (in declaration order, which must be the on-disk order)."""
    def decorate(cls: Type[R]) -> Type[R]:
        # eq and repr come from Record: each method dataclasses generates is compiled anew for
        # every class, and start-up pays for all the structures a command imports
        cls = dataclasses.dataclass(cls, eq=False, repr=False)
        fields = dataclasses.fields(cls)
        table = [(f.name, f.metadata[CODE], f.metadata.get(SHOWN, "")) for f in fields if CODE in f.metadata]
        cls.EQ_FIELDS = tuple(f.name for f in fields if f.compare)
        cls.REPR_FIELDS = tuple(f.name for f in fields if f.repr)
        cls.LAYOUT = Layout(byte_order, table)
        cls.SIZE = cls.LAYOUT.struct.size
        return cls
    return decorate


class Record:
    """Base of a declared structure: pack, unpack, offsets, checks and dump from its ``LAYOUT``."""
    LAYOUT: ClassVar[Layout]
    SIZE: ClassVar[int]
    EQ_FIELDS: ClassVar[Tuple[str, ...]]     # the fields == compares (a dataclass's compare=True)
    REPR_FIELDS: ClassVar[Tuple[str, ...]]  # the fields repr() shows

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.EQ_FIELDS)

    __hash__ = None     # mutable, as a dataclass with eq: not hashable

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__qualname__,
                           ", ".join("%s=%r" % (name, getattr(self, name)) for name in self.REPR_FIELDS))

    @classmethod
    def unpack(cls: Type[R], buf: bytes, offset: int = 0, **extra: Any) -> R:
        """The structure stored at *offset* of *buf* (its other fields: *extra* or their defaults)."""
        values = cls.LAYOUT.struct.unpack_from(buf, offset)
        return cls(**dict(zip(cls.LAYOUT.names, values)), **extra)

    @classmethod
    def offset(cls, name: str) -> int:
        """Where field *name* starts, from the start of the structure."""
        return cls.LAYOUT.offsets[name]

    def pack(self) -> bytes:
        """The whole structure as stored; a value that does not fit its field is an ImageError
        naming the field (never struct.error)."""
        layout = self.LAYOUT
        return layout.struct.pack(*(self._checked(name) for name in layout.names))

    def pack_fields(self, first: str, *rest: str) -> Tuple[bytes, int]:
        """``(bytes, offset)`` of a run of adjacent fields, for a partial write:
        ``host.pwrite(*header.pack_fields("l1_size", "l1_table_offset"))``."""
        layout = self.LAYOUT
        names = (first,) + rest
        start = layout.names.index(first)
        if list(names) != layout.names[start:start + len(names)]:
            raise ValueError("fields %s are not adjacent in %s" % (", ".join(names), type(self).__name__))
        data = b"".join(layout.structs[name].pack(self._checked(name)) for name in names)
        return data, layout.offsets[first]

    def _checked(self, name: str) -> Any:
        value = getattr(self, name)
        bounds = self.LAYOUT.bounds[name]
        if bounds is not None and not (isinstance(value, int) and bounds[0] <= value <= bounds[1]):
            raise ImageError("%s.%s = %r does not fit its %d-byte field" % (
                type(self).__name__, name, value, self.LAYOUT.structs[name].size), field=name)
        return value

    def dump(self, base: int = 0) -> List[str]:
        """One line per on-disk field: its file offset (the structure starts at *base*), its name
        and its value, as ``vdisk inspect --dump`` shows them."""
        layout = self.LAYOUT
        lines = []
        for name in layout.names:
            where = "0x%x" % (base + layout.offsets[name])
            lines.append("%-10s %-24s %s" % (where, name, _shown(getattr(self, name), layout.shown[name])))
        return lines


def _shown(value: Any, shown: str) -> str:
    if isinstance(value, int):
        return "0x%x" % value if shown == "hex" else str(value)
    if isinstance(value, bytes):
        if shown == "text":
            return repr(value.rstrip(b"\0").decode("utf-8", "replace"))
        stripped = value.rstrip(b"\0")
        if not stripped:
            return "0 x %d bytes" % len(value)
        text = stripped.hex()
        return text if len(text) <= 64 else text[:64] + "... (%d bytes)" % len(value)
    return repr(value)
