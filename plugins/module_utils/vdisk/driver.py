"""The Driver and Image interfaces every format implements, and the path/safety policy.

A :class:`Driver` describes a format (options, capabilities, probing, create,
open).  An :class:`Image` is one open layer.  An operation a format does not have
raises :class:`UnsupportedFeature` from the base class, so ``ops/`` can be written
once against this interface.
"""
import os
import stat
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from .errors import ImageError, InvalidOption, PolicyError, ReadOnlyImage, UnsupportedFeature
from .io import HostFile, NamedDevice, named_device
from .units import parse_bool, parse_int, parse_size

# extent kinds
DATA = "data"                # guest data stored in this layer
ZERO = "zero"                # reads as zeros, decided by this layer (zero flag, hole in a raw file)
UNALLOCATED = "unallocated"  # not in this layer: falls through to the backing file (or zeros)

# QEMU's snapshot name buffer (QEMUSnapshotInfo.name in block/snapshot.h): qemu-img keeps the
# first 255 bytes of a longer name it is given
MAX_SNAPSHOT_NAME = 255

# capability names
CAPABILITIES = ("create", "write", "snapshots", "backing", "compression", "check", "repair", "resize",
                "shrink", "amend", "preallocation")


class Extent(NamedTuple):
    """A run of guest bytes with one allocation status in one layer.

    ``reads_zero`` marks DATA that is known to read as zeros (mapped to a hole of the
    host file): still data for ``map``, but nothing to copy for ``convert``.
    """
    offset: int
    length: int
    kind: str
    host_offset: Optional[int] = None
    compressed: bool = False
    reads_zero: bool = False


class OptionSpec(NamedTuple):
    """One create option: the single source for ``-o help``, validation, docs and the manifest schema."""
    name: str
    type: str            # size | bool | str | int | enum | secret
    default: Any = None
    help: str = ""
    choices: Tuple[str, ...] = ()
    amendable: bool = False
    # equivalent spellings of one value: (alias, the spelling info shows), e.g. ("v3", "1.1")
    aliases: Tuple[Tuple[str, str], ...] = ()
    # the value an image has when its info does not show the option (None: not known), e.g. False
    # for a qcow2 feature that a version 2 image cannot have
    unshown: Any = None

    def canonical(self, value: Any) -> Any:
        """One spelling per value, so a wanted and an observed value compare equal when they mean the same."""
        if isinstance(value, str):
            return dict(self.aliases).get(value, value)
        return value

    def parse(self, value: Any) -> Any:
        """Convert a user value (string from ``-o`` or YAML scalar) into this option's type."""
        if value is None:
            return None
        if self.type == "size":
            return parse_size(value, self.name)
        if self.type == "bool":
            return parse_bool(value, self.name)
        if self.type == "int":
            return parse_int(value, self.name)
        if self.type == "secret":
            # the secret's bytes (the caller resolved qemu-img's secret id): never turned into text
            return value if isinstance(value, bytes) else str(value).encode("utf-8")
        text = str(value)
        if self.choices and text not in self.choices:
            raise InvalidOption("invalid value %r for %s: expected one of %s"
                                % (text, self.name, ", ".join(self.choices)), field=self.name)
        return text

    def help_line(self) -> str:
        kind = {"size": "<size>", "bool": "<bool (on/off)>", "int": "<num>"}.get(self.type, "<str>")
        return "  %-22s - %s" % ("%s=%s" % (self.name, kind), self.help)


class ResolvedPath(NamedTuple):
    """A file an image names, resolved once by :meth:`Policy.resolve`: the path that is checked is
    the path that is opened.

    ``display`` is the name as qemu-img shows it (``full-backing-filename``: the stored name joined
    to the directory of the naming image's path as given); ``real`` is what the kernel makes of
    ``display`` (``os.path.realpath`` of the un-normalised join: ``link/..`` is the parent of the
    link's target, not the directory holding the link), the path checked against ``allowed_dirs`` and
    the only one opened (``io.HostFile(display, checked=this)``).  ``ident`` is ``(st_dev, st_ino)``
    of ``real`` when it was checked, None when it did not exist.
    """
    name: str                       # as stored in the image
    display: str
    real: str
    image: str                      # the image that names it
    what: str                       # backing file, data file, extent
    allowed_dirs: Tuple[str, ...]
    ident: Optional[Tuple[int, int]]

    def verify_fd(self, fd: int) -> None:
        """Refuse a descriptor opened for this reference that is not the file that was checked:
        its device and inode must be the checked ones, and where ``/proc`` shows what the kernel
        opened, that path must lie inside the allowed directories."""
        st = os.fstat(fd)
        if self.ident is None or (st.st_dev, st.st_ino) != self.ident:
            raise self.refused("changed between the check and the open (it is not the file that was checked)")
        try:
            opened = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            return      # no /proc: the device and inode above decide
        if not any(inside_dir(opened, d) for d in self.allowed_dirs):
            raise self.refused("was opened as %r, outside the allowed directories" % opened)

    def refused(self, why: str) -> PolicyError:
        return PolicyError("%s %r %s; refused" % (self.what, self.name, why), path=self.image, field=self.what)


# named files allowed beside the file naming them (wherever the user put it) besides the allowed
# directories, with the word the refusal uses for that file: VMDK extents, as QEMU finds them
_BESIDE_THE_IMAGE = {"extent": "descriptor"}


class Policy(NamedTuple):
    """What an open may follow and touch.

    Files named by an image (backing files, data files, extents) are opened only
    inside *allowed_dirs* plus the directory tree of the image the user named.

    A NamedTuple, not a dataclass: the CLI's start-up would import dataclasses (and inspect) for it.
    """
    allowed_dirs: Tuple[str, ...] = ()
    follow_backing: bool = True
    probe: bool = True
    max_chain_depth: int = 16
    force_share: bool = False   # -U: open without taking image locks (read-only opens only)
    lock: bool = True
    repair: bool = False        # opening for check -r: a dirty or corrupt image may be opened read-write
    check: bool = False         # opening for check: damage check reports is not refused at open
    sync: bool = True           # flush to stable storage on flush/close; False is qemu-img's cache=unsafe
    # the image the caller names may be a block device: set by the CLI only, whose arguments the user
    # typed (named_device); never extends to the files an image names
    block_devices: bool = False
    # the passphrase that unlocks an encrypted image (qemu-img's key-secret): never shown (repr, logs)
    passphrase: Optional[bytes] = None
    # the file a driver is opening (set by ops.chain for the driver's open): see checked()
    opening: Optional[Any] = None       # a ResolvedPath, or the NamedDevice of the user's own image

    def replace(self, **changes: Any) -> "Policy":
        """A copy with *changes*."""
        return self._replace(**changes)

    def __repr__(self) -> str:
        return "Policy(%s)" % ", ".join("%s=%r" % (name, getattr(self, name)) for name in self._fields
                                        if name != "passphrase")

    def locks(self, writable: bool) -> bool:
        """The one rule for locking an image's files: as QEMU locks them, unless ``-U`` (force_share)
        asks for a read-only open without locks."""
        return self.lock and not (self.force_share and not writable)

    def open_host(self, path: str, writable: bool) -> HostFile:
        """An image's own file: opened as checked (:meth:`checked`), locked by :meth:`locks`, and
        flushed to stable storage unless the caller chose qemu-img's cache=unsafe (*sync*)."""
        return HostFile(path, writable=writable, lock=self.locks(writable), sync=self.sync, checked=self.checked(path))

    def named_device(self, path: str) -> Optional[NamedDevice]:
        """The one rule for block devices: the grant to open *path* as a block device, or None.

        Only the image a command was asked to open (``ops.chain.open_image``, and ``convert``'s
        destination) can get one, and only when the caller is the command line (``block_devices``):
        the user named that device, as they name it to qemu-img.  A file an image names (backing
        file, data file, VMDK extent) is resolved by :meth:`resolve`, which refuses every device;
        ``io.HostFile`` opens a device only with this grant, and ``io.DestinationLock`` never
        replaces or deletes one."""
        return named_device(path) if self.block_devices else None

    def with_root(self, image_path: str) -> "Policy":
        """The policy for a chain opened at *image_path*: its directory tree becomes allowed."""
        root = os.path.dirname(os.path.realpath(image_path))
        dirs = tuple(self.allowed_dirs) + (root,)
        return self.replace(allowed_dirs=dirs)

    def resolve(self, name: str, image_path: str, what: str = "backing file") -> ResolvedPath:
        """Resolve the file name *name* stored in the image at *image_path* once, as the kernel will,
        and refuse it unless it is inside the allowed directories and (when it exists) a regular file.

        The one rule for every file an image names: backing files (``ops/chain``), the qcow2 data
        file, VMDK extents, ``vdisk inspect``'s verdicts.  Open ``display`` with ``checked=`` the
        result (``io.HostFile``): the real path is opened and the descriptor verified."""
        if not name:
            raise PolicyError("empty %s name" % what, path=image_path, field=what)
        if "\0" in name:
            raise PolicyError("%s name contains a NUL byte; refused" % what, path=image_path, field=what)
        if name.startswith("json:") or _has_protocol(name):
            raise PolicyError("%s %r uses a protocol prefix or json: specification; refused"
                              % (what, name), path=image_path, field=what)
        display = name if os.path.isabs(name) else os.path.join(os.path.dirname(image_path), name)
        real = os.path.realpath(display)        # never normpath first: "link/.." is the kernel's to resolve
        dirs = tuple(self.allowed_dirs)
        container = _BESIDE_THE_IMAGE.get(what)
        if container:
            dirs += (os.path.dirname(image_path) or os.curdir,)
        if not any(inside_dir(real, d) for d in dirs):
            how = "is an absolute path" if os.path.isabs(name) else "leaves the %s's directory" % (container or "image")
            raise PolicyError("%s %r %s, outside the allowed directories (%s); refused (pass --allow-path to allow "
                              "it)" % (what, name, how, ", ".join(dirs) or "none"), path=image_path, field=what)
        try:
            st = os.lstat(real)
        except OSError:
            ident = None
        else:
            if not stat.S_ISREG(st.st_mode):
                raise PolicyError("%s %r is not a regular file; refused" % (what, name), path=image_path, field=what)
            ident = (st.st_dev, st.st_ino)
            if os.path.realpath(display) != real:   # the identity must be the resolved file's, not a swapped one's
                raise PolicyError("%s %r changed while it was resolved; refused" % (what, name), path=image_path,
                                  field=what)
        return ResolvedPath(name, display, real, image_path, what, dirs, ident)

    def resolve_reference(self, name: str, image_path: str, what: str = "backing file") -> str:
        """The real path :meth:`resolve` checks (and the only one to open) for *name*, or an error."""
        return self.resolve(name, image_path, what).real

    def checked(self, path: str) -> Optional[Any]:
        """What a driver passes as ``HostFile(path, checked=...)`` for the file it opens at *path*:
        the resolved reference when ops.chain is opening a file an image named, the
        :meth:`named_device` grant when it is opening the user's block device, else None (a file
        the user named is opened as named)."""
        ref = self.opening
        if ref is not None and path != ref.display:
            raise PolicyError("internal error: %r opened while %r was checked; refused" % (path, ref.display),
                              path=ref.image, field=ref.what)
        return ref


def _has_protocol(name: str) -> bool:
    head, sep, dummy = name.partition(":")
    return bool(sep) and "/" not in head and len(head) > 1


def inside_dir(path: str, directory: str) -> bool:
    """Whether the real path *path* is *directory* (resolved) or lies under it."""
    directory = os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


class CheckResult:
    """The outcome of ``check``, with qemu-img's counters (JSON keys in :meth:`to_json`)."""

    def __init__(self, filename: str, fmt: str):
        self.filename = filename
        self.format = fmt
        self.check_errors = 0
        self.corruptions = 0
        self.leaks = 0
        self.corruptions_fixed = 0
        self.leaks_fixed = 0
        self.image_end_offset = 0
        self.total_clusters = 0
        self.allocated_clusters = 0
        self.fragmented_clusters = 0
        self.compressed_clusters = 0
        self.messages: List[str] = []   # per-item diagnostics, qemu-img prints them on stderr

    def exit_code(self) -> int:
        """qemu-img check's exit status: 1 check not completed, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"filename": self.filename, "format": self.format, "check-errors": self.check_errors}
        for key in ("image-end-offset", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed",
                    "total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters"):
            value = getattr(self, key.replace("-", "_"))
            if value:
                out[key] = value
        return out


def merge_runs(pieces: Iterable[Tuple[int, int, Any]], is_host: Callable[[Any], bool] = lambda m: m is not None
               ) -> Iterator[Tuple[int, int, Any]]:
    """Merge ``(offset, length, mapping)`` pieces given in guest order: neighbours merge when both
    map to host offsets that continue each other, or both carry the same marker (unallocated,
    zero, ...).  Every table-mapped format walks its table per unit and lets this merge."""
    cur = None
    for offset, n, m in pieces:
        if cur is not None:
            if (m == cur[2] + cur[1] if is_host(m) and is_host(cur[2]) else
                    not is_host(m) and not is_host(cur[2]) and m == cur[2]):
                cur[1] += n
                continue
            yield cur[0], cur[1], cur[2]
        cur = [offset, n, m]
    if cur is not None:
        yield cur[0], cur[1], cur[2]


def unit_pieces(offset: int, length: int, unit: int, host_of: Callable[[int], Optional[int]]
                ) -> Iterator[Tuple[int, int, Optional[int]]]:
    """``(offset, length, host offset or None)`` per allocation unit (block, cluster) of a guest
    range, for a format whose table maps unit *i* to ``host_of(i)`` (None: not allocated)."""
    end = offset + length
    while offset < end:
        idx = offset // unit
        n = min(end, (idx + 1) * unit) - offset
        host = host_of(idx)
        yield offset, n, None if host is None else host + offset % unit
        offset += n


class Image:
    """One open layer of a disk image.  Formats override what they support."""

    driver: "Driver"
    # whether the image can hold persistent dirty bitmaps (then it has ``bitmap_editor()`` and
    # ``commit_bitmaps(editor)``, see formats/qcow2/bitmaps.py)
    supports_persistent_bitmaps = False
    # a newly created image reads as zeros where nothing was written (QEMU's bdrv_has_zero_init):
    # convert then skips the source's zeros; an encrypted payload decrypts to noise, so not there
    zero_init = True
    # guest byte n is byte n of the file (raw): the default extents() then give host offsets
    identity_mapped = True

    def __init__(self, path: str, writable: bool):
        self.path = path
        self.writable = writable
        self.virtual_size = 0
        self.cluster_size: Optional[int] = None
        # the smallest range the format allocates on its own (a subcluster of an extended-L2 qcow2)
        self.allocation_unit: Optional[int] = None
        self.backing: Optional["Image"] = None          # attached by ops.chain
        self.backing_filename: Optional[str] = None     # as stored in the image
        self.backing_format: Optional[str] = None       # as stored in the image
        self.opened_as: Optional[ResolvedPath] = None   # set by ops.chain for a file an image named
        self.dirty = False
        self.encrypted = False

    # -- data path ----------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        raise UnsupportedFeature("reading is not supported", path=self.path)

    def host_range(self, offset: int, length: int):
        """``(HostFile, host offset)`` when guest bytes ``[offset, offset+length)`` are stored as is and
        contiguously in one host file (raw), so they can be copied by the kernel; else None."""
        return None

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill *view* with guest bytes from *offset*: a reused buffer spares large allocations."""
        view[:] = self.read(offset, len(view))

    def write(self, offset: int, data: bytes) -> None:
        raise UnsupportedFeature("format %s does not support writing" % self.driver.name, path=self.path)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make a range read as zeros; the default writes zero bytes."""
        self._check_writable()
        chunk = 4 * 1024 * 1024
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            self.write(offset, bytes(n))
            offset += n

    def discard(self, offset: int, length: int) -> None:
        """Drop data the guest no longer needs; optional, so the default does nothing."""
        self._check_writable()

    def make_empty(self) -> None:
        """After a commit, drop this overlay's data so the backing file shows through.  Optional, as
        in QEMU: a format without it (qed, vdi, vpc, ...) keeps its data and the commit still succeeds."""
        self._check_writable()

    # compressed output (convert -c): compress_block runs in worker threads, write_compressed in order
    compression_unit = 0     # bytes per compressed block (qcow2: the cluster size); 0: not supported

    def compress_block(self, data: bytes) -> Optional[bytes]:
        """The stored form of one compression unit, or None when compressing saves nothing.
        Thread-safe and free of I/O, so callers may run it in parallel."""
        raise UnsupportedFeature("Compression not supported for this file format", path=self.path, field="-c")

    def write_compressed(self, offset: int, blocks: Sequence[Tuple[bytes, Optional[bytes]]]) -> None:
        """Store consecutive units from unit-aligned *offset*: each ``(data, compress_block(data))``."""
        raise UnsupportedFeature("Compression not supported for this file format", path=self.path, field="-c")

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        """Yield this layer's allocation status; default: everything is data, at the same offset
        in the file when :attr:`identity_mapped`, else with no host offset (as qemu-img map shows a
        format that has no block status of its own)."""
        end = self._extent_end(offset, length)
        if end > offset:
            yield Extent(offset, end - offset, DATA, offset if self.identity_mapped else None)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ImageError("access beyond the end of the image (offset %d, length %d)" % (offset, length),
                             path=self.path)

    def read_backing(self, offset: int, length: int) -> bytes:
        """Guest data from the backing chain; zeros where there is none or past its end."""
        if self.backing is None or offset >= self.backing.virtual_size:
            return bytes(length)
        avail = min(length, self.backing.virtual_size - offset)
        data = self.backing.read(offset, avail)
        return data if avail == length else data + bytes(length - avail)

    # -- metadata -----------------------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        """Format-specific part of ``info``: keys ``cluster-size``, ``dirty-flag``, ``format-specific``..."""
        return {}

    def structures(self) -> List[Tuple[str, int, Any]]:
        """The image's on-disk structures for ``vdisk inspect --dump``: ``(title, file offset,
        record)`` with each record a :class:`structure.Record`."""
        return []

    def check(self, repair: Optional[str] = None) -> CheckResult:
        raise UnsupportedFeature("This image format does not support checks", path=self.path)

    def resize(self, size: int, shrink: bool = False, preallocation: str = "off") -> None:
        raise UnsupportedFeature("Image format driver does not support resize", path=self.path)

    def snapshots(self) -> List[Dict[str, Any]]:
        return []

    def create_snapshot(self, name: str) -> None:
        raise UnsupportedFeature("format %s does not support internal snapshots" % self.driver.name, path=self.path)

    def apply_snapshot(self, name: str) -> None:
        raise UnsupportedFeature("format %s does not support internal snapshots" % self.driver.name, path=self.path)

    def delete_snapshot(self, name: str) -> None:
        raise UnsupportedFeature("format %s does not support internal snapshots" % self.driver.name, path=self.path)

    def select_snapshot(self, ident: Optional[str] = None, name: Optional[str] = None) -> None:
        """Show an internal snapshot's content instead of the active layer (read-only images only).
        With *ident* alone it may match a snapshot's id or, failing that, its name (qemu-img -l ID_OR_NAME)."""
        raise UnsupportedFeature("Failed to load snapshot: format %s does not support internal snapshots"
                                 % self.driver.name, path=self.path, field="snapshot")

    def set_backing(self, path: Optional[str], fmt: Optional[str]) -> None:
        raise UnsupportedFeature("format %s does not support backing files" % self.driver.name, path=self.path)

    def amend(self, options: Dict[str, Any], force: bool = False) -> None:
        """qemu-img amend: change format options in place; *force* (``--force``) allows what a
        format otherwise refuses as unsafe (luks: overwriting an active key slot, erasing the last)."""
        raise UnsupportedFeature("Format driver '%s' does not support option amendment" % self.driver.name,
                                 path=self.path)

    def referenced_files(self) -> List[Tuple[str, str]]:
        """``(role, name)`` of every other file this image names (backing file, data file, extents)."""
        if self.backing_filename:
            return [("backing file", self.backing_filename)]
        return []

    def flush(self) -> None:
        """Write what is buffered to the image's file (on stable storage unless cache=unsafe)."""
        if self.writable and self.host is not None:
            self.host.flush()

    # -- the image's own file -------------------------------------------------------------
    host: Optional[HostFile] = None

    def _open_host(self, policy: "Policy") -> None:
        """Open the image's file as *policy* allows (:meth:`Policy.open_host`) and parse it with
        ``self._open()``; the file is closed again when parsing fails."""
        self.host = policy.open_host(self.path, self.writable)
        try:
            self._open()
        except BaseException:
            self.host.close()
            raise

    def _open(self) -> None:
        """Read and check the image's metadata from ``self.host`` (formats that use :meth:`_open_host`)."""

    def _close_writes(self) -> None:
        """What a clean close of a writable image writes, in the format's crash-safe order: at least
        the flush of the data (formats add their header updates around it)."""
        self.host.flush()

    def close(self) -> None:
        """Finish the writes of a clean close (:meth:`_close_writes`) and close the file; a second
        close does nothing."""
        host = self.host
        if host is None or host.fd < 0:
            return
        try:
            if self.writable:
                self._close_writes()
        finally:
            host.close()

    def _write_view(self, offset: int, data) -> memoryview:
        """*data* as a byte view, after the checks every write makes: the image is open for
        writing and the range lies inside the disk."""
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        return view

    def _extent_end(self, offset: int, length: Optional[int]) -> int:
        """Where an ``extents(offset, length)`` request ends: *length* None is to the end of the disk."""
        return self.virtual_size if length is None else min(self.virtual_size, offset + length)

    def _check_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyImage("image is opened read-only", path=self.path)

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MeasureSource(NamedTuple):
    """The image ``measure`` sizes a conversion of (``qemu-img measure FILE``).

    ``virtual_size`` is in whole sectors, as QEMU reports it; ``allocated(n)`` is the number of
    bytes in the *n*-byte clusters that hold data (zero and unallocated ranges do not count);
    ``bitmaps`` lists ``(name, granularity)`` of its persistent dirty bitmaps, or is None when
    its format cannot carry any.
    """
    virtual_size: int
    allocated: Callable[[int], int]
    bitmaps: Optional[List[Tuple[str, int]]] = None


class Driver:
    """A format: its options, capabilities, probing, create and open."""

    name = ""
    extensions: Tuple[str, ...] = ()
    create_options: Tuple[OptionSpec, ...] = ()
    capabilities: frozenset = frozenset()
    names_other_files = False    # may an image of this format name other files? (probing safety)
    # the guest data is the file's bytes as they are (an ISO 9660 volume is a raw image with a
    # recognisable file system): declaring such a file raw is what writing to it takes, not a mismatch
    raw_view = False

    def probe(self, header: bytes, filename: str) -> int:
        """Score 0..100 for how surely *header* (the first bytes of the file) is this format."""
        return 0

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        """Create a new image at *path* atomically; *sync* False skips waiting for the disk."""
        raise UnsupportedFeature("Format driver '%s' does not support image creation" % self.name, path=path)

    def create_staged(self, path: str, final_path: str, size: int, options: Dict[str, Any],
                      sync: bool = True) -> None:
        """``create`` at *path*, a temporary name that becomes *final_path* once the image is written
        (convert's output).  Only a format that records its own file name (VMDK's extent lines)
        overrides this; the others write the same image whatever it will be called."""
        self.create(path, size, options, sync)

    # the class of this format's open images, built as ``image_class(driver, path, writable, policy)``
    image_class: Optional[Callable[..., Image]] = None

    # why an image of a format without the "write" capability is refused for writing
    read_only_reason = "format {name} is read-only: images can only be read"

    def open(self, path: str, writable: bool = False, policy: Optional[Policy] = None) -> Image:
        """Open the image at *path* (read-only unless *writable*) as *policy* allows."""
        if self.image_class is None:
            raise NotImplementedError
        if writable and "write" not in self.capabilities:
            raise ReadOnlyImage(self.read_only_reason.format(name=self.name), path=path)
        return self.image_class(self, path, writable, policy or Policy())

    def measure(self, size: Optional[int], options: Dict[str, Any],
                source: Optional[MeasureSource] = None) -> Dict[str, int]:
        """``qemu-img measure``: bytes a new image of this format needs, as ``required``,
        ``fully-allocated`` and (when source and target can carry persistent bitmaps) ``bitmaps``.

        *size* is ``--size`` or ``-o size`` (None if neither was given); *source* is the image
        to convert, if any; *options* are typed like the create options (enums unchecked).
        """
        raise UnsupportedFeature("Block driver '%s' does not support size measurement" % self.name)

    def persistent_bitmaps(self, image: Image) -> Optional[List[Tuple[str, int]]]:
        """``(name, granularity)`` of *image*'s persistent dirty bitmaps; None: the format has none."""
        return None

    def status_span(self, image: Image) -> Optional[int]:
        """QEMU reports *image*'s block status in runs that never cross a multiple of this many
        guest bytes (qcow2: the range one L2 table maps); None when there is no such limit."""
        return None

    def option(self, name: str) -> OptionSpec:
        for spec in self.create_options:
            if spec.name == name:
                return spec
        raise InvalidOption("Invalid parameter '%s'" % name, field=name)

    def create_passphrase(self, options: Dict[str, Any]) -> Optional[bytes]:
        """The passphrase a set of create options carries for the new image: the value of its create
        option of type "secret" (luks's ``key-secret``, qcow2's ``encrypt.key-secret``), as bytes."""
        for spec in self.create_options:
            if spec.type == "secret" and options.get(spec.name) is not None:
                value = options[spec.name]
                return value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return None

    def parse_options(self, raw: Dict[str, Any]) -> Dict[str, Any]:
        """Validate and type a dict of option values; unknown names are errors."""
        return {name: self.option(name).parse(value) for name, value in raw.items()}

    def options_help(self) -> str:
        lines = ["Supported %s options:" % self.name]
        lines.extend(spec.help_line() for spec in sorted(self.create_options, key=lambda s: s.name))
        return "\n".join(lines)


def split_option_string(text: str) -> Dict[str, str]:
    """Parse qemu's ``-o`` syntax: ``a=1,b=off``; ``,,`` is a literal comma; repeated ``-o`` are joined."""
    result: Dict[str, str] = {}
    items: List[str] = []
    current = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current))
    for item in items:
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            if name == "help" or name == "?":
                result["help"] = "on"
                continue
            raise InvalidOption("Invalid parameter '%s': expected name=value" % name, field=name)
        result[name.strip()] = value
    return result


def merge_option_strings(texts: Sequence[str]) -> Dict[str, str]:
    result: Dict[str, str] = {}
    for text in texts:
        result.update(split_option_string(text))
    return result


def iter_chunks(offset: int, length: int, chunk: int) -> Iterable[Tuple[int, int]]:
    """Split ``[offset, offset+length)`` at multiples of *chunk*."""
    end = offset + length
    while offset < end:
        n = min(chunk - offset % chunk, end - offset)
        yield offset, n
        offset += n
