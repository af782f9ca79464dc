"""The apply lock: one ``vdisk apply`` at a time per set of manifests.

Image locks (``io.take_locks``) keep two writers off one image; this lock keeps two applies off
one *plan*: without it, two pipelines applying the same manifests each plan against what the
other is still changing.  It is an exclusive ``flock`` on a file beside the first manifest
(``.NAME.lock``), held for the whole run and released when the process ends, however it ends;
the file itself stays (removing it would let a third apply lock a new file while the second
still holds the old one).  It records the holder's pid for the refusal message.
"""
import fcntl
import math
import os
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import ImageError

POLL_SECONDS = 0.1


class ApplyLocked(ImageError):
    """Another apply holds the lock (beyond ``--lock-timeout``)."""


def lock_path(manifest: str) -> str:
    """The lock file of a run whose first manifest is *manifest*."""
    directory, name = os.path.split(os.path.abspath(manifest))
    return os.path.join(directory, ".%s.lock" % name)


@contextmanager
def apply_lock(manifest: str, timeout: float = 0.0) -> Iterator[str]:
    """Hold the apply lock of *manifest* for the ``with`` block; wait up to *timeout* seconds for it
    (0: fail at once).  Yields the lock file's path; raises :class:`ApplyLocked` or ``ImageError``."""
    path = lock_path(manifest)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise ImageError("could not open the apply lock file: %s" % (exc.strerror or exc), path=path) from None
    try:
        _acquire(fd, path, timeout)
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        yield path
    finally:
        os.close(fd)        # releases the flock


def _acquire(fd: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ApplyLocked("another apply holds %s%s; try again later, or wait for it with --lock-timeout "
                                  "SECONDS" % (path, _holder(fd)), path=None) from None
            time.sleep(POLL_SECONDS)


def _holder(fd: int) -> str:
    """`` (pid N)`` from the lock file, when the holder wrote it."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return " (pid %s)" % text if text.isdigit() else ""


def parse_timeout(value: Optional[str]) -> float:
    """``--lock-timeout``: seconds, a non-negative number."""
    try:
        seconds = float(value or 0)
    except ValueError:
        raise ValueError("invalid --lock-timeout %r: expected seconds" % value) from None
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError("invalid --lock-timeout %r: expected seconds, 0 or more" % value)
    return seconds
