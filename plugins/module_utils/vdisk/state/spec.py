"""One image's desired state: the manifest's image fields (DESIGN.md section 5), validated and typed.

The Ansible modules and the manifest applier both build an :class:`ImageSpec` with
:func:`image_spec`; every mistake is an :class:`InvalidOption` naming the image and the field.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..driver import MAX_SNAPSHOT_NAME
from ..errors import ImageError, InvalidOption
from ..registry import get_driver
from ..units import parse_bool, parse_size, round_up
from .download import check_url, is_url, parse_checksum
from .encryption import Encryption, engine_prefix, parse_encryption, reserved_options

FIELDS = ("path", "state", "format", "size", "preallocation", "options", "backing_file", "backing_format",
          "snapshots", "prune_snapshots", "source", "source_checksum", "source_format", "compress", "allow_shrink",
          "recreate", "encryption")
STATES = ("present", "absent")
DEFAULT_FORMAT = "qcow2"
# create options that have their own field: accepting them in `options` too would give two answers
OWN_FIELDS = {"size": "size", "backing_file": "backing_file", "backing_fmt": "backing_format",
              "preallocation": "preallocation"}


@dataclass
class ImageSpec:
    """What one image should look like; ``None`` means "whatever it is" for an existing image."""
    path: str
    state: str = "present"
    format: str = DEFAULT_FORMAT
    size: Optional[int] = None                 # bytes, rounded up to 512 as images store it
    preallocation: Optional[str] = None        # used when the image is made or grown
    options: Dict[str, Any] = field(default_factory=dict)   # typed create options, as the driver parses them
    backing_file: Optional[str] = None         # as stored in the image: relative to the image's directory
    backing_format: Optional[str] = None
    snapshots: List[str] = field(default_factory=list)
    prune_snapshots: bool = False
    source: Optional[str] = None               # content of a new image comes from this local file (convert)
    source_url: Optional[str] = None           # ... or from this http(s) URL, downloaded (state.download)
    source_checksum: Optional[str] = None      # "sha256:hex" or "sha512:hex" (lowercase) of source_url's file
    source_format: Optional[str] = None        # None: probed
    compress: bool = False                     # compressed clusters when converting from a source
    allow_shrink: bool = False
    recreate: bool = False
    encryption: Optional[Encryption] = None    # state.encryption: how a new image is encrypted, how it opens


def image_spec(fields: Mapping[str, Any], base_dir: Optional[str] = None,
               defaults: Optional[Mapping[str, Any]] = None, inline_secrets: bool = False) -> ImageSpec:
    """Validate one image's fields (*defaults* under them) and return its :class:`ImageSpec`.

    Relative ``path`` and ``source`` are taken relative to *base_dir* (the manifest's directory;
    default: the current directory); ``backing_file`` is kept as given, since the image stores it
    relative to its own directory.  A ``source`` that is an http(s) URL becomes ``source_url`` (with
    its required ``source_checksum``), so that path checks never see it.  ``None`` values count as not given.
    ``encryption`` takes ``passphrase`` only with *inline_secrets* (the modules' no_log option; a
    manifest names a ``passphrase_file``, relative to *base_dir*).
    """
    raw: Dict[str, Any] = {k: v for k, v in (defaults or {}).items() if v is not None}
    for name, value in fields.items():
        if value is None:
            continue
        if name == "options" and isinstance(value, dict) and isinstance(raw.get("options"), dict):
            value = dict(raw["options"], **value)     # an image's options add to the defaults' options
        raw[name] = value
    where = raw.get("path")
    where = str(where) if where else None
    if where and "\0" in where:
        raise InvalidOption("the file name contains a NUL byte", path=where.replace("\0", "\\0"), field="path")
    for name in raw:
        if name not in FIELDS:
            raise InvalidOption("unknown field '%s' (known: %s)" % (name, ", ".join(FIELDS)), path=where, field=name)
    if not where:
        raise InvalidOption("path is required", field="path")
    spec = ImageSpec(path=_join(base_dir, where))
    path = spec.path
    spec.state = _choice(raw, "state", STATES, "present", path)
    spec.format = _text(raw, "format", path) or DEFAULT_FORMAT
    try:
        driver = get_driver(spec.format)
    except ImageError as exc:
        raise InvalidOption(exc.message, path=path, field="format") from None
    for flag in ("prune_snapshots", "compress", "allow_shrink", "recreate"):
        if flag in raw:
            setattr(spec, flag, parse_bool(raw[flag], flag) if not isinstance(raw[flag], bool) else raw[flag])
    if spec.state == "absent":
        return spec
    if "size" in raw:
        spec.size = round_up(_wrap(lambda: parse_size(raw["size"], "size"), path), 512)
    spec.options = _options(driver, raw.get("options"), path)
    spec.encryption = parse_encryption(raw.get("encryption"), path, base_dir=base_dir, inline=inline_secrets)
    if spec.encryption is not None:
        engine_prefix(spec.format, path)
    elif spec.format == "luks":
        raise InvalidOption("format luks needs encryption (its format and passphrase_file)", path=path,
                            field="encryption")
    if "preallocation" in raw:
        spec.preallocation = _preallocation(driver, raw["preallocation"], path)
    spec.backing_file = _file_name(raw, "backing_file", path)
    spec.backing_format = _text(raw, "backing_format", path)
    if spec.backing_format and not spec.backing_file:
        raise InvalidOption("backing_format needs backing_file", path=path, field="backing_format")
    if spec.backing_file and "backing" not in driver.capabilities:
        raise InvalidOption("format %s does not support backing files" % spec.format, path=path,
                            field="backing_file")
    if spec.backing_format:
        _wrap(lambda: get_driver(spec.backing_format), path, "backing_format")
    spec.snapshots = _snapshot_names(raw.get("snapshots"), path)
    if (spec.snapshots or spec.prune_snapshots) and "snapshots" not in driver.capabilities:
        raise InvalidOption("format %s does not support internal snapshots" % spec.format, path=path,
                            field="snapshots")
    _source(spec, raw, base_dir)
    spec.source_format = _text(raw, "source_format", path)
    if spec.source_format:
        _wrap(lambda: get_driver(spec.source_format), path, "source_format")
    made_from_source = bool(spec.source or spec.source_url)
    if spec.source_format and not made_from_source:
        raise InvalidOption("source_format needs source", path=path, field="source_format")
    if spec.compress and not made_from_source:
        raise InvalidOption("compress applies to an image made from a source: set source too", path=path,
                            field="compress")
    if spec.compress and "compression" not in driver.capabilities:
        raise InvalidOption("format %s does not support compression" % spec.format, path=path, field="compress")
    return spec


def _source(spec: ImageSpec, raw: Mapping[str, Any], base_dir: Optional[str]) -> None:
    """``source`` (a local file, or an http(s) URL with its ``source_checksum``) into *spec*."""
    path = spec.path
    src = _file_name(raw, "source", path)
    checksum = _text(raw, "source_checksum", path)
    if src and is_url(src):
        spec.source_url = _wrap(lambda: check_url(src), path, "source")
        if checksum is None:
            raise InvalidOption("source_checksum is required for a URL source (sha256:HEX or sha512:HEX)",
                                path=path, field="source_checksum")
        spec.source_checksum = _wrap(lambda: parse_checksum(checksum), path, "source_checksum")
        return
    if checksum is not None:
        raise InvalidOption("source_checksum applies to a URL source", path=path, field="source_checksum")
    spec.source = _join(base_dir, src) if src else None


def _join(base_dir: Optional[str], name: str) -> str:
    name = os.path.expanduser(name)
    if base_dir and not os.path.isabs(name):
        name = os.path.join(base_dir, name)
    return os.path.normpath(name)


def _wrap(fn, path: str, name: Optional[str] = None):
    """Run a parser; its error gets the image's path (and *name* as the field if it has none)."""
    try:
        return fn()
    except ImageError as exc:
        raise InvalidOption(exc.message, path=path, field=exc.field or name) from None


def _text(raw: Mapping[str, Any], name: str, path: str) -> Optional[str]:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise InvalidOption("expected a string, got %r" % (value,), path=path, field=name)
    return str(value)


def _file_name(raw: Mapping[str, Any], name: str, path: str) -> Optional[str]:
    """A field naming a file: text without NUL bytes (no file name holds one; os.path refuses them)."""
    value = _text(raw, name, path)
    if value is not None and "\0" in value:
        raise InvalidOption("the file name contains a NUL byte", path=path, field=name)
    return value


def _choice(raw: Mapping[str, Any], name: str, choices, default: str, path: str) -> str:
    value = _text(raw, name, path) or default
    if value not in choices:
        raise InvalidOption("invalid value %r: expected one of %s" % (value, ", ".join(choices)), path=path,
                            field=name)
    return value


def _options(driver, options: Any, path: str) -> Dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidOption("expected a mapping of create options, got %r" % (options,), path=path, field="options")
    typed: Dict[str, Any] = {}
    for name, value in options.items():
        name = str(name)
        own = dict(OWN_FIELDS, **reserved_options(driver.name))
        if name in own:
            raise InvalidOption("'%s' is not taken in options: use the field %s" % (name, own[name]),
                                path=path, field=name)
        try:
            spec = driver.option(name)
        except ImageError:
            known = sorted(s.name for s in driver.create_options if s.name not in OWN_FIELDS)
            raise InvalidOption("Invalid parameter '%s' for format %s (known: %s)"
                                % (name, driver.name, ", ".join(known) or "none"), path=path, field=name) from None
        if value is None:
            continue
        typed[name] = _wrap(lambda s=spec, v=value: s.parse(v), path, name)
    return typed


def _preallocation(driver, value: Any, path: str) -> str:
    text = str(value)
    if text in ("False", "false", "no"):    # YAML's `off` arrives as a boolean
        text = "off"
    try:
        spec = driver.option("preallocation")
    except ImageError:
        if text == "off":
            return text
        raise InvalidOption("format %s does not support preallocation" % driver.name, path=path,
                            field="preallocation") from None
    return _wrap(lambda: spec.parse(text), path, "preallocation")


def _snapshot_names(value: Any, path: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidOption("expected a list of snapshot names", path=path, field="snapshots")
    names: List[str] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int)) or not str(item):
            raise InvalidOption("invalid snapshot name %r" % (item,), path=path, field="snapshots")
        check_snapshot_name(str(item), path, "snapshots")
        if str(item) in names:
            raise InvalidOption("snapshot '%s' listed twice" % item, path=path, field="snapshots")
        names.append(str(item))
    return names


def check_snapshot_name(name: str, path: Optional[str], field: str) -> None:
    """Refuse a snapshot name no image can keep: qemu-img keeps only its first MAX_SNAPSHOT_NAME bytes (so
    the name asked for would never be found, and every run would make it again), and a NUL byte ends it."""
    if "\0" in name:
        raise InvalidOption("snapshot name contains a NUL byte", path=path, field=field)
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_SNAPSHOT_NAME:
        raise InvalidOption("snapshot name '%s...' is %d bytes long: at most %d (qemu-img keeps only the first %d)"
                            % (name[:20], size, MAX_SNAPSHOT_NAME, MAX_SNAPSHOT_NAME), path=path, field=field)
