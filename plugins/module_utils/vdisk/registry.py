"""The explicit list of format drivers (explicit imports: Ansible bundles only what is imported)."""
import os
from typing import Dict, List, Optional, Tuple

from .driver import Driver
from .errors import FormatError, HostIOError, ImageError
# One line per format, each importing that format's DRIVER as ``_<name>``: explicit imports, because
# Ansible bundles only the module_utils a module imports.
from .formats.raw import DRIVER as _raw
from .formats.qcow2 import DRIVER as _qcow2
from .formats.parallels import DRIVER as _parallels
from .formats.qed import DRIVER as _qed
from .formats.vdi import DRIVER as _vdi
from .formats.vpc import DRIVER as _vpc

DRIVERS: Dict[str, Driver] = {d.name: d for d in sorted((v for k, v in list(globals().items())
                                                          if k.startswith("_") and isinstance(v, Driver)),
                                                         key=lambda d: d.name)}
PROBE_BYTES = 4096


def get_driver(name: str) -> Driver:
    """The driver for format *name*, or an error naming the known formats."""
    try:
        return DRIVERS[name]
    except KeyError:
        raise FormatError("Unknown file format '%s' (known: %s)" % (name, ", ".join(sorted(DRIVERS))),
                          field="format") from None


def probe_scores(header: bytes, filename: str) -> List[Tuple[int, str]]:
    """Every driver's score for *header*, best first."""
    scores = [(d.probe(header, filename), d.name) for d in DRIVERS.values()]
    return sorted((s for s in scores if s[0] > 0), reverse=True)


def probe_file(path: str) -> str:
    """Detect the format of the file at *path* from its first bytes."""
    try:
        with open(path, "rb") as f:
            header = f.read(PROBE_BYTES)
    except OSError as exc:
        raise HostIOError("could not open: %s" % (exc.strerror or exc), path=path) from None
    scores = probe_scores(header, path)
    return scores[0][1] if scores else "raw"
