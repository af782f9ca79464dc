"""qemu-img check for Parallels images, as QEMU 7.2 reports it, plus duplicate BAT entries.

Counted: the in-use flag left set ("image was not closed correctly": a corruption), BAT
entries beyond the end of the file (corruptions; repair clears them), two BAT entries naming
the same host cluster (a corruption QEMU 8.1+ reports too; repair gives the later entry its
own copy of the cluster), and space after the last used cluster (leaks, counted in clusters;
repair truncates the file). ``image-end-offset`` is the end of the last cluster in use.
"""
from typing import Dict, Optional

from ...driver import CheckResult
from . import header as hdr
from .header import SECTOR


def check(img, repair: Optional[str] = None) -> CheckResult:
    first = _check(img, repair)
    if repair and (first.leaks_fixed or first.corruptions_fixed):
        second = _check(img, None)
        second.leaks_fixed = first.leaks_fixed
        second.corruptions_fixed = first.corruptions_fixed
        second.messages = first.messages + second.messages
        return second
    return first


def _check(img, repair: Optional[str]) -> CheckResult:
    res = CheckResult(img.path, "parallels")
    fix_errors = repair == "all"
    fix_leaks = repair in ("leaks", "all")
    cs = img.cs
    size = -(-img.host.size() // SECTOR) * SECTOR    # QEMU sees the file length in whole sectors
    h = img.header
    if img.unclean:
        res.messages.append("%s image was not closed correctly" % ("Repairing" if fix_errors else "ERROR"))
        res.corruptions += 1
        if fix_errors:
            res.corruptions_fixed += 1
            img.unclean = False      # the clean close clears the flag
    res.total_clusters = h.nb_bat_entries
    high = 0
    prev = 0
    seen: Dict[int, int] = {}
    bat_dirty = []
    duplicates = []
    for i, entry in enumerate(img.bat):
        if not entry:
            prev = 0
            continue
        off = entry * img.mult * SECTOR
        if off > size:
            res.messages.append("%s cluster %d is outside image" % ("Repairing" if fix_errors else "ERROR", i))
            res.corruptions += 1
            if fix_errors:
                img.bat[i] = 0
                bat_dirty.append(i)
                res.corruptions_fixed += 1
                prev = 0
                continue
        elif off in seen:
            res.messages.append("%s BAT entry %d refers to cluster %d, which BAT entry %d uses too"
                                % ("Repairing" if fix_errors else "ERROR", i, off // cs, seen[off]))
            res.corruptions += 1
            if fix_errors:
                duplicates.append(i)
        else:
            seen[off] = i
        res.allocated_clusters += 1
        high = max(high, off)
        if prev and prev + cs != off:
            res.fragmented_clusters += 1
        prev = off
    if bat_dirty:
        _write_bat(img, bat_dirty)
    for i in duplicates:
        # the later entry gets its own copy of the shared cluster (data first, then the BAT entry)
        data = img.host.pread(cs, img.bat[i] * img.mult * SECTOR)
        img.bat[i] = 0
        _write_bat(img, [i])
        img.write(i * cs, data[:max(0, min(cs, img.virtual_size - i * cs))])
        res.corruptions_fixed += 1
        high = max(high, img.host_offset(i))
    res.image_end_offset = high + cs
    if size > res.image_end_offset:
        count = -(-(size - res.image_end_offset) // cs)
        res.messages.append("%s space leaked at the end of the image %d"
                            % ("Repairing" if fix_leaks else "ERROR", size - res.image_end_offset))
        res.leaks += count
        if fix_leaks:
            img.host.flush()
            img.host.truncate(res.image_end_offset)
            img.data_end = min(img.data_end, res.image_end_offset // SECTOR)
            res.leaks_fixed += count
    if fix_errors or fix_leaks:
        img.host.flush()
    return res


def _write_bat(img, indexes) -> None:
    for i in indexes:
        img.host.pwrite(img.bat[i].to_bytes(4, "little"), hdr.bat_offset(i))
