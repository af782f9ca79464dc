"""qemu-img bitmap: add, remove, clear, enable, disable and merge the persistent dirty bitmaps
of an image, one or more operations on one bitmap, run in the order given.

References: QEMU docs/tools/qemu-img.rst ("bitmap"); the checks and messages of its QMP
commands (block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge).  As in qemu-img, a
failing operation is reported as ``Operation OP on bitmap NAME failed: WHY`` and the operations
before it are kept.  The format does the work (an image's ``bitmap_editor``); a format without
persistent bitmaps has none, and adding one is refused as qemu-img refuses it.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

from ..driver import Image, Policy
from ..errors import ImageError, UnsupportedFeature
from .chain import close_chain, open_image

OPERATIONS = ("add", "remove", "clear", "enable", "disable", "merge")


@dataclass(frozen=True)
class Operation:
    """One ``--add`` ... ``--merge SOURCE`` of the command line."""
    name: str
    source: Optional[str] = None      # the source bitmap of a merge


class _NoBitmaps:
    """The bitmaps of a format that cannot store any: none to find, none to add."""

    def __init__(self, image: Image):
        self.img = image

    def find(self, name: str):
        raise ImageError("Dirty bitmap '%s' not found" % name)

    usable = find

    def add(self, name: str, granularity: Optional[int] = None, enabled: bool = True) -> None:
        if not name:
            raise ImageError("Bitmap name cannot be empty")
        if granularity is not None and (granularity < 512 or granularity & (granularity - 1)):
            raise ImageError("Granularity must be power of 2 and at least 512")
        raise UnsupportedFeature("Can't store persistent bitmaps to %s: Operation not supported" % self.img.path)

    def remove(self, name: str) -> None:
        self.find(name)

    clear = remove

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.find(name)

    def merge(self, name: str, source, source_name: str) -> None:
        self.find(name)


def _editor(image: Image):
    make = getattr(image, "bitmap_editor", None)
    return make() if make is not None else _NoBitmaps(image)


def _failed(op: str, bitmap: str, exc: ImageError) -> ImageError:
    """qemu-img's wording of a failed operation, the error's class kept."""
    return type(exc)("Operation %s on bitmap %s failed: %s" % (op, bitmap, exc.message))


def edit_bitmap(path: str, bitmap: str, operations: Sequence[Operation], fmt: Optional[str] = None,
                granularity: Optional[int] = None, source_file: Optional[str] = None,
                source_fmt: Optional[str] = None, policy: Optional[Policy] = None) -> None:
    """Run *operations* on the persistent bitmap *bitmap* of the image at *path*.

    *granularity* (bytes, for ``add``; None: the format's default) and *source_file* (the image
    ``merge`` takes its source bitmaps from; default: this one) are as qemu-img's ``-g`` and ``-b``.
    Whatever succeeded is stored, also when a later operation fails."""
    policy = policy or Policy()
    image = open_image(path, fmt, writable=True, policy=policy, backing=False)
    source_image = None
    try:
        if source_file is not None:
            source_image = open_image(source_file, source_fmt, writable=False, policy=policy, backing=False)
        editor = _editor(image)
        source = _editor(source_image) if source_image is not None else editor
        try:
            for op in operations:
                try:
                    _run(editor, source, bitmap, op, granularity)
                except ImageError as exc:
                    raise _failed(op.name, bitmap, exc) from None
        finally:
            if not isinstance(editor, _NoBitmaps):
                image.commit_bitmaps(editor)
    finally:
        if source_image is not None:
            close_chain(source_image)
        close_chain(image)


def _run(editor, source, bitmap: str, op: Operation, granularity: Optional[int]) -> None:
    if op.name == "add":
        editor.add(bitmap, granularity)
    elif op.name == "remove":
        editor.remove(bitmap)
    elif op.name == "clear":
        editor.clear(bitmap)
    elif op.name in ("enable", "disable"):
        editor.set_enabled(bitmap, op.name == "enable")
    elif op.name == "merge":
        editor.merge(bitmap, source, op.source)
    else:
        raise ImageError("unknown bitmap operation %r (one of: %s)" % (op.name, ", ".join(OPERATIONS)))
