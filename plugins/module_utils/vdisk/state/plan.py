"""Desired state against observed state: the ordered list of actions that makes one equal the other.

The list *is* the plan: an empty list means "nothing to do" (``changed: false``), check mode
reports it without running it, :mod:`.apply` runs it.  Planning reads nothing itself (the caller
observes), so every rule below is a small predicate over :class:`ImageSpec` and
:class:`ObservedImage`, tested as data.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from ..errors import ImageError, InvalidOption
from ..registry import get_driver
from ..units import format_size, round_up
from . import encryption as enc
from .observe import ObservedImage, normalize_option
from .spec import ImageSpec, check_snapshot_name

# action kinds, in the order they run on one image
CREATE, CONVERT, REPLACE, DELETE = "create", "convert", "replace", "delete"
SNAPSHOT_DELETE, AMEND, GROW, SHRINK = "snapshot_delete", "amend", "grow", "shrink"
SNAPSHOT_CREATE, SNAPSHOT_APPLY = "snapshot_create", "snapshot_apply"
KINDS = (CREATE, CONVERT, REPLACE, DELETE, SNAPSHOT_DELETE, AMEND, GROW, SHRINK, SNAPSHOT_CREATE, SNAPSHOT_APPLY)


@dataclass
class Action:
    """One change to one image: ``before``/``after`` hold the properties it changes."""
    kind: str
    path: str
    description: str
    before: Dict[str, Any] = field(default_factory=dict)
    after: Dict[str, Any] = field(default_factory=dict)
    params: Dict[str, Any] = field(default_factory=dict)    # what apply needs (not shown)

    def to_dict(self) -> Dict[str, Any]:
        """The action as modules and ``vdisk plan --output=json`` show it."""
        return {"action": self.kind, "path": self.path, "description": self.description,
                "before": dict(self.before), "after": dict(self.after)}


def properties(observed: ObservedImage) -> Dict[str, Any]:
    """The image properties that diffs show (``before``), qemu-img's key names."""
    if not observed.exists:
        return {"path": observed.path, "state": "absent"}
    props: Dict[str, Any] = {"path": observed.path, "state": "present", "format": observed.format,
                             "virtual-size": observed.virtual_size, "options": dict(observed.options)}
    if observed.backing_file:
        props["backing-filename"] = observed.backing_file
        if observed.backing_format:
            props["backing-filename-format"] = observed.backing_format
    if observed.snapshots:
        props["snapshots"] = observed.snapshot_names
    if observed.encryption is not None:
        props["encryption"] = enc.shown(observed.encryption)
    return props


def predict(before: Dict[str, Any], actions: List[Action]) -> Dict[str, Any]:
    """The properties after *actions* (``after`` of a diff), from those before them."""
    props = dict(before)
    for action in actions:
        if action.kind in (CREATE, CONVERT, REPLACE, DELETE):
            props = {"path": before.get("path", action.path)}
        if action.kind == SNAPSHOT_CREATE:
            props["snapshots"] = list(props.get("snapshots", [])) + [action.params["name"]]
        elif action.kind == SNAPSHOT_DELETE:
            props["snapshots"] = [n for n in props.get("snapshots", []) if n != action.params["name"]]
        elif action.kind == AMEND:
            options = dict(props.get("options", {}))
            options.update({k: v for k, v in action.after.items() if k in action.params["options"]})
            props["options"] = options
            for key in ("backing-filename", "backing-filename-format"):
                if key in action.after:
                    props[key] = action.after[key]
        else:
            props.update(action.after)
    if not props.get("snapshots"):
        props.pop("snapshots", None)
    return props


def plan(spec: ImageSpec, observed: ObservedImage, source: Optional[ObservedImage] = None,
         backing: Optional[ObservedImage] = None) -> List[Action]:
    """The actions that bring the image at ``spec.path`` from *observed* to *spec*.

    *source* is the observed ``spec.source`` -- for a ``spec.source_url``, the verified local copy
    of the download when there is one (None: not downloaded yet) -- and *backing* the observed
    backing file named by the spec.  They give the size of an image that is made; an existing
    overlay without ``size`` keeps its backing file's size, so a backing file grown since, or an
    overlay resized outside vdisk, is drift.  A virtual size of None is not known yet (a download,
    or an image the run makes from one): nothing is decided from it, and the new image's size shows
    as None.  Raises :class:`InvalidOption` for what needs the user's consent: shrinking
    (``allow_shrink``) and a format or fixed-option mismatch (``recreate``), and for a new image
    without a size.
    """
    path = spec.path
    if spec.state == "absent":
        if not observed.exists:
            return []
        return [Action(DELETE, path, "delete %s image %s" % (observed.format, path), properties(observed),
                       {"state": "absent"})]
    if not observed.exists:
        return _make(spec, observed, source, backing, CREATE)
    mismatch = _mismatch(spec, observed)
    if mismatch:
        if not spec.recreate:
            raise InvalidOption("%s; the image is not changed: set recreate: true to replace it with a new image "
                                "(its content is lost)" % mismatch[1], path=path, field=mismatch[0])
        return _make(spec, observed, source, backing, REPLACE, mismatch[1])
    actions: List[Action] = []
    if spec.prune_snapshots:
        for name in observed.snapshot_names:
            if name not in spec.snapshots:
                actions.append(Action(SNAPSHOT_DELETE, path, "delete snapshot '%s' of %s" % (name, path),
                                      {"snapshot": name}, {}, {"name": name}))
    amend = _amend(spec, observed)
    if amend is not None:
        actions.append(amend)
    if spec.size is not None:
        resize = _resize(spec, observed.virtual_size or 0, spec.size)
    else:       # an overlay without size keeps its backing file's (drift when either was resized)
        resize = _resize(spec, observed.virtual_size or 0, backing_size(spec, backing), of_backing=True)
    if resize is not None:
        actions.append(resize)
    actions.extend(_snapshot_creates(spec, observed.snapshot_names))
    return actions


def backing_size(spec: ImageSpec, backing: Optional[ObservedImage]) -> Optional[int]:
    """The size an overlay without ``size`` has: its backing file's (as images store it, a multiple
    of 512), or None when there is no backing file or its size is not known."""
    if not spec.backing_file or backing is None or not backing.exists or backing.virtual_size is None:
        return None
    return round_up(backing.virtual_size, 512)


def _make(spec: ImageSpec, observed: ObservedImage, source: Optional[ObservedImage],
          backing: Optional[ObservedImage], kind: str, why: str = "") -> List[Action]:
    """Create (or replace) the file: from the source, or empty of the spec's size."""
    after: Dict[str, Any] = {"path": spec.path, "state": "present", "format": spec.format,
                             "options": dict(spec.options)}
    params: Dict[str, Any] = {"format": spec.format, "options": dict(spec.options),
                              "preallocation": spec.preallocation, "backing_file": spec.backing_file,
                              "backing_format": spec.backing_format, "encryption": spec.encryption}
    if spec.encryption is not None:
        after["encryption"] = enc.summary(spec.encryption)
    from_source = bool(spec.source or spec.source_url)
    if spec.backing_file:
        after["backing-filename"] = spec.backing_file
        fmt = spec.backing_format or (backing.format if backing is not None and backing.exists else None)
        if fmt:
            after["backing-filename-format"] = fmt
    if spec.backing_file and backing is not None and not backing.exists and not from_source:
        # qemu-img create opens the backing file (-u aside): a missing one is refused, size or not
        needed = "" if spec.size is not None else " (needed for the size of the new image)"
        raise ImageError("Could not open backing file %s: No such file or directory%s" % (spec.backing_file, needed),
                         path=spec.path, field="backing_file")
    made = _Made(spec, properties(observed), after, params, kind, why)
    if from_source:
        actions = _convert_source(made, source)
    else:
        actions = [_create_empty(made, observed, backing)]
    actions.extend(_snapshot_creates(spec, []))
    return actions


@dataclass
class _Made:
    """What every way of making the image shares: the spec, the diff so far, the parameters, the kind."""
    spec: ImageSpec
    before: Dict[str, Any]
    after: Dict[str, Any]
    params: Dict[str, Any]
    kind: str
    why: str

    def action(self, kind: str, what: str) -> Action:
        return Action(kind, self.spec.path, _why(what, self.why, self.kind), self.before, self.after, self.params)


def _convert_source(made: _Made, source: Optional[ObservedImage]) -> List[Action]:
    """Convert the source into the new image, then grow it to the spec's size.  A URL source not
    downloaded yet (*source* None), or a source the run makes from one, has no known size: neither
    has the new image, and the grow (or the refusal to shrink) is planned once it is downloaded."""
    spec, params = made.spec, made.params
    url = spec.source_url
    if url:
        params.update(source=url, source_url=url, source_checksum=spec.source_checksum,
                      source_file=source.path if source is not None else None)
    elif source is None or not source.exists:
        raise ImageError("source image %s does not exist" % spec.source, path=spec.path, field="source")
    else:
        params["source"] = spec.source
    if source is not None and source.encryption is not None:
        raise InvalidOption("the source %s is encrypted (%s): a manifest converts only plain sources (the "
                            "image_convert module takes source_encryption)" % (source.path, source.encryption["format"]),
                            path=spec.path, field="source")
    size = None if source is None or source.virtual_size is None else round_up(source.virtual_size, 512)
    source_format = spec.source_format or (source.format if source is not None else None)
    params.update(source_format=source_format, compress=spec.compress)
    made.after["virtual-size"] = size
    into = "a new %s image %s%s" % (spec.format, spec.path, ", compressed" if spec.compress else "")
    if url and source is None:
        what = "download %s (%s) and convert it into %s; its size is known once it is downloaded" % (
            url, _short(spec.source_checksum or ""), into)
    elif url:
        what = "convert %s (%s, %s) into %s" % (url, source_format, _short(spec.source_checksum or ""), into)
    else:
        what = "convert %s (%s) into %s" % (spec.source, source_format or "format not known yet", into)
    actions = [made.action(made.kind if made.kind == REPLACE else CONVERT, what)]
    resize = _resize(spec, size, spec.size) if size is not None else None
    if resize is not None:
        actions.append(resize)
    return actions


def _short(checksum: str) -> str:
    """A checksum as descriptions show it: the algorithm and the first 12 hex digits."""
    algorithm, _sep, digits = checksum.partition(":")
    return "%s:%s..." % (algorithm, digits[:12]) if len(digits) > 12 else checksum


def _create_empty(made: _Made, observed: ObservedImage, backing: Optional[ObservedImage]) -> Action:
    """Create the image empty: of the spec's size, else (replacing) the old image's, else its backing
    file's; that of a backing file made from a download in the same run is not known yet."""
    spec = made.spec
    size = spec.size
    if size is None and made.kind == REPLACE and not spec.backing_file:
        size = observed.virtual_size
    size_of_backing = size is None and bool(spec.backing_file) and backing is not None
    if size_of_backing:
        size = backing_size(spec, backing)
    if size is None and not size_of_backing:
        raise InvalidOption("size is needed to create the image (or a backing_file or source to take it "
                            "from)", path=spec.path, field="size")
    made.params["size"] = spec.size if spec.size is not None else size
    made.after["virtual-size"] = size
    shown = format_size(size) if size is not None else "its backing file's size (not known yet)"
    what = "create %s image %s of %s%s" % (spec.format, spec.path, shown,
                                           " on backing file %s" % spec.backing_file if spec.backing_file else "")
    return made.action(made.kind, what)


def _why(what: str, why: str, kind: str) -> str:
    return "replace the image (%s): %s" % (why, what) if kind == REPLACE else what


def _mismatch(spec: ImageSpec, observed: ObservedImage) -> Optional[tuple]:
    """``(field, message)`` when the image cannot become the spec in place, else None."""
    if observed.format != spec.format:
        return "format", "the image is %s, not %s" % (observed.format, spec.format)
    driver = get_driver(spec.format)
    for name, wanted in sorted(spec.options.items()):
        have = observed.options.get(name)
        if have is None or normalize_option(spec.format, name, wanted) == have:
            continue
        if not (driver.option(name).amendable and "amend" in driver.capabilities):
            return name, "%s is %s, not %s, and is fixed when an image is made" % (name, _show(have),
                                                                                   _show(wanted))
    why = enc.mismatch(spec.encryption, observed.encryption)
    if why:
        return "encryption", why
    return None


def _amend(spec: ImageSpec, observed: ObservedImage) -> Optional[Action]:
    """One amend action for every amendable option that differs (backing file included)."""
    before: Dict[str, Any] = {}
    after: Dict[str, Any] = {}
    options: Dict[str, Any] = {}
    for name, wanted in sorted(spec.options.items()):
        have = observed.options.get(name)
        wanted_value = normalize_option(spec.format, name, wanted)
        if have is not None and wanted_value != have:
            before[name], after[name], options[name] = have, wanted_value, wanted
    if spec.backing_file is not None and spec.backing_file != observed.backing_file:
        before["backing-filename"], after["backing-filename"] = observed.backing_file, spec.backing_file
        options["backing_file"] = spec.backing_file
        fmt = spec.backing_format or observed.backing_format
        if fmt:
            options["backing_fmt"] = fmt
            before["backing-filename-format"], after["backing-filename-format"] = observed.backing_format, fmt
    elif spec.backing_format is not None and spec.backing_format != observed.backing_format:
        before["backing-filename-format"], after["backing-filename-format"] = observed.backing_format, \
            spec.backing_format
        options["backing_file"] = observed.backing_file
        options["backing_fmt"] = spec.backing_format
    if not options:
        return None
    changes = ", ".join("%s %s -> %s" % (k, _show(before[k]), _show(after[k])) for k in sorted(after))
    return Action(AMEND, spec.path, "amend %s: %s" % (spec.path, changes), before, after,
                  {"options": options, "format": spec.format, "encryption": spec.encryption})


def _resize(spec: ImageSpec, current: int, wanted: Optional[int], of_backing: bool = False) -> Optional[Action]:
    """Grow (or, with ``allow_shrink``, shrink) the image from *current* to *wanted* bytes (None: any
    size).  *of_backing*: *wanted* is the backing file's size, which an overlay without ``size`` keeps."""
    if wanted is None or wanted == current:
        return None
    before, after = {"virtual-size": current}, {"virtual-size": wanted}
    change = "%s -> %s" % (format_size(current), format_size(wanted))
    params = {"size": wanted, "format": spec.format, "preallocation": spec.preallocation or "off",
              "encryption": spec.encryption}
    if wanted > current:
        what = "grow %s: %s%s" % (spec.path, change, " (the size of its backing file)" if of_backing else "")
        return Action(GROW, spec.path, what, before, after, params)
    if not spec.allow_shrink:
        requested = "its backing file's %s (an overlay without size keeps its backing file's size)" % \
            format_size(wanted) if of_backing else "the requested %s" % format_size(wanted)
        raise InvalidOption("the image is %s, larger than %s; shrinking loses the data past the new end: set "
                            "allow_shrink: true to shrink it" % (format_size(current), requested),
                            path=spec.path, field="allow_shrink")
    params["preallocation"] = "off"
    what = "shrink %s: %s%s" % (spec.path, change, " (the size of its backing file)" if of_backing else "")
    return Action(SHRINK, spec.path, what, before, after, params)


def _snapshot_creates(spec: ImageSpec, existing: List[str]) -> List[Action]:
    return [Action(SNAPSHOT_CREATE, spec.path, "create snapshot '%s' of %s" % (name, spec.path), {},
                   {"snapshot": name}, {"name": name, "format": spec.format, "encryption": spec.encryption})
            for name in spec.snapshots if name not in existing]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


# -- image_snapshot ------------------------------------------------------------------------------
SNAPSHOT_STATES = ("present", "absent", "applied")


def plan_snapshot(observed: ObservedImage, name: str, state: str,
                  active_equals: Optional[Callable[[], bool]] = None) -> List[Action]:
    """Actions for one named internal snapshot: ``present``, ``absent`` or ``applied``.

    *active_equals* answers whether the active layer already equals the snapshot (asked only
    for ``applied`` when the snapshot exists; without it, ``applied`` always applies).
    """
    path = observed.path
    if not observed.exists:
        raise ImageError("Could not open '%s': No such file or directory" % path, path=path)
    if state not in SNAPSHOT_STATES:
        raise InvalidOption("invalid state %r: expected one of %s" % (state, ", ".join(SNAPSHOT_STATES)),
                            path=path, field="state")
    check_snapshot_name(name, path, "name")
    if "snapshots" not in get_driver(observed.format).capabilities:
        raise InvalidOption("format %s does not support internal snapshots" % observed.format, path=path,
                            field="format")
    names = observed.snapshot_names
    before = {"snapshots": names}
    params = {"name": name, "format": observed.format}
    if state == "present":
        if name in names:
            return []
        return [Action(SNAPSHOT_CREATE, path, "create snapshot '%s' of %s" % (name, path), before,
                       {"snapshots": names + [name]}, params)]
    if state == "absent":
        if name not in names:
            return []
        return [Action(SNAPSHOT_DELETE, path, "delete snapshot '%s' of %s" % (name, path), before,
                       {"snapshots": [n for n in names if n != name]}, params)]
    if name not in names:
        raise ImageError("Could not apply snapshot '%s': snapshot not found" % name, path=path, field="name")
    if active_equals is not None and active_equals():
        return []
    return [Action(SNAPSHOT_APPLY, path, "revert %s to snapshot '%s'" % (path, name),
                   {"active": "differs from '%s'" % name}, {"active": "equals '%s'" % name}, params)]


# -- image_convert -------------------------------------------------------------------------------
ON_EXISTS = ("compare", "skip", "replace")


def plan_convert(source: ObservedImage, dest: ObservedImage, fmt: str, options: Dict[str, Any],
                 on_exists: str = "compare", compress: bool = False, backing_file: Optional[str] = None,
                 src_format: Optional[str] = None, snapshot: Optional[str] = None,
                 same_content: Optional[Callable[[], bool]] = None, encryption: Optional[enc.Encryption] = None,
                 source_encryption: Optional[enc.Encryption] = None) -> List[Action]:
    """Actions that make *dest* a conversion of *source* into *fmt* with typed create *options*.

    ``on_exists``: ``skip`` keeps any existing file; ``replace`` always rewrites it; ``compare``
    rewrites it unless it already is *fmt* with *options* and the backing file asked for, has the
    source's size, is encrypted as *encryption* declares (state.encryption; plain when None),
    and *same_content()* says its guest content equals the source's.  *source_encryption* unlocks
    an encrypted source.
    """
    path = dest.path
    if not source.exists:
        raise ImageError("Could not open '%s': No such file or directory" % source.path, path=source.path,
                         field="src")
    if on_exists not in ON_EXISTS:
        raise InvalidOption("invalid on_exists %r: expected one of %s" % (on_exists, ", ".join(ON_EXISTS)),
                            path=path, field="on_exists")
    size = round_up(source.virtual_size or 0, 512)
    if encryption is not None:
        enc.engine_prefix(fmt, path)
    if dest.exists and on_exists == "skip":
        return []
    if source.encryption is not None and source_encryption is None:
        raise InvalidOption("the source is encrypted (%s): give source_encryption with its passphrase"
                            % source.encryption["format"], path=source.path, field="source_encryption")
    if dest.exists:
        if on_exists == "compare" and _convert_matches(dest, fmt, options, backing_file, size) \
                and enc.mismatch(encryption, dest.encryption) is None \
                and (same_content is None or same_content()):
            return []
    after: Dict[str, Any] = {"path": path, "state": "present", "format": fmt, "virtual-size": size,
                             "options": {k: normalize_option(fmt, k, v) for k, v in options.items()}}
    if backing_file:
        after["backing-filename"] = backing_file
    if encryption is not None:
        after["encryption"] = enc.summary(encryption)
    what = "convert %s%s (%s) into %s image %s%s" % (source.path, " snapshot '%s'" % snapshot if snapshot else "",
                                                     source.format, fmt, path, ", compressed" if compress else "")
    if dest.exists:
        what = "rewrite %s: %s" % (path, what)
    params = {"source": source.path, "source_format": src_format or source.format, "format": fmt,
              "options": dict(options), "compress": compress, "backing_file": backing_file, "snapshot": snapshot,
              "encryption": encryption, "source_encryption": source_encryption}
    return [Action(CONVERT, path, what, properties(dest), after, params)]


def _convert_matches(dest: ObservedImage, fmt: str, options: Dict[str, Any], backing_file: Optional[str],
                     size: int) -> bool:
    if dest.format != fmt or round_up(dest.virtual_size or 0, 512) != size:
        return False
    if (backing_file or None) != (dest.backing_file or None):
        return False
    return all(dest.options.get(k) in (None, normalize_option(fmt, k, v)) for k, v in options.items())
