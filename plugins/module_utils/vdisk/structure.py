"""On-disk structures declared once: one line per field gives its name (the spec's), its Python
type, its struct code and its default; the ``__init__``, ``pack``/``unpack``, the field offsets that
partial writes use, the range checks and a debug dump are all derived from that table.

A structure is a class that inherits :class:`Record`, is decorated with :func:`record`, and
declares its on-disk fields in on-disk order with :func:`disk`::

    @record("<")
    class Header(Record):
        signature: int = disk("I", 0xBEDA107F, shown="hex")
        version: int = disk("I", 0x00010001, shown="hex")
        description: bytes = disk("256s", b"", shown="text")
        blocks: List[int] = extra(default_factory=list)     # not on disk

Then ``Header(version=...)``, ``h.replace(version=...)``, ``==``, ``repr()``, ``Header.SIZE``,
``Header.unpack(buf)``, ``h.pack()``, ``Header.offset("version")``,
``h.pack_fields("version", "description")`` (bytes and offset of a run of fields, for
``pwrite(*...)``) and ``h.dump()`` exist.  In the style of QEMU's scripts/qcow2_format.py
and CPython's zipfile structures, without a metaclass.
"""
import struct
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar

from .errors import ImageError

R = TypeVar("R", bound="Record")
_NO_DEFAULT = object()
_FACTORY = object()          # the generated __init__'s default for a field with a default factory


class Field:
    """One field of a record, in declaration order: its default or default factory, and for an
    on-disk field its struct code and how the dump shows it (``code`` None: not on disk).  As
    ``dataclasses.field``'s: *compare* (``==`` looks at it) and *repr* (``repr()`` shows it)."""
    __slots__ = ("name", "default", "factory", "code", "shown", "compare", "repr")

    def __init__(self, default: Any = _NO_DEFAULT, factory: Optional[Callable[[], Any]] = None,
                 code: Optional[str] = None, shown: str = "", compare: bool = True, repr: bool = True):
        # pylint: disable=redefined-builtin      # dataclasses.field's keyword names
        self.name = ""
        self.default, self.factory = default, factory
        self.code, self.shown = code, shown
        self.compare, self.repr = compare, repr


# Linters do not see that ``record`` turns a field's class-level value into its default: they would
# take ``Header.version`` for a Field (and refuse it in arithmetic and %d).  Reached through
# globals(), the field factory is opaque to them, so they go by the annotations.
_make_field = globals()["Field"]


def disk(code: str, default: Any = None, shown: str = "") -> Any:
    """An on-disk field: its struct code (``"I"``, ``"Q"``, ``"16s"``...) and its default (zero, or
    zero bytes for a string code, when None)."""
    if default is None:
        default = bytes(struct.calcsize("<" + code)) if code.endswith("s") else 0
    return _make_field(default, code=code, shown=shown)


def extra(default: Any = _NO_DEFAULT, default_factory: Optional[Callable[[], Any]] = None, compare: bool = True,
          repr: bool = True) -> Any:
    """A field of a record that is not on disk (``extra(default_factory=list)``), with
    ``dataclasses.field``'s keywords.  A field with a plain default needs no ``extra``."""
    # pylint: disable=redefined-builtin
    return _make_field(default, default_factory, compare=compare, repr=repr)


def _is_class_var(annotation: Any) -> bool:
    return annotation is ClassVar or getattr(annotation, "__origin__", None) is ClassVar or \
        (isinstance(annotation, str) and annotation.startswith(("ClassVar", "typing.ClassVar")))


def _declared_fields(cls: type) -> List[Field]:
    """The fields of the base record first (a field declared again keeps its place), then the
    class's own annotated attributes in declaration order."""
    fields: Dict[str, Field] = {f.name: f for f in getattr(cls, "FIELDS", ())}
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        if _is_class_var(annotation):
            continue
        value = cls.__dict__.get(name, _NO_DEFAULT)
        spec = value if isinstance(value, Field) else Field(value)
        spec.name = name
        fields[name] = spec
    return list(fields.values())


def _make_init(cls: type, fields: List[Field]) -> None:
    """``__init__(self, field=default, ...)`` compiled once for the class, as dataclasses makes it:
    every field a parameter in declaration order, a default factory called per instance."""
    namespace: Dict[str, Any] = {"_FACTORY": _FACTORY}
    params, body = [], []
    seen_default = False
    for i, f in enumerate(fields):
        if f.factory is not None:
            namespace["_f%d" % i] = f.factory
            params.append("%s=_FACTORY" % f.name)
            body.append("    self.%s = _f%d() if %s is _FACTORY else %s" % (f.name, i, f.name, f.name))
            seen_default = True
            continue
        if f.default is _NO_DEFAULT:
            if seen_default:
                raise TypeError("%s: field %s without a default follows one with a default" % (cls.__name__, f.name))
            params.append(f.name)
        else:
            namespace["_d%d" % i] = f.default
            params.append("%s=_d%d" % (f.name, i))
            seen_default = True
        body.append("    self.%s = %s" % (f.name, f.name))
    source = "def __init__(self%s):\n%s\n" % ("".join(", " + p for p in params), "\n".join(body) or "    pass")
    exec(source, namespace)  # pylint: disable=exec-used      # the source is built from field names only
    init = namespace["__init__"]
    init.__qualname__ = cls.__qualname__ + ".__init__"
    cls.__init__ = init


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
    """Class decorator: give the class its fields (:func:`disk`, :func:`extra` or a plain default),
    an ``__init__`` taking them, and the :class:`Layout` of the fields declared with :func:`disk`
    (in declaration order, which must be the on-disk order).

    Not ``dataclasses.dataclass``: that compiles several methods per class, and start-up paid
    for every structure a command imports (and for importing dataclasses and inspect)."""
    def decorate(cls: Type[R]) -> Type[R]:
        fields = _declared_fields(cls)
        for f in fields:
            if f.name in cls.__dict__:
                if f.factory is not None or f.default is _NO_DEFAULT:
                    delattr(cls, f.name)
                else:
                    setattr(cls, f.name, f.default)     # the class attribute is the default, as in a dataclass
        _make_init(cls, fields)
        cls.FIELDS = tuple(fields)
        cls.EQ_FIELDS = tuple(f.name for f in fields if f.compare)
        cls.REPR_FIELDS = tuple(f.name for f in fields if f.repr)
        cls.LAYOUT = Layout(byte_order, [(f.name, f.code, f.shown) for f in fields if f.code is not None])
        cls.SIZE = cls.LAYOUT.struct.size
        return cls
    return decorate


class Record:
    """Base of a declared structure: pack, unpack, offsets, checks and dump from its ``LAYOUT``."""
    LAYOUT: ClassVar[Layout]
    SIZE: ClassVar[int]
    FIELDS: ClassVar[Tuple[Field, ...]] = ()    # every field, in declaration order
    EQ_FIELDS: ClassVar[Tuple[str, ...]]     # the fields == compares
    REPR_FIELDS: ClassVar[Tuple[str, ...]]  # the fields repr() shows

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.EQ_FIELDS)

    __hash__ = None     # mutable and compared by value: not hashable

    def replace(self: R, **changes: Any) -> R:
        """A copy with *changes* (``dataclasses.replace``)."""
        values = {f.name: getattr(self, f.name) for f in self.FIELDS}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError("%s has no field %s" % (type(self).__name__, ", ".join(sorted(unknown))))
        values.update(changes)
        return type(self)(**values)

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """Each field's declared default (a default factory is called)."""
        return {f.name: f.factory() if f.factory is not None else f.default for f in cls.FIELDS}

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
