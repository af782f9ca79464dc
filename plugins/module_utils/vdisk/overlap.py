"""Metadata overlap checks: named host byte ranges that guest data must never be written over.

References: QEMU block/qcow2-refcount.c (qcow2_check_metadata_overlap, qcow2_pre_write_overlap_check)
and block/qcow2.h (the QCOW2_OL_* kinds).  QEMU checks every data write, and every metadata write
against the other kinds, before it reaches the file; a hostile or damaged table entry that points
guest data at the header, a table or a refcount block is then refused instead of followed.

One mechanism for every format that places guest data by a table it reads from the image (qcow2,
qcow, vdi, vpc): the driver registers its metadata once (:meth:`MetadataMap.from_ranges`), keeps
it current as tables come and go (:meth:`add`, :meth:`discard`) and asks :meth:`check` before each
write or allocation.  Ranges are kept sorted by start in two arrays (16 bytes a range: an image may
have millions of L2 tables), so a check is one ``bisect`` and one comparison when nothing overlaps
-- it runs on every data write.  Ranges that coincide exactly (an L2 table shared by the active
layer and a snapshot) share one slot and keep every name; ranges that overlap others partially
(only in damaged images) are kept aside in a short list that is scanned too.
"""
import heapq
from array import array
from bisect import bisect_left
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import CorruptImage

# the message QEMU prints, with the kind's name (qcow2_pre_write_overlap_check)
MESSAGE = "Preventing invalid write on metadata (overlaps with %s)"
_LIMIT = (1 << 63) - 1          # no file offset reaches this: larger (hostile) values are cut here


def _run(name: str, offsets: Iterable[int], length: int):
    return ((off, off + length, name) for off in offsets)


class MetadataOverlap(CorruptImage):
    """A write or an allocation would have landed on metadata; ``kind`` names it."""

    def __init__(self, message: str, kind: str, offset: int, length: int, path: Optional[str] = None,
                 field: Optional[str] = None):
        super().__init__(message, path=path, field=field)
        self.kind = kind
        self.offset = offset
        self.length = length


class MetadataMap:
    """Named, possibly repeated host byte ranges ``[offset, offset + length)``.

    *order* lists the kinds in the order they are reported when a write overlaps several (QEMU
    reports the first kind of its own check order); kinds not listed come after, by name.
    """

    def __init__(self, order: Sequence[str] = ()):
        self._rank: Dict[str, int] = {name: i for i, name in enumerate(order)}
        self._starts = array("q")                       # disjoint slots, sorted
        self._ends = array("q")
        self._names: List[str] = []                     # each slot's first name ...
        self._more: Dict[int, List[str]] = {}           # ... and its others, by the slot's start
        self._extra: List[Tuple[int, int, str]] = []    # ranges overlapping a slot partially (damaged images)

    @classmethod
    def from_ranges(cls, ranges: Iterable[Tuple[str, int, int]], order: Sequence[str] = (),
                    uniform: Iterable[Tuple[str, Iterable[int], int]] = ()) -> "MetadataMap":
        """A map of ``(name, offset, length)`` *ranges* (any order) and of *uniform* runs ``(name,
        offsets, length)``: many ranges of one kind and length, offsets sorted ascending (L2 tables,
        refcount blocks), merged in without a tuple for each.  Empty ranges are skipped."""
        m = cls(order)
        streams = [iter(sorted((off, off + length, name) for name, off, length in ranges if length > 0))]
        for name, offsets, length in uniform:
            if length > 0:
                streams.append(_run(name, offsets, length))
        starts, ends, names, more, extra = m._starts, m._ends, m._names, m._more, m._extra
        for start, end, name in heapq.merge(*streams):
            start, end = min(start, _LIMIT), min(end, _LIMIT)
            if start >= end:
                continue
            if starts and starts[-1] == start and ends[-1] == end:
                more.setdefault(start, []).append(name)
            elif starts and ends[-1] > start:
                extra.append((start, end, name))
            else:
                starts.append(start)
                ends.append(end)
                names.append(name)
        return m

    def __len__(self) -> int:
        return len(self._names) + sum(len(v) for v in self._more.values()) + len(self._extra)

    def add(self, name: str, offset: int, length: int) -> None:
        start, end = min(offset, _LIMIT), min(offset + length, _LIMIT)
        if start >= end:
            return
        starts, ends = self._starts, self._ends
        i = bisect_left(starts, start)
        if i < len(starts) and starts[i] == start and ends[i] == end:
            self._more.setdefault(start, []).append(name)
        elif (i and ends[i - 1] > start) or (i < len(starts) and starts[i] < end):
            self._extra.append((start, end, name))
        else:
            starts.insert(i, start)
            ends.insert(i, end)
            self._names.insert(i, name)

    def discard(self, name: str, offset: int, length: int) -> None:
        """Forget one registration of *name* over exactly this range (nothing if there is none)."""
        start, end = min(offset, _LIMIT), min(offset + length, _LIMIT)
        if start >= end:
            return
        i = bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start and self._ends[i] == end:
            others = self._more.get(start, [])
            if self._names[i] == name:
                if others:
                    self._names[i] = others.pop()
                else:
                    del self._starts[i], self._ends[i], self._names[i]
            elif name in others:
                others.remove(name)
            else:
                others = None
            if others is not None:
                if not others:
                    self._more.pop(start, None)
                return
        try:
            self._extra.remove((start, end, name))
        except ValueError:
            pass

    def find(self, offset: int, length: int, ignore: Sequence[str] = ()) -> Optional[str]:
        """The name of the metadata ``[offset, offset + length)`` overlaps (None: nothing does)."""
        if length <= 0:
            return None
        end = offset + length
        ends = self._ends
        # slots are disjoint and sorted, so their ends are sorted too: only the last slot starting
        # before *end* can reach past *offset*, and any others that do are just before it
        i = bisect_left(self._starts, end) - 1
        if (i < 0 or ends[i] <= offset) and not self._extra:
            return None
        hits: List[str] = []
        while i >= 0 and ends[i] > offset:
            hits.append(self._names[i])
            hits.extend(self._more.get(self._starts[i], ()))
            i -= 1
        for start, stop, name in self._extra:
            if start < end and stop > offset:
                hits.append(name)
        if ignore:
            hits = [h for h in hits if h not in ignore]
        if not hits:
            return None
        last = len(self._rank)
        return min(hits, key=lambda h: (self._rank.get(h, last), h))

    def check(self, offset: int, length: int, path: Optional[str] = None, ignore: Sequence[str] = (),
              field: Optional[str] = None) -> None:
        """Raise :class:`MetadataOverlap` (QEMU's message) if the range overlaps registered metadata."""
        kind = self.find(offset, length, ignore)
        if kind is not None:
            raise MetadataOverlap(MESSAGE % kind + " at host offset 0x%x (%d bytes)" % (offset, length), kind,
                                  offset, length, path=path, field=field)
