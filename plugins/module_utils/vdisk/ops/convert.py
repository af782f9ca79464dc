"""qemu-img convert, written once against the Image interface: any readable format to any writable one.

The source is opened read-only.  Its allocation map is walked so that holes and zero
extents are never read; data is read in large batches and zero-detected at the
``-S`` granularity; only non-zero runs are written.  A new destination is created
beside its final path and renamed into place when complete (unless ``-n``).

Two paths share that walk: a plain copy of runs, and a unit path (``-c`` and ``-B``)
that looks at every target cluster: ``-c`` compresses units in worker threads and
writes them in order; ``-B`` writes only the units that differ from the new backing file.

A destination that is the block device the user named (``Policy.named_device``) is written in
place, every byte (a device is never known to read as zeros): with ``-n`` as any existing
target, without it as qemu-img "creates" a host device: it must hold the source, and only raw
is written onto it.
"""
import os
from collections import deque
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from ..driver import DATA, UNALLOCATED, ZERO, Image, Policy
from ..errors import ImageError, InvalidOption, UnsupportedFeature
from ..interrupt import main_thread_only
from ..io import AtomicOutput, find_nonzero_runs
from ..registry import get_driver, probe_file
from .chain import close_chain, open_image
from .create import check_device_create
from .readahead import ReadAhead, aligned_buffer

CHUNK = 8 * 1024 * 1024
# the plain copy's read size: buffers that stay in the CPU's caches between the kernel's copy in
# and its copy out (measured on the big bench disk: 8 MiB ~1.5x the wall time of 2 MiB)
COPY_CHUNK = 2 * 1024 * 1024
DEFAULT_SPARSE = 4096
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
SAME = "same"            # a run the new backing file (-B) already holds: the source's own backing file


class _Concat:
    """Several source images read as one disk, one after another (qemu-img convert SRC... DST)."""

    def __init__(self, images: List[Image]):
        self.images = images
        self.virtual_size = sum(i.virtual_size for i in images)

    def parts(self, offset: int, length: int):
        base = 0
        for img in self.images:
            end = base + img.virtual_size
            if offset < end and offset + length > base:
                a = max(offset, base)
                b = min(offset + length, end)
                yield img, a - base, b - a, a
            base = end


def parse_snapshot_param(text: str) -> Tuple[Optional[str], Optional[str]]:
    """``-l`` as qemu-img takes it: ``snapshot.id=ID,snapshot.name=NAME`` (either) or ``ID_OR_NAME``.
    Returns ``(id, name)``; a bare value is ``(value, None)`` and matches an id first, then a name."""
    if not text.startswith("snapshot."):
        return text, None
    ident = name = None
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if key == "snapshot.id" and sep:
            ident = value
        elif key == "snapshot.name" and sep:
            name = value
        else:
            raise InvalidOption("Invalid parameter '%s'; failed in parsing snapshot param '%s'" % (key, text),
                                field="-l")
    return ident, name


@dataclass(frozen=True)
class ConvertOptions:
    """What qemu-img convert's flags ask for (the sources and the destination are arguments)."""
    src_fmt: Optional[str] = None          # -f: format of the sources (probed when None)
    out_fmt: str = "raw"                   # -O
    options: Dict[str, Any] = field(default_factory=dict)     # -o, values as given
    compress: bool = False                 # -c
    sparse_size: int = DEFAULT_SPARSE      # -S: zero runs of at least this many bytes stay unallocated
    existing: bool = False                 # -n: write into the existing destination
    target_is_zero: bool = False           # --target-is-zero (with -n)
    snapshot: Optional[str] = None         # -l: ID_OR_NAME, snapshot.id=ID or snapshot.name=NAME
    backing: Optional[str] = None          # -B: the output gets this backing file, holds only what differs
    backing_fmt: Optional[str] = None      # -F
    workers: Optional[int] = None          # threads compressing for -c (default: one per CPU)
    cache: str = "unsafe"                  # -t: unsafe (qemu-img's default) does not flush a new output
    copy_offload: bool = False             # -C: raw to raw inside the kernel, without zero detection
    bitmaps: bool = False                  # --bitmaps: copy the persistent bitmaps after the data
    skip_broken_bitmaps: bool = False      # --skip-broken-bitmaps: skip inconsistent ones with a warning
    # with -n: the passphrase of the existing encrypted destination (--target-image-opts' key-secret)
    target_passphrase: Optional[bytes] = field(default=None, repr=False)


def convert(sources: List[str], dest: str, opts: Optional["ConvertOptions"] = None, policy: Optional[Policy] = None,
            progress: Optional[Callable[[int, int], None]] = None,
            warn: Optional[Callable[[str], None]] = None) -> None:
    """Copy the guest content of *sources* (concatenated) into *dest* as *opts* (qemu-img convert's
    flags, :class:`ConvertOptions`) asks; *progress* gets ``(done, total)``, *warn* one line per
    warning (a skipped inconsistent bitmap)."""
    opts = opts or ConvertOptions()
    options = dict(opts.options)
    backing, backing_fmt = opts.backing, opts.backing_fmt
    if opts.cache not in CACHE_MODES:
        raise InvalidOption("Invalid cache option: %s" % opts.cache, field="-t")
    sync = opts.cache != "unsafe"
    driver = get_driver(opts.out_fmt)
    if opts.compress and "compression" not in driver.capabilities:
        raise UnsupportedFeature("Compression not supported for this file format", path=dest, field="-c")
    if opts.copy_offload and opts.compress:
        raise InvalidOption("Cannot enable copy offloading when -c is used", field="-C")
    if opts.sparse_size < 0 or opts.sparse_size % 512:
        raise InvalidOption("Invalid buffer size for sparse output specified", field="-S")
    if opts.snapshot is not None and len(sources) > 1:
        raise InvalidOption("No support for concatenating multiple snapshot", field="-l")
    if opts.skip_broken_bitmaps and not opts.bitmaps:
        raise InvalidOption("Use of --skip-broken-bitmaps requires --bitmaps", field="--skip-broken-bitmaps")
    if opts.bitmaps and len(sources) > 1:
        raise InvalidOption("Copying bitmaps only possible with single source", field="bitmap")
    if backing is None and options.get("backing_file"):
        backing, backing_fmt = options.pop("backing_file"), options.pop("backing_fmt", backing_fmt)
    if backing is not None and "backing" not in driver.capabilities:
        raise UnsupportedFeature("Backing file not supported for file format '%s'" % opts.out_fmt, path=dest,
                                 field="-B")
    if backing is not None and opts.existing:
        raise InvalidOption("-B and -n cannot be used together: the existing target keeps its own backing file",
                            path=dest, field="-B")
    if not opts.existing and "create" not in driver.capabilities:
        raise UnsupportedFeature("Format driver '%s' does not support image creation" % opts.out_fmt, path=dest)
    onto_device = not opts.existing and (policy or Policy()).named_device(dest) is not None
    if onto_device:
        check_device_create(dest, opts.out_fmt, driver.parse_options(options), "error while converting raw: ")
    images: List[Image] = []
    new_backing: Optional[Image] = None
    try:
        for src in sources:
            if os.path.exists(dest) and os.path.samefile(src, dest):
                raise ImageError("source and destination are the same file", path=dest)
            img = open_image(src, opts.src_fmt, writable=False, policy=policy)
            images.append(img)
            if opts.snapshot is not None:
                img.select_snapshot(*parse_snapshot_param(opts.snapshot))
        source_bitmaps = _source_bitmaps(images[0], opts.skip_broken_bitmaps) if opts.bitmaps else None
        source = _Concat(images)
        size = source.virtual_size
        if opts.existing or onto_device:
            # written in place (the locks a VM holds refuse it); a device "created" has its old content replaced
            out = open_image(dest, opts.out_fmt, writable=True, backing=False, replacing=onto_device,
                             policy=(policy or Policy()).replace(sync=sync, passphrase=opts.target_passphrase))
            try:
                if out.virtual_size < size:
                    raise ImageError("error while converting raw: Cannot grow device files" if onto_device
                                     else "output file is smaller than input file", path=dest)
                if source_bitmaps is not None:
                    _check_bitmap_target(out, opts.out_fmt)
                _run_copy(source, out, None, opts.compress, opts.sparse_size, progress, not opts.target_is_zero,
                          opts.workers, opts.copy_offload, fresh=False)
                out.flush()
                if source_bitmaps is not None:
                    _copy_bitmaps(source_bitmaps, out, warn)
            finally:
                close_chain(out)
            return
        if backing is not None:
            new_backing, backing_fmt = _open_new_backing(dest, backing, backing_fmt, policy)
            options["backing_file"] = backing
            options["backing_fmt"] = backing_fmt
        typed = driver.parse_options(options)
        tmp = AtomicOutput(dest)        # holds dest's write lock (a disk a VM uses is refused) until the rename
        try:
            # written in place (io.AtomicOutput, nested), under the name it will have
            driver.create_staged(tmp.tmp_path, dest, size, typed, sync=sync)
            # the caller's policy rooted at the destination: files the output names (a qcow2 data file) follow it
            out = driver.open(tmp.tmp_path, writable=True,
                              policy=(policy or Policy()).replace(
                                  lock=False, sync=sync, passphrase=driver.create_passphrase(typed)).with_root(dest))
            out.backing = new_backing       # what unallocated clusters show (read only; closed below)
            try:
                if source_bitmaps is not None:
                    _check_bitmap_target(out, opts.out_fmt)
                _run_copy(source, out, new_backing, opts.compress, opts.sparse_size, progress, not out.zero_init,
                          opts.workers, opts.copy_offload, fresh=typed.get("preallocation") in (None, "off"))
                out.flush()
                if source_bitmaps is not None:
                    _copy_bitmaps(source_bitmaps, out, warn)
            finally:
                out.backing = None
                out.close()
            tmp.commit(sync)
        except BaseException:
            tmp.abort()
            raise
    finally:
        for img in images:
            close_chain(img)
        if new_backing is not None:
            close_chain(new_backing)


def _source_bitmaps(img: Image, skip_broken: bool):
    """The bitmaps ``--bitmaps`` copies, checked before anything is created (qemu-img's order)."""
    if not img.supports_persistent_bitmaps:
        raise UnsupportedFeature("Source lacks bitmap support", path=img.path, field="bitmap")
    editor = img.bitmap_editor()
    editor.check_copyable(skip_broken)
    return editor


def _check_bitmap_target(out: Image, out_fmt: str) -> None:
    """``--bitmaps`` needs a target that can hold them: refused before a byte is written."""
    if not out.supports_persistent_bitmaps:
        raise UnsupportedFeature("Format driver '%s' does not support bitmaps" % out_fmt, path=out.path,
                                 field="bitmap")


def _copy_bitmaps(source_bitmaps, out: Image, warn: Optional[Callable[[str], None]]) -> None:
    """After the data: the source's bitmaps added to the target and stored (so the copy's own
    writes dirty none of them, as in qemu-img)."""
    editor = out.bitmap_editor()
    editor.copy_from(source_bitmaps, warn or (lambda text: None))
    out.commit_bitmaps(editor)


def _open_new_backing(dest: str, backing: str, fmt: Optional[str], policy: Optional[Policy]):
    """Open the ``-B`` file (relative names are relative to the output, as in the image) to compare with."""
    full = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(os.path.abspath(dest)), backing)
    if not os.path.exists(full):
        raise ImageError("Could not open backing file '%s': No such file or directory" % full, path=dest,
                         field="-B")
    if not fmt:
        fmt = probe_file(full)      # recorded in the output, so it is never probed again
    base = policy or Policy()
    allowed = tuple(base.allowed_dirs) + (os.path.dirname(os.path.realpath(full)),)
    image = open_image(full, fmt, writable=False,
                       policy=Policy(allowed_dirs=allowed, force_share=base.force_share, lock=base.lock))
    return image, fmt


def _run_copy(source: _Concat, out: Image, new_backing: Optional[Image], compress: bool, sparse_size: int,
              progress, zero_unwritten: bool, workers: Optional[int], copy_offload: bool = False,
              fresh: bool = False) -> None:
    """*fresh*: the output was just created, with nothing allocated."""
    if compress or new_backing is not None:
        unit = out.compression_unit if compress else (out.cluster_size or max(sparse_size, 4096))
        _copy_units(source, out, unit, compress, new_backing, sparse_size, progress, zero_unwritten, workers)
    else:
        _copy(source, out, sparse_size, progress, zero_unwritten, copy_offload, fresh)


# -- walking the source --------------------------------------------------------------------
def _same_file(a: Image, b: Image) -> bool:
    try:
        return os.path.samefile(a.path, b.path)
    except OSError:
        return False


def _data_runs(img: Image, offset: int, length: int, known: Optional[Image] = None):
    """``(offset, length, DATA|ZERO|SAME)`` of the guest view of a chain: unallocated ranges resolve
    downwards, except into *known* (the new backing file), whose ranges are SAME."""
    for ext in img.extents(offset, length):
        if ext.kind == UNALLOCATED and img.backing is not None:
            inside = max(0, min(ext.offset + ext.length, img.backing.virtual_size) - ext.offset)
            if inside:
                if known is not None and _same_file(img.backing, known):
                    yield ext.offset, inside, SAME
                else:
                    yield from _data_runs(img.backing, ext.offset, inside, known)
            if inside < ext.length:
                yield ext.offset + inside, ext.length - inside, ZERO
        elif ext.kind == DATA and not ext.reads_zero:
            yield ext.offset, ext.length, DATA
        else:
            yield ext.offset, ext.length, ZERO


def _source_runs(source: _Concat, offset: int, length: int, known: Optional[Image] = None
                 ) -> Iterator[Tuple[int, int, str, Image, int]]:
    """``(guest_offset, length, kind, image, image_offset)`` over the concatenated sources."""
    for img, off, n, dpos in source.parts(offset, length):
        for roff, rn, kind in _data_runs(img, off, n, known):
            yield dpos + roff - off, rn, kind, img, roff


# -- plain copy ----------------------------------------------------------------------------
ZEROS, READ, OFFLOAD = "zeros", "read", "offload"


class CopyJob(NamedTuple):
    """One piece of the plain copy, in guest order: the output's ``target``..+``length`` gets zeros
    (ZEROS: nothing is read), the bytes read into the buffer (READ), or the source's host range
    copied inside the kernel (OFFLOAD: ``source`` at ``source_offset``)."""
    target: int
    length: int
    kind: str
    source: Optional[Image] = None
    source_offset: int = 0


def _copy(source: _Concat, out: Image, sparse_size: int, progress, zero_unwritten: bool,
          copy_offload: bool = False, fresh: bool = False) -> None:
    size = source.virtual_size
    done = 0
    gran = None if copy_offload else sparse_size or None

    # Data is read and written in windows that start and end on the target's allocation unit (cluster)
    # boundaries (the bytes around a data run are read too: zeros, or a neighbouring run's data).  In
    # a fresh target zeros are detected per whole unit, which allocates what qemu-img allocates: no
    # unit is written in two parts, which a qcow2 target would have to read back and complete.  A
    # preallocated or existing target is written in place, where zeros are skipped per -S block.
    unit = out.allocation_unit or out.cluster_size
    align = unit if unit and not copy_offload else 1
    if gran is not None and fresh and align > 1:
        gran = max(gran, align)

    def read_guest(offset: int, view: memoryview) -> None:
        _read_batch(source, offset, len(view), None, view)

    def jobs() -> Iterator[Tuple[CopyJob, int, int, Optional[Callable]]]:
        # ReadAhead jobs: (what to write, where to read from, how much, the reader or None)
        covered = 0         # guest bytes [0, covered) have their jobs
        for target, run_length, kind, img, run_offset in _source_runs(source, 0, size):
            end = target + run_length
            if kind != DATA:
                # the unaligned tail is left to a data window that may follow
                stop = end if end == size else max(covered, end - end % align)
                if stop > covered:
                    yield CopyJob(covered, stop - covered, ZEROS), 0, 0, None
                    covered = stop
                continue
            if copy_offload and img.host_range(run_offset, run_length) and out.host_range(target, run_length):
                yield CopyJob(target, run_length, OFFLOAD, img, run_offset), 0, 0, None
                covered = end
                continue
            window_end = min(size, -(-end // align) * align)
            pos = covered
            while pos < window_end:
                n = min(window_end, (pos // COPY_CHUNK + 1) * COPY_CHUNK) - pos
                inside = target <= pos and pos + n <= end
                reader = img.read_into if inside else read_guest
                yield CopyJob(pos, n, READ), (run_offset + pos - target) if inside else pos, n, reader
                pos += n
            covered = max(covered, window_end)
        if covered < size:
            yield CopyJob(covered, size - covered, ZEROS), 0, 0, None

    def zero_runs(view):
        # in the reader thread: the writing thread has only to write
        return None if gran is None else list(find_nonzero_runs(view.obj, gran, len(view)))

    for (job, runs), view in ReadAhead(jobs(), COPY_CHUNK, inspect=zero_runs):
        target, length = job.target, job.length
        if job.kind == OFFLOAD:
            src_host, src_host_off = job.source.host_range(job.source_offset, length)
            dst_host, dst_host_off = out.host_range(target, length)
            if not src_host.copy_to(dst_host, src_host_off, length, dst_host_off):
                for pos in range(0, length, CHUNK):
                    n = min(CHUNK, length - pos)
                    out.write(target + pos, job.source.read(job.source_offset + pos, n))
        elif job.kind == ZEROS:
            if sparse_size == 0:
                _write_real_zeros(out, target, length)
            elif zero_unwritten:
                out.write_zeroes(target, length)
        elif gran is None:
            out.write(target, view)
        else:
            for off, rn, is_zero in runs:
                if not is_zero:
                    out.write(target + off, view[off:off + rn])
                elif zero_unwritten:
                    out.write_zeroes(target + off, rn)
        done += length
        if progress:
            progress(done, size)


def _write_real_zeros(out: Image, offset: int, length: int) -> None:
    zeros = bytes(min(CHUNK, length))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        out.write(offset, zeros[:n])
        offset += n


# -- unit copy (-c, -B) --------------------------------------------------------------------
_zero_block: List[memoryview] = []


def _zeros(n: int) -> memoryview:
    """*n* zero bytes (n <= CHUNK) without a new allocation each time."""
    if not _zero_block:
        _zero_block.append(memoryview(bytes(CHUNK)))
    return _zero_block[0][:n]


def _read_batch(source: _Concat, offset: int, length: int, known: Optional[Image], buf):
    """Fill *buf* with the batch's guest bytes (zeros where the source has none); returns the
    SAME spans and whether any data was read."""
    view = memoryview(buf)[:length]
    same: List[Tuple[int, int]] = []
    any_data = False
    for target, n, kind, img, src_off in _source_runs(source, offset, length, known):
        part = view[target - offset:target - offset + n]
        if kind == DATA:
            img.read_into(src_off, part)
            any_data = True
        else:
            part[:] = _zeros(n)
            if kind == SAME:
                same.append((target - offset, n))
    return same, any_data


def _covered(spans: List[Tuple[int, int]], a: int, b: int) -> bool:
    """Whether [a, b) lies inside the union of the sorted, merged-or-adjacent *spans*."""
    pos = a
    for s, n in spans:
        if s <= pos < s + n:
            pos = s + n
            if pos >= b:
                return True
    return pos >= b


def _unit_batches(source: _Concat, unit: int, batch: int, known: Optional[Image], need_zeros: bool
                  ) -> Iterator[Tuple[int, int]]:
    """``(offset, length)`` batches, unit-aligned, covering what may need writing: data, zeros where
    they must be written, and zeros over data of the new backing file; never the empty rest."""
    size = source.virtual_size

    def wanted():
        for target, n, kind, _img, _off in _source_runs(source, 0, size, known):
            if kind == DATA or (kind == ZERO and need_zeros):
                yield target, n
            elif kind == ZERO and known is not None:
                for off, bn, bkind in _data_runs(known, target, max(0, min(n, known.virtual_size - target))):
                    if bkind == DATA:
                        yield off, bn

    span = None
    for start, n in wanted():
        a, b = start // unit * unit, min(size, -(-(start + n) // unit) * unit)
        if span and a <= span[1]:
            span[1] = max(span[1], b)
            continue
        if span:
            yield from _split(span[0], span[1], batch)
        span = [a, b]
    if span:
        yield from _split(span[0], span[1], batch)


def _split(start: int, end: int, batch: int) -> Iterator[Tuple[int, int]]:
    for pos in range(start, end, batch):
        yield pos, min(batch, end - pos)


def _copy_units(source: _Concat, out: Image, unit: int, compress: bool, new_backing: Optional[Image],
                sparse_size: int, progress, zero_unwritten: bool, workers: Optional[int]) -> None:
    size = source.virtual_size
    batch = max(unit, CHUNK // unit * unit)
    zero_unit = bytes(unit)
    skip_zeros = sparse_size != 0
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2, initializer=main_thread_only) \
        if compress else None
    pending: "deque" = deque()     # batches being compressed, written in order

    def drain(keep: int) -> None:
        while len(pending) > keep:
            for start, items in pending.popleft():
                out.write_compressed(start, [(d, f.result()) for d, f in items])

    need_zeros = zero_unwritten or not skip_zeros
    data = aligned_buffer(batch)           # reused; pieces handed on are copies (slices of an mmap)
    base_buf = aligned_buffer(batch) if new_backing is not None else None
    try:
        done = 0
        for bstart, n in _unit_batches(source, unit, batch, new_backing, need_zeros):
            same, any_data = _read_batch(source, bstart, n, new_backing, data)
            base = None
            if new_backing is not None and not _covered(same, 0, n):
                _read_padded(new_backing, bstart, n, base_buf)
                base = base_buf
            groups: List[Tuple[int, list]] = []     # runs of consecutive units to write
            group_end = -1
            for u in range(0, n, unit):
                v = min(n, u + unit)
                if same and _covered(same, u, v):
                    continue
                piece = data[u:v]
                is_zero = not any_data or piece == zero_unit[:v - u]
                if base is not None:
                    if piece == base[u:v]:
                        continue
                    if is_zero and skip_zeros:
                        out.write_zeroes(bstart + u, v - u)     # zeros over backing data
                        continue
                elif is_zero and skip_zeros:
                    if zero_unwritten:
                        out.write_zeroes(bstart + u, v - u)
                    continue
                if group_end == bstart + u:
                    groups[-1][1].append(piece)
                else:
                    groups.append((bstart + u, [piece]))
                group_end = bstart + v
            if pool is not None:
                pending.append([(start, [(d, pool.submit(out.compress_block, d)) for d in items])
                                for start, items in groups])
                drain(2)
            else:
                for start, items in groups:
                    out.write(start, b"".join(items))
            done = bstart + n
            if progress:
                progress(done, size)
        drain(0)
        if progress and done < size:
            progress(size, size)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _read_padded(img: Image, offset: int, length: int, buf) -> None:
    """Fill *buf* with guest bytes of *img*'s chain; zeros past its end."""
    view = memoryview(buf)[:length]
    avail = max(0, min(length, img.virtual_size - offset))
    if avail:
        img.read_into(offset, view[:avail])
    if avail < length:
        view[avail:] = _zeros(length - avail)
