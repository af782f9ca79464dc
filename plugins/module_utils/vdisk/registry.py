"""The explicit list of format drivers (explicit imports: Ansible bundles only what is imported)."""
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, List, Tuple

from .driver import Driver
from .errors import FormatError
from .formats.signatures import may_be
from .io import HostFile

_LOADERS: Dict[str, Callable[[], Driver]] = {}


def _loader(fn: Callable[[], Driver]) -> Callable[[], Driver]:
    _LOADERS[fn.__name__.lstrip("_")] = fn
    return fn


# One loader per format, named after it, each importing that format's DRIVER: explicit imports,
# because Ansible bundles only the module_utils a module imports; inside functions, because a
# command that names its format (``check -f qcow2``) should not pay for importing every driver.
@_loader
def _raw() -> Driver:
    from .formats.raw import DRIVER
    return DRIVER


@_loader
def _qcow2() -> Driver:
    from .formats.qcow2 import DRIVER
    return DRIVER


@_loader
def _parallels() -> Driver:
    from .formats.parallels import DRIVER
    return DRIVER


@_loader
def _qed() -> Driver:
    from .formats.qed import DRIVER
    return DRIVER


@_loader
def _vdi() -> Driver:
    from .formats.vdi import DRIVER
    return DRIVER


@_loader
def _vpc() -> Driver:
    from .formats.vpc import DRIVER
    return DRIVER


@_loader
def _qcow() -> Driver:
    from .formats.qcow import DRIVER
    return DRIVER


@_loader
def _cloop() -> Driver:
    from .formats.cloop import DRIVER
    return DRIVER


@_loader
def _bochs() -> Driver:
    from .formats.bochs import DRIVER
    return DRIVER


@_loader
def _dmg() -> Driver:
    from .formats.dmg import DRIVER
    return DRIVER


@_loader
def _iso() -> Driver:
    from .formats.iso import DRIVER
    return DRIVER


@_loader
def _vhdx() -> Driver:
    from .formats.vhdx import DRIVER
    return DRIVER


@_loader
def _vmdk() -> Driver:
    from .formats.vmdk import DRIVER
    return DRIVER


@_loader
def _luks() -> Driver:
    from .formats.luks import DRIVER
    return DRIVER


class _Drivers(Mapping):
    """Format name -> driver, each driver imported on first use."""

    def __init__(self, loaders: Dict[str, Callable[[], Driver]]):
        self._loaders = dict(sorted(loaders.items()))
        self._loaded: Dict[str, Driver] = {}

    def __getitem__(self, name: str) -> Driver:
        driver = self._loaded.get(name)
        if driver is None:
            driver = self._loaded[name] = self._loaders[name]()
        return driver

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


DRIVERS: Mapping = _Drivers(_LOADERS)
# enough for an ISO 9660 volume descriptor (16 sectors of 2 KiB in, 2 KiB long); formats whose
# signature sits at the end of the file (dmg) read it themselves
PROBE_BYTES = 34816


def get_driver(name: str) -> Driver:
    """The driver for format *name*, or an error naming the known formats."""
    try:
        return DRIVERS[name]
    except KeyError:
        raise FormatError("Unknown file format '%s' (known: %s)" % (name, ", ".join(sorted(DRIVERS))),
                          field="format") from None


def probe_scores(header: bytes, filename: str) -> List[Tuple[int, str]]:
    """Every driver's score for *header*, best first; only the drivers whose signature *header*
    holds are imported and asked (formats/signatures.py), raw among them."""
    scores = [(DRIVERS[name].probe(header, filename), name) for name in DRIVERS if may_be(name, header, filename)]
    return sorted((s for s in scores if s[0] > 0), reverse=True)


def probe_header(path: str, checked=None) -> bytes:
    """The first bytes of *path*: opened without blocking (a FIFO must not hang the probe) and
    refused unless it is a regular file (a device or FIFO is never guessed into a format).
    *checked*: the policy's ``ResolvedPath`` for a file an image names (``io.HostFile``)."""
    with HostFile(path, lock=False, checked=checked) as host:
        return host.pread(min(PROBE_BYTES, host.size()), 0)


def probe_file(path: str, checked=None) -> str:
    """Detect the format of the file at *path* from its first bytes (*checked*: see probe_header)."""
    header = probe_header(path, checked)
    scores = probe_scores(header, path)
    if not scores:
        return "raw"
    best = scores[0][1]
    # a polyglot (an ISO that also carries a qcow2 header) must not be read as a format that can
    # name other files on a guess: the user says which format it is
    others = [name for dummy, name in scores[1:] if name not in (best, "raw")]
    if others and get_driver(best).names_other_files:
        raise FormatError("the file matches more than one format (%s, %s); give its format with -f"
                          % (best, ", ".join(others)), path=path, field="format")
    return best
