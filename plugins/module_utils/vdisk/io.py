"""Host-file access: positioned I/O, sparse extents, preallocation, atomic replace, image locks.

Image locks are QEMU's (block/file-posix.c): open-file-description byte-range
locks on single bytes.  For each permission bit *i* an opener uses it holds a
shared lock on byte ``100 + i``; for each permission it refuses to share, a
shared lock on byte ``200 + i``.  A permission it wants conflicts with anyone's
lock on ``200 + i``; a permission it refuses to share conflicts with anyone's
lock on ``100 + i``.  The locks are taken first and checked second, as QEMU does (``take_locks``).
A file about to be replaced or deleted is held under a writer's locks until that is done
(``DestinationLock``, used by ``AtomicOutput`` and ``remove_file``).

A block device is opened only with a :class:`NamedDevice` grant (``HostFile(checked=grant)``), which
``driver.Policy.named_device`` makes for the image the user named on the command line; it is written
in place, never created, truncated, replaced or deleted.
"""
import errno
import fcntl
import mmap
import os
import stat
import struct
import sys
from typing import Iterator, NamedTuple, Optional, Tuple

from .errors import HostIOError, ImageError, ImageInUse, PolicyError, UnsupportedFeature

# QEMU's BlockPermission bits, in lock-byte order
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
_PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
_LOCK_BASE_PERM = 100
_LOCK_BASE_SHARED = 200
_ALL_PERMS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE)

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = None


def _fallocate_fn():
    global _libc
    if _libc is None:
        import ctypes   # imported on first use: it costs a noticeable part of the command's start-up
        try:
            # the process's own symbols include libc's (no ctypes.util.find_library: it runs ldconfig)
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        except (OSError, AttributeError):
            _libc = False
    return _libc.fallocate if _libc else None


def _io_error(path: str, what: str, exc: OSError) -> HostIOError:
    # a temporary output is reported under its destination's name: the user never named the hidden file
    return HostIOError("%s failed: %s" % (what, exc.strerror or exc), path=destination_of(path))


# -- block devices the user named ---------------------------------------------------------
# <linux/fs.h>: the device's size in bytes (fstat says 0); make a byte range read as zeros (the device's
# write-zeroes command where it has one, else the kernel writes zeros; the range leaves the page cache)
BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
# BLKZEROOUT takes whole logical blocks: the range is cut to this alignment (a multiple of every logical
# block size in use) and the ends are written as zero bytes; at most ZEROOUT_PIECE per call, so an
# interrupt is handled between calls
ZEROOUT_ALIGN = 4096
ZEROOUT_PIECE = 256 * 1024 * 1024
NOT_NAMED_DEVICE = "is a block device; vdisk opens a block device only as the image named on its command line"


class NamedDevice(NamedTuple):
    """Permission to open one block device: the image the user named on the command line.

    ``HostFile`` opens a block device only when given one of these as *checked*, and only
    ``driver.Policy.named_device`` makes one (for the command's own image argument, never for a
    file an image names).  As for ``driver.ResolvedPath``, the path checked is the path opened:
    ``real`` (``/dev/vg/lv`` is a symlink to ``/dev/dm-N``), without following a symlink, and the
    descriptor must be the same device node (``verify_fd``).
    """
    display: str                    # the path as the user gave it (messages)
    real: str                       # the device node it resolves to: the path opened
    ident: Tuple[int, int]          # (st_dev, st_ino) of the node
    rdev: int                       # the device number
    what = "block device"

    @property
    def image(self) -> str:         # what ``Policy.checked`` names in a refusal, as for ResolvedPath
        return self.display

    def verify_fd(self, fd: int) -> None:
        """Refuse a descriptor that is not the device node that was checked."""
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or (st.st_dev, st.st_ino) != self.ident or st.st_rdev != self.rdev:
            raise self.refused("changed between the check and the open")

    def refused(self, why: str) -> PolicyError:
        return PolicyError("block device %s; refused" % why, path=self.display)


def named_device(path: str) -> Optional[NamedDevice]:
    """The grant for *path* when it is a block device (or a symlink to one), else None.  Only
    ``driver.Policy.named_device`` calls this: it decides whether the caller may have it."""
    real = os.path.realpath(path)
    try:
        st = os.lstat(real)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return NamedDevice(path, real, (st.st_dev, st.st_ino), st.st_rdev)


def device_size(fd: int) -> int:
    """Size in bytes of the block device open as *fd*: ``BLKGETSIZE64``, else the offset of its end."""
    try:
        return struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


# -- image locks ----------------------------------------------------------------------------
_WRITER_LOCKS = (_ALL_PERMS, (PERM_WRITE, PERM_RESIZE))     # what a writer takes, what it refuses to share
_READER_LOCKS = ((PERM_CONSISTENT_READ,), (PERM_WRITE,))
_NO_OFD_LOCKS = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def take_locks(fd: int, wanted, unshared, path: str) -> bool:
    """Take QEMU's lock bytes on *fd* for the permissions *wanted* and those *unshared*, then check that
    no other open file holds a conflicting one; on a conflict the locks taken are released and
    :class:`ImageInUse` names *path*.  Lock first, check second (QEMU's ``raw_apply_lock_bytes`` then
    ``raw_check_lock_bytes``): of two openers arriving together at least one sees the other's locks,
    where checking first lets both through.  ``F_OFD_GETLK`` does not report the caller's own locks
    on the same open file description, so the check sees only other openers.  Returns False where the
    file system has no OFD locks (nothing is locked then, as QEMU degrades)."""
    taken = []
    try:
        for offset in [_LOCK_BASE_PERM + p for p in wanted] + [_LOCK_BASE_SHARED + p for p in unshared]:
            _setlk(fd, fcntl.F_RDLCK, offset)
            taken.append(offset)
        for perm in wanted:
            _check_free(fd, _LOCK_BASE_SHARED + perm, perm, "", path)
        for perm in unshared:
            _check_free(fd, _LOCK_BASE_PERM + perm, perm, "shared ", path)
    except OSError as exc:
        _release(fd, taken)
        if exc.errno in _NO_OFD_LOCKS:
            return False    # file system without OFD locks: QEMU degrades the same way
        raise ImageInUse("image is in use: failed to lock (%s); is another process using the image?"
                         % exc.strerror, path=path) from None
    except BaseException:
        _release(fd, taken)
        raise
    return True


def _release(fd: int, offsets) -> None:
    for offset in offsets:
        try:
            _setlk(fd, fcntl.F_UNLCK, offset)
        except OSError:
            pass        # closing the descriptor drops them anyway


def _setlk(fd: int, kind: int, offset: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))


def _check_free(fd: int, offset: int, perm: int, shared: str, path: str) -> None:
    try:
        raw = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    except OSError:
        return
    if _FLOCK.unpack(raw)[0] != fcntl.F_UNLCK:
        raise ImageInUse('image is in use: failed to get %s"%s" lock; is another process using the image?'
                         % (shared, _PERM_NAMES[perm]), path=path)


# Writes reach the kernel in pieces of at most this size. A large aligned write makes the page cache
# allocate large folios (2 MiB for a 2 MiB write), and on a VM whose free memory goes back to the host
# (free page reporting) each costs ~5 ms to fault in again: 1.7 GB written in 2 MiB writes took 2.4-3.6 s
# of system time, in 128 KiB pieces 0.4 s, and never more when memory is warm (docs/performance.md).
WRITE_PIECE = 128 * 1024


class HostFile:
    """One open host file, the bottom of every image.  Reads and writes are positioned."""

    def __init__(self, path: str, writable: bool = False, lock: bool = True, create: bool = False,
                 allow_nonregular: bool = False, sync: bool = True, checked=None):
        """*checked*: for a file an image names, the ``driver.ResolvedPath`` the policy checked
        (``Policy.checked``): its real path is opened instead of *path* (kept for messages), without
        following a symlink in its last component, and the descriptor is verified (``verify_fd``).
        A :class:`NamedDevice` there is the only way to open a block device (the image the user
        named); opened for writing, it is opened ``O_EXCL``, so a device the kernel holds (mounted,
        a device-mapper, RAID or swap member) is refused, and a mount is refused while vdisk writes."""
        self.path = path
        self.writable = writable
        self.sync = sync        # False: flush() leaves writeback to the kernel (qemu's cache=unsafe)
        self.checked = checked
        # O_NONBLOCK: opening a FIFO must not hang; it is refused below and cleared for regular files
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK
        if create:
            flags |= os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        if checked is not None:
            flags |= os.O_NOFOLLOW
        device = isinstance(checked, NamedDevice)
        if device and writable:
            flags |= os.O_EXCL      # on a block device (no O_CREAT): exclusive, EBUSY while the kernel holds it
        try:
            self.fd = os.open(path if checked is None else checked.real, flags, 0o644)
        except OSError as exc:
            if checked is not None and exc.errno == errno.ELOOP:
                raise checked.refused("became a symbolic link between the check and the open") from None
            if device and exc.errno == errno.EBUSY:
                raise ImageInUse("block device is in use by the kernel (mounted, or part of a device-mapper, "
                                 "RAID or swap device); refusing to write to it", path=path) from None
            raise HostIOError("could not open: %s" % (exc.strerror or exc), path=path) from None
        try:
            if checked is not None:
                checked.verify_fd(self.fd)
            mode = os.fstat(self.fd).st_mode
            self.is_block_device = stat.S_ISBLK(mode)
            if self.is_block_device and not device and not allow_nonregular:
                raise PolicyError(NOT_NAMED_DEVICE, path=path)
            if not (stat.S_ISREG(mode) or self.is_block_device or allow_nonregular):
                raise ImageError("not a regular file", path=path)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            if lock:
                self._lock()
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    # -- locking ------------------------------------------------------------------------
    def _lock(self) -> None:
        if self.writable:
            wanted, unshared = _WRITER_LOCKS
        else:
            # a reader needs consistent data: nobody may write meanwhile (qemu-img info does the same)
            wanted, unshared = _READER_LOCKS
        take_locks(self.fd, wanted, unshared, self.path)

    # -- I/O --------------------------------------------------------------------------
    def size(self) -> int:
        if self.is_block_device:
            return device_size(self.fd)     # fstat gives 0 for a device
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        """Bytes the file takes on the host (qemu's "disk size")."""
        return os.fstat(self.fd).st_blocks * 512

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly *length* bytes; past the end of the file reads zeros (as QEMU's file driver)."""
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) < length:
                parts = [data]
                got = len(data)
                while got < length:
                    more = os.pread(self.fd, length - got, offset + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
                if len(data) < length:
                    data += bytes(length - len(data))
            return data
        except OSError as exc:
            raise _io_error(self.path, "read at offset %d" % offset, exc) from None

    def pread_into(self, view: memoryview, offset: int) -> None:
        """Fill the writable buffer *view* from *offset* (no new allocation); zeros past the end."""
        view = view.cast("B") if view.format != "B" else view
        try:
            while len(view):
                got = os.preadv(self.fd, [view], offset)
                if not got:
                    view[:] = bytes(len(view))
                    return
                view = view[got:]
                offset += got
        except OSError as exc:
            raise _io_error(self.path, "read at offset %d" % offset, exc) from None

    def copy_to(self, dest: "HostFile", offset: int, length: int, dest_offset: int) -> bool:
        """Copy a byte range into *dest* inside the kernel (copy_file_range: no user-space copy,
        a reflink where the file system shares extents).  False when the kernel cannot do it
        here (the caller then copies by reading and writing); nothing is written in that case."""
        copy = getattr(os, "copy_file_range", None)
        if copy is None:
            return False
        done = 0
        try:
            while done < length:
                n = copy(self.fd, dest.fd, length - done, offset + done, dest_offset + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if done == 0 and exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                return False
            raise _io_error(self.path, "copy to %s at offset %d" % (dest.path, offset + done), exc) from None
        if done < length:   # the source ended early: the rest reads as zeros
            dest.pwrite(bytes(length - done), dest_offset + done)
        return True

    def pwrite(self, data, offset: int) -> None:
        """Write all of *data* at *offset*, in pieces of at most WRITE_PIECE bytes."""
        view = memoryview(data).cast("B")
        try:
            while len(view):
                done = os.pwrite(self.fd, view[:WRITE_PIECE], offset)
                view = view[done:]
                offset += done
        except OSError as exc:
            raise _io_error(self.path, "write at offset %d" % offset, exc) from None

    def _not_resized(self) -> None:
        """A block device keeps its size: never truncated or extended (qemu-img's message)."""
        if self.is_block_device:
            raise UnsupportedFeature("Cannot resize device files", path=self.path)

    def truncate(self, size: int) -> None:
        self._not_resized()
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _io_error(self.path, "truncate to %d" % size, exc) from None

    def fallocate(self, offset: int, length: int) -> None:
        """Reserve host space (preallocation=falloc); extends the file as needed."""
        if length <= 0:
            return
        self._not_resized()     # glibc's emulation would write a byte into every block of a device
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            raise _io_error(self.path, "preallocation", exc) from None

    def reserve(self, offset: int, length: int) -> bool:
        """Reserve host space past the end of the file without changing its size (fallocate with
        KEEP_SIZE); returns False where the host file system cannot."""
        fn = _fallocate_fn()
        if fn is None or length <= 0:
            return False
        if fn(self.fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            import ctypes
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise _io_error(self.path, "preallocation", OSError(err, os.strerror(err)))
        return True

    def write_zeroes_full(self, offset: int, length: int, chunk: int = 4 * 1024 * 1024) -> None:
        """Write real zeros (preallocation=full)."""
        zeros = bytes(min(chunk, length))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.pwrite(zeros[:n] if n < len(zeros) else zeros, offset)
            offset += n

    def zero_device_range(self, offset: int, length: int) -> bool:
        """Make a range of a block device read as zeros through the kernel (``BLKZEROOUT``), the
        unaligned ends written as zero bytes.  False (nothing written) for a regular file, a range
        too short to hold an aligned block, or where the kernel refuses: the caller writes zeros."""
        start = -(-offset // ZEROOUT_ALIGN) * ZEROOUT_ALIGN
        end = (offset + length) // ZEROOUT_ALIGN * ZEROOUT_ALIGN
        if not self.is_block_device or end <= start:
            return False
        pos = start
        try:
            while pos < end:
                n = min(ZEROOUT_PIECE, end - pos)
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", pos, n))
                pos += n
        except OSError:
            if pos == start:
                return False
            self.write_zeroes_full(pos, end - pos)      # the kernel stopped part way: the rest by hand
        if start > offset:
            self.pwrite(bytes(start - offset), offset)
        if offset + length > end:
            self.pwrite(bytes(offset + length - end), end)
        return True

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range, keeping the file size; returns False where the host cannot."""
        fn = _fallocate_fn()
        if fn is None or length <= 0:
            return False
        if fn(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            return False
        return True

    def data_extents(self, offset: int, length: int) -> Iterator[Tuple[int, int, bool]]:
        """Yield ``(offset, length, is_data)`` runs using SEEK_DATA/SEEK_HOLE (all data if unsupported)."""
        end = min(offset + length, self.size())
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to EOF
                    yield pos, end - pos, False
                    return
                yield pos, end - pos, True
                return
            if data > pos:
                hole_end = min(data, end)
                yield pos, hole_end - pos, False
                pos = hole_end
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            run_end = min(hole, end)
            yield pos, run_end - pos, True
            pos = run_end
        if offset + length > end:
            yield end, offset + length - end, False

    def flush(self) -> None:
        if self.writable and self.sync:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise _io_error(self.path, "flush", exc) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also drops the OFD locks
            self.fd = -1

    def __enter__(self) -> "HostFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- outputs --------------------------------------------------------------------------------
_TMP_SUFFIX = ".vdisk-tmp"
_TMP_RANDOM_BYTES = 4                               # 8 hex digits
_TEMPORARIES = {}                                   # absolute temporary path -> its AtomicOutput (this process)


def destination_of(path: str) -> str:
    """The destination that *path*, a temporary output of this process under way, stands for (the name
    errors show and a VMDK descriptor gives its extents), or *path* itself."""
    if not _TEMPORARIES or not isinstance(path, str):
        return path
    out = _TEMPORARIES.get(path) or _TEMPORARIES.get(os.path.abspath(path))
    return out.path if out is not None else path


class DestinationLock:
    """QEMU's writer locks held on a file that is about to be replaced or deleted, until that is done.

    The one rule for every path that replaces or deletes an existing image (``AtomicOutput``,
    ``remove_file``): take the locks a writer takes (every permission, write and resize not shared),
    so a file a running QEMU holds is refused with qemu-img's message naming it, and a QEMU starting
    meanwhile is refused in turn.  The file is opened read-only (shared lock bytes need no more), so
    replacing a read-only file the directory lets one replace still works."""

    def __init__(self, path: str, verb: str = "replace"):
        self.path = path
        self.verb = verb
        self.refusal = "exists and is not a regular file; refusing to %s it" % verb
        self.fd = -1
        self.ident = None       # (st_dev, st_ino) of the file locked

    def _refused(self) -> ImageError:
        """What is at the path is not a regular file: never replaced or deleted.  A block device says so
        (vdisk writes one only in place: ``convert`` onto the device the user named)."""
        if named_device(self.path) is not None:
            return ImageError("exists and is a block device, not a regular file; refusing to %s it" % self.verb,
                              path=self.path)
        return ImageError(self.refusal, path=self.path)

    def ensure(self) -> None:
        """Hold the lock of the file now at the path (none when there is none): locks it, or locks it
        again when something else was put there since."""
        for dummy in range(16):
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                self.release()
                return
            if not stat.S_ISREG(st.st_mode):
                self.release()
                raise self._refused()
            if self.fd >= 0 and (st.st_dev, st.st_ino) == self.ident:
                return
            self._acquire()
        raise HostIOError("keeps changing while it is being replaced", path=self.path)

    def _acquire(self) -> None:
        self.release()
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._refused() from None
            raise HostIOError("could not open it to check that no other process uses it: %s"
                              % (exc.strerror or exc), path=self.path) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refused()
            take_locks(fd, _WRITER_LOCKS[0], _WRITER_LOCKS[1], self.path)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.ident = fd, (st.st_dev, st.st_ino)

    def release(self) -> None:
        if self.fd >= 0:
            fd, self.fd, self.ident = self.fd, -1, None
            os.close(fd)    # drops the locks


def remove_file(path: str) -> bool:
    """Delete the regular file *path* under its write lock: a file another process holds (a running VM's
    disk) is refused with :class:`ImageInUse`.  Returns False when there was no file."""
    lock = DestinationLock(path, "delete")
    try:
        lock.ensure()       # a symlink, directory or device is refused here, as AtomicOutput refuses it
        if lock.fd < 0:
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise HostIOError("could not delete: %s" % (exc.strerror or exc), path=path) from None
        return True
    finally:
        lock.release()


def _shorten(name: str, room: int) -> str:
    """*name* cut to at most *room* bytes, on a character boundary where the name is UTF-8."""
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    raw = raw[:max(room, 0)]
    for drop in range(min(4, len(raw) + 1)):
        part = raw[:len(raw) - drop]
        try:
            part.decode("utf-8")
        except UnicodeDecodeError:
            continue
        return os.fsdecode(part)
    return os.fsdecode(raw)


def _name_max(directory: str) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, TypeError):
        return 255


class AtomicOutput:
    """A new file written beside *path* under a temporary name and renamed into place on commit.

    Refuses to replace something that is not a regular file (a directory, device or symlink), and a
    file another process holds (``DestinationLock``: taken here, held until the rename or the abort).
    The temporary name is ``.NAME.RANDOM.vdisk-tmp`` within the file system's NAME_MAX (NAME shortened
    as needed); errors name *path*, never the temporary file (``destination_of``).  An output whose
    path is the temporary file of an output under way in this process (convert has a driver create
    its output there) is written in place, and that output renames it.
    """

    def __init__(self, path: str, overwrite: bool = True):
        self.path = path
        self.nested = False
        self.tmp_ident = None
        self._lock = None
        outer = _TEMPORARIES.get(os.path.abspath(path))
        if outer is not None:
            self.nested = True
            self.tmp_path = outer.tmp_path
            try:
                fd = os.open(self.tmp_path, os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
                try:
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) != outer.tmp_ident:    # not the file the output made: never truncated
                        raise HostIOError("the temporary file was replaced while it was being written",
                                          path=outer.path)
                    os.ftruncate(fd, 0)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise HostIOError("could not create: %s" % (exc.strerror or exc), path=outer.path) from None
            return
        if not overwrite and os.path.lexists(path):
            raise ImageError("file exists", path=path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise HostIOError("directory does not exist: %s" % directory, path=path)
        self._lock = DestinationLock(path)
        try:
            self._lock.ensure()         # a disk a running VM holds is refused before anything is written
            self._create_temporary(directory)
        except BaseException:
            self._lock.release()
            raise

    def _create_temporary(self, directory: str) -> None:
        room = _name_max(directory) - len("..") - 2 * _TMP_RANDOM_BYTES - len(_TMP_SUFFIX)
        prefix = _shorten(os.path.basename(self.path), room)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        for dummy in range(100):
            name = os.path.join(directory, ".%s.%s%s" % (prefix, os.urandom(_TMP_RANDOM_BYTES).hex(), _TMP_SUFFIX))
            self.tmp_path = name
            _TEMPORARIES[name] = self       # before it exists: an interruption from here on removes it
            try:
                fd = os.open(name, flags, 0o644)        # the mode less the umask, as any new file
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                self.tmp_ident = (st.st_dev, st.st_ino)
                return
            except FileExistsError:
                _TEMPORARIES.pop(name, None)
            except OSError as exc:
                _TEMPORARIES.pop(name, None)
                raise HostIOError("could not create: %s" % (exc.strerror or exc), path=self.path) from None
            except BaseException:
                _TEMPORARIES.pop(name, None)
                if os.path.lexists(name):
                    os.unlink(name)
                raise
        raise HostIOError("could not create a temporary file beside it", path=self.path)

    def commit(self, sync: bool = True) -> None:
        """Flush the temporary file and rename it over the destination.

        Without *sync* (qemu-img convert's default cache=unsafe) a new file is renamed into place
        without waiting for the disk; replacing an existing file always waits, so a crash can
        never leave the old content lost and the new one incomplete."""
        if self.nested:
            return      # the output under way flushes and renames
        try:
            if sync or os.path.lexists(self.path):
                fd = os.open(self.tmp_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise HostIOError("flush failed: %s" % (exc.strerror or exc), path=self.path) from None
        # checked again at the rename: something else may have put a symlink, directory, device or another
        # file there since; the file replaced is the one whose lock is held
        self._lock.ensure()
        try:
            os.rename(self.tmp_path, self.path)
        except OSError as exc:
            raise HostIOError("could not rename the new file into place: %s" % (exc.strerror or exc),
                              path=self.path) from None
        self._finish()
        if not sync:
            return
        try:
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def abort(self) -> None:
        """Remove the temporary file and release the destination.  Called while an exception is handled,
        it makes that exception name the destination instead of the temporary file."""
        exc = sys.exc_info()[1]
        if exc is not None:
            _name_destination(exc, self.tmp_path, destination_of(self.tmp_path))
        if self.nested:
            return      # the output under way removes it
        try:
            os.unlink(self.tmp_path)
        except OSError:
            pass
        self._finish()

    def _finish(self) -> None:
        if _TEMPORARIES.get(self.tmp_path) is self:
            del _TEMPORARIES[self.tmp_path]
        if self._lock is not None:
            self._lock.release()


def _name_destination(exc: BaseException, tmp: str, dest: str) -> None:
    """Rewrite *exc* (an error met while writing the temporary file *tmp*) to name *dest* instead."""
    if tmp == dest:
        return
    if isinstance(exc, ImageError):
        if exc.path and (exc.path == tmp or os.path.abspath(exc.path) == tmp):
            exc.path = dest
        message = exc.message.replace(tmp, dest).replace(os.path.basename(tmp), os.path.basename(dest))
        if message != exc.message:
            exc.message = message
            exc.args = (message,) + tuple(exc.args[1:])
    elif isinstance(exc, OSError):
        if exc.filename == tmp:
            exc.filename = dest
        if getattr(exc, "filename2", None) == tmp:
            exc.filename2 = dest


def is_zero(data) -> bool:
    """True when *data* holds only zero bytes (fast path through bytes.count)."""
    if not data:
        return True
    view = memoryview(data).cast("B")
    if view[0] or view[-1]:
        return False
    return not any_nonzero(view)


def any_nonzero(view) -> bool:
    """True when the buffer has a non-zero byte; compares against a zero block chunk by chunk."""
    chunk = 1 << 20
    zeros = bytes(min(chunk, len(view)))
    for start in range(0, len(view), chunk):
        part = view[start:start + chunk]
        if part != zeros[:len(part)]:
            return True
    return False


def zeros(length: int) -> bytes:
    return bytes(length)


def find_nonzero_runs(data, granularity: int, length: Optional[int] = None) -> Iterator[Tuple[int, int, bool]]:
    """Split *data* into ``(offset, length, is_zero)`` runs at *granularity* boundaries.

    A zero run is made of whole zero blocks at multiples of *granularity* (a short last block
    counts); everything else is data.  Three probe bytes settle most data blocks; only blocks
    that pass them are compared whole.  With *length*, only the first *length* bytes are looked at.
    """
    buf = data if isinstance(data, (bytes, bytearray, mmap.mmap)) else bytes(data)
    total = len(buf) if length is None else length
    gran = granularity
    zero_block = bytes(gran)
    mid, last = gran // 2, gran - 1
    start = 0
    current: Optional[bool] = None
    i = 0
    while i < total:
        j = i + gran
        if j <= total:
            zero = not (buf[i] or buf[i + last] or buf[i + mid]) and buf[i:j] == zero_block
        else:
            j = total
            zero = buf[i:j] == zero_block[:j - i]
        if zero is not current:
            if current is not None:
                yield start, i - start, current
            start, current = i, zero
        i = j
    if current is not None:
        yield start, total - start, current
