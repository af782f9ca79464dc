"""http(s) sources of manifest images: download, verify the checksum, keep an optional cache.

A manifest image may take its content from ``source: https://host/path/image.qcow2``, pinned by a
``source_checksum`` (``sha256:HEX`` or ``sha512:HEX``).  Planning never downloads: it only looks in
the download cache (:func:`cached`).  Applying streams the file (urllib, ``CHUNK`` bytes at a time,
hashing as it goes, with a timeout on every socket operation so a silent server cannot hang a run)
into a hidden temporary file beside the destination (``.NAME.download-XXXXXXXX``) or into the cache
directory, and hands the verified file to convert; nothing is converted from bytes that did not
verify.  Every failure removes what was written (``try``/``finally``: an interruption too) and is one
:class:`DownloadError` line naming the URL.

Only the standard library is used: the Ansible module runs this on managed hosts.
"""
import contextlib
import hashlib
import http.client
import os
import re
import socket
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

from ..errors import HostIOError, ImageError, InvalidOption
from ..registry import get_driver
from .observe import ObservedImage, observe

CHUNK = 1 << 20                  # bytes read, hashed and written at a time: memory stays bounded
DEFAULT_TIMEOUT = 60.0           # seconds a connect or a read may wait for the server
SCHEMES = ("http", "https")
ALGORITHMS = {"sha256": 64, "sha512": 128}     # the checksums taken, with their length in hex digits
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HIDDEN_NAME_BYTES = 64          # of the destination's name in a temporary name (NAME_MAX is 255)

# (url, bytes done, total bytes or None): called at the start, after every chunk, and once at the
# end with done == total
Progress = Callable[[str, int, Optional[int]], None]


@dataclass
class DownloadSettings:
    """How URL sources are fetched: *cache_dir* keeps verified downloads keyed by checksum (``vdisk
    plan|apply --cache DIR``, the manifest module's ``cache``); *progress* is told how far each download is."""
    cache_dir: Optional[str] = None
    progress: Optional[Progress] = None
    timeout: float = DEFAULT_TIMEOUT


class DownloadError(ImageError):
    """A URL source could not be downloaded, or what was downloaded is not what the checksum pins.
    The message itself starts with the URL (``URL: what went wrong``), so that every caller shows it,
    including those that show an error's message without its path (the batch planner)."""

    def __init__(self, url: str, message: str):
        super().__init__("%s: %s" % (url, message))
        self.url = url


# -- validation (state.spec) ---------------------------------------------------------------------
def is_url(text: str) -> bool:
    """Whether a ``source`` is a URL (``scheme://...``) rather than a local file name."""
    return bool(_URL.match(text))


def check_url(text: str) -> str:
    """*text* if it is an http or https URL vdisk downloads, else :class:`InvalidOption` on ``source``."""
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidOption("unsupported URL scheme '%s': only http and https sources are downloaded"
                            % parts.scheme, field="source")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise InvalidOption("the URL contains a space or a control character: percent-encode it", field="source")
    if not parts.hostname:
        raise InvalidOption("the URL %s names no host" % text, field="source")
    if parts.username is not None or parts.password is not None:
        # plans, reports and Ansible's output show the URL: a password in it would be shown too
        raise InvalidOption("credentials in the URL are not supported (plans and logs show the URL)",
                            field="source")
    try:
        parts.port      # raises for a port that is not a number in range
    except ValueError as exc:
        raise InvalidOption("invalid URL %s: %s" % (text, exc), field="source") from None
    return text


def parse_checksum(text: str) -> str:
    """``sha256:HEX`` or ``sha512:HEX`` (hex of the algorithm's length, in either case; the schema's
    pattern) as ``"sha256:hex-lowercase"``; anything else is :class:`InvalidOption` on ``source_checksum``."""
    algorithm, sep, digits = text.partition(":")
    length = ALGORITHMS.get(algorithm)
    if not sep or length is None or len(digits) != length or not re.match(r"^[0-9a-fA-F]+$", digits):
        raise InvalidOption("invalid checksum %r: expected sha256:HEX (64 hex digits) or sha512:HEX "
                            "(128 hex digits)" % _cut(text), field="source_checksum")
    return "%s:%s" % (algorithm, digits.lower())


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# -- hashing and the cache ------------------------------------------------------------------------
# files hashed in this process: (real path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) -> checksum.
# Any write to a file changes its ctime (which no one can set back), so a plan, then an apply in the
# same process, hash a cached file once; a fetch always hashes it again (verify_file(fresh=True)).
_VERIFIED: Dict[Tuple, str] = {}


def _identity(path: str) -> Tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_checksum(path: str, algorithm: str) -> str:
    """``algorithm:hex`` of the file at *path*, read CHUNK bytes at a time."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return "%s:%s" % (algorithm, digest.hexdigest())


def verify_file(path: str, checksum: str, fresh: bool = False) -> bool:
    """Whether the file at *path* has *checksum*; unless *fresh*, a file hashed before in this process
    and not changed since is not read again."""
    try:
        before = _identity(path)
        if not fresh and _VERIFIED.get(before) == checksum:
            return True
        got = file_checksum(path, checksum.split(":", 1)[0])
        if _identity(path) != before:
            return False        # written to while it was read: what was hashed is not what is there
    except OSError:
        return False
    _VERIFIED[before] = got
    return got == checksum


def cache_entry(cache_dir: str, checksum: str) -> str:
    """Where the cache keeps the file with *checksum*: ``DIR/sha256-HEX``."""
    return os.path.join(cache_dir, checksum.replace(":", "-"))


def cached(checksum: str, settings: Optional[DownloadSettings]) -> Optional[str]:
    """The cache's verified file with *checksum*, or None (no cache, not in it, or it does not verify).
    For planning: nothing is written, nothing downloaded."""
    if settings is None or not settings.cache_dir:
        return None
    path = cache_entry(settings.cache_dir, checksum)
    if not _regular(path):
        return None
    return path if verify_file(path, checksum) else None


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# -- fetching ------------------------------------------------------------------------------------
@contextlib.contextmanager
def fetch(url: str, checksum: str, dest: str, settings: Optional[DownloadSettings] = None) -> Iterator[str]:
    """The verified local copy of *url* for the image made at *dest*, for the ``with`` block.

    With a cache directory: its entry, re-hashed, else downloaded into it (a corrupted entry is
    replaced); the entry stays.  Without: downloaded into a hidden temporary file beside *dest*,
    removed when the block ends, however it ends."""
    settings = settings or DownloadSettings()
    if settings.cache_dir:
        yield _from_cache(url, checksum, settings)
        return
    path = download(url, checksum, os.path.dirname(os.path.abspath(dest)), os.path.basename(dest), settings)
    try:
        yield path
    finally:
        _remove(path)


def _from_cache(url: str, checksum: str, settings: DownloadSettings) -> str:
    """The cache entry of *checksum*, verified now; downloaded (temporary name, verified, renamed) when
    missing or corrupted."""
    directory = settings.cache_dir or "."
    entry = cache_entry(directory, checksum)
    if os.path.lexists(entry):
        if not _regular(entry):
            raise HostIOError("the cache entry exists and is not a regular file", path=entry)
        if verify_file(entry, checksum, fresh=True):
            return entry
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise HostIOError("could not create the download cache: %s" % (exc.strerror or exc),
                          path=directory) from None
    temporary = download(url, checksum, directory, os.path.basename(entry), settings)
    try:
        os.replace(temporary, entry)        # atomic: a reader sees the old entry or the verified new one
    except OSError as exc:
        _remove(temporary)
        raise HostIOError("could not put the download into the cache: %s" % (exc.strerror or exc),
                          path=entry) from None
    _VERIFIED[_identity(entry)] = checksum      # a rename changes ctime: recorded again under its new identity
    return entry


def download(url: str, checksum: str, directory: str, name: str, settings: DownloadSettings) -> str:
    """Download *url* into a new hidden file in *directory* (``.NAME.download-XXXXXXXX``) and verify
    *checksum*; returns its path.  On any failure, an interruption included, the file is removed."""
    prefix = ".%s.download-" % os.fsdecode(os.fsencode(name)[:_HIDDEN_NAME_BYTES])
    try:
        fd, path = tempfile.mkstemp(prefix=prefix, dir=directory)
    except OSError as exc:
        raise HostIOError("could not create a file for the download: %s" % (exc.strerror or exc),
                          path=os.path.join(directory, name)) from None
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                got = _stream(url, checksum.split(":", 1)[0], out, settings)
        except OSError as exc:      # the last buffered write, at close (ENOSPC, EIO)
            raise HostIOError("could not write the download: %s" % (exc.strerror or exc), path=url) from None
        if got != checksum:
            raise DownloadError(url, "checksum mismatch: expected %s, got %s" % (checksum, got))
        _VERIFIED[_identity(path)] = checksum
    except BaseException:
        _remove(path)
        raise
    return path


def _stream(url: str, algorithm: str, out, settings: DownloadSettings) -> str:
    """Copy the body of *url* to the file *out*, hashing it; returns ``algorithm:hex`` of what arrived."""
    digest = hashlib.new(algorithm)
    done, total = 0, None
    try:
        with _opener().open(urllib.request.Request(url, headers={"User-Agent": "vdisk"}),
                            timeout=settings.timeout) as response:
            total = _content_length(response)
            _tell(settings, url, 0, total)
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                _write(out, chunk, url)
                done += len(chunk)
                _tell(settings, url, done, total)
    except http.client.IncompleteRead as exc:
        done += len(exc.partial or b"")
        raise DownloadError(url, _truncated(done, total)) from None
    except urllib.error.HTTPError as exc:
        raise DownloadError(url, "download failed: HTTP Error %d: %s" % (exc.code, exc.reason)) from None
    except urllib.error.URLError as exc:
        raise DownloadError(url, "download failed: %s" % _reason(exc.reason)) from None
    except (http.client.HTTPException, OSError) as exc:      # socket errors while reading, a bad status line
        raise DownloadError(url, "download failed: %s" % _reason(exc)) from None
    if total is not None and done < total:
        # http.client's read(n) returns b"" when the connection closes early: the length says it did
        raise DownloadError(url, _truncated(done, total))
    if total is None:
        _tell(settings, url, done, done)
    return "%s:%s" % (algorithm, digest.hexdigest())


def _write(out, chunk: bytes, url: str) -> None:
    try:
        out.write(chunk)
    except OSError as exc:
        raise HostIOError("could not write the download: %s" % (exc.strerror or exc), path=url) from None


def _tell(settings: DownloadSettings, url: str, done: int, total: Optional[int]) -> None:
    if settings.progress is not None:
        settings.progress(url, done, total)


def _content_length(response) -> Optional[int]:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None and int(value) >= 0 else None
    except ValueError:
        return None


def _truncated(done: int, total: Optional[int]) -> str:
    if total is None:
        return "download truncated after %d bytes" % done
    return "download truncated after %d of %d bytes" % (done, total)


def _reason(reason) -> str:
    """A connection failure in a few words: "connection refused", "timed out", the resolver's message."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "the server closed the connection without a response"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    return " ".join(str(reason).split()) or reason.__class__.__name__


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed to http and https URLs only (urllib also follows them to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in SCHEMES:
            raise urllib.error.HTTPError(newurl, code, "redirected to a URL that is not http or https",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_HTTPOnlyRedirects())


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- the downloaded image ------------------------------------------------------------------------
def observe_download(path: str, url: str, fmt: Optional[str], policy) -> ObservedImage:
    """The verified local copy of *url* as an image (format *fmt*, probed when None).

    Refused when it names other files: what a backing file, data file or extent name means on the
    server is unknown here, and a file that happens to have that name on this host must not become
    part of the new image.  Errors name the URL, never the local copy (a temporary file)."""
    try:
        observed = observe(path, fmt, policy)
        references = getattr(get_driver(observed.format), "references", None)
        named = list(references(path)) if references else []
    except ImageError as exc:
        raise DownloadError(url, "the download is not a usable image: %s" % exc.message) from None
    if observed.backing_file and not any(kind == "backing file" for kind, _name in named):
        named.append(("backing file", observed.backing_file))
    if named:
        raise DownloadError(url, "the downloaded image names %s: a URL source must be a standalone image"
                            % ", ".join("%s %s" % (kind, name) for kind, name in named))
    return observed
