"""Load and validate manifests: YAML, the JSON Schema, each image's spec, paths, duplicates, dependencies.

Every problem of every manifest is collected (``vdisk validate`` reports them all at once); each
names the file, the image (``images[INDEX]`` and the path as written) and the field.  A manifest
without problems gives one :class:`Entry` per image, in dependency order: an image comes after
the images of the manifests that are its backing file or its source.
"""
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ImageError
from ..schema import manifest_schema
from ..schema.validator import validate
from ..state.image import backing_path
from ..state.spec import ImageSpec, image_spec
from .yamlload import YAMLSyntaxError, load_yaml

# file attributes: manifest (and role) fields the state layer leaves to the caller
ATTRIBUTES = ("owner", "group", "mode")
# a manifest larger than this is refused before it is read (docs/manifest.md); so is one nested
# deeper than MAX_DEPTH levels (a manifest needs five: the document, images, an image, its
# options, a list in them)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64


@dataclass
class Problem:
    """One thing wrong with a manifest; ``str()`` is the one line users see."""
    manifest: str
    message: str
    index: Optional[int] = None        # images[index]; None for the file or its top-level keys
    image: Optional[str] = None        # the image's path as written
    field: Optional[str] = None        # "size", "options.cluster_size", "defaults.format", ...
    line: Optional[int] = None         # YAML syntax errors

    def __str__(self) -> str:
        parts = [self.manifest]
        if self.line:
            parts.append("line %d" % self.line)
        if self.index is not None:
            parts.append("images[%d]%s" % (self.index, " (%s)" % self.image if self.image else ""))
        if self.field and not self.message.startswith(self.field + ":"):
            parts.append(self.field)
        return "%s: %s" % (": ".join(parts), self.message)

    def to_dict(self) -> Dict[str, Any]:
        """The problem for ``--output=json``."""
        return {"manifest": self.manifest, "line": self.line, "index": self.index, "image": self.image,
                "field": self.field, "message": self.message, "text": str(self)}


@dataclass
class Entry:
    """One image of a manifest, validated."""
    manifest: str                      # the manifest file as named on the command line
    index: int
    name: str                          # the image's path as written in the manifest
    spec: ImageSpec                    # paths resolved against the manifest's directory
    attributes: Dict[str, Any] = field(default_factory=dict)   # owner, group, mode (mode as an int)
    depends: List[int] = field(default_factory=list)           # positions in Loaded.entries (backing, source)

    @property
    def label(self) -> str:
        return "%s: images[%d] (%s)" % (self.manifest, self.index, self.name)


@dataclass
class Loaded:
    """The images of all manifests in dependency order, and every problem found."""
    manifests: List[str]
    entries: List[Entry]
    problems: List[Problem]
    allowed_dirs: Tuple[str, ...] = ()     # manifest directories and allowed paths (real paths)

    @property
    def valid(self) -> bool:
        return not self.problems


def load_manifests(paths: Sequence[str], allow_paths: Sequence[str] = (), pyyaml: Optional[bool] = None) -> Loaded:
    """Read and validate every manifest in *paths*; *allow_paths* are directories outside the
    manifests' own directories that images may be in (``--allow-path``)."""
    problems: List[Problem] = []
    entries: List[Entry] = []
    allowed: List[str] = [os.path.realpath(d) for d in allow_paths]
    schema = manifest_schema()
    for path in paths:
        entries.extend(_load_one(path, schema, allow_paths, problems, allowed))
    _check_duplicates(entries, problems)
    ordered = _order(entries, problems)
    return Loaded(list(paths), ordered, problems, tuple(dict.fromkeys(allowed)))


def load_data(images: Any, defaults: Optional[Dict[str, Any]] = None, base_dir: Optional[str] = None,
              allow_paths: Sequence[str] = (), name: str = "images") -> Loaded:
    """Validate a manifest given as data -- its ``images`` list and ``defaults`` -- as
    :func:`load_manifests` validates a file (the same schema, checks and messages; problems name
    *name* where they would name the file).  Relative paths are relative to *base_dir* (default:
    the current directory), which is allowed as a manifest's directory is; so are *allow_paths*."""
    problems: List[Problem] = []
    allowed: List[str] = [os.path.realpath(d) for d in allow_paths]
    doc: Dict[str, Any] = {"version": 1, "images": images}
    if defaults:
        doc["defaults"] = defaults
    base = os.path.abspath(base_dir or os.getcwd())
    if _too_deep(doc):
        problems.append(Problem(name, "the manifest's structure is too deep (nested more than %d levels)" % MAX_DEPTH))
        entries: List[Entry] = []
    else:
        entries = _load_doc(name, doc, base, manifest_schema(), allow_paths, problems, allowed)
    _check_duplicates(entries, problems)
    ordered = _order(entries, problems)
    return Loaded([name], ordered, problems, tuple(dict.fromkeys(allowed)))


def _load_one(path: str, schema: Dict[str, Any], allow_paths: Sequence[str], problems: List[Problem],
              allowed: List[str]) -> List[Entry]:
    try:
        text = read_manifest(path)
    except _TooLarge as exc:
        problems.append(Problem(path, str(exc)))
        return []
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(path, "could not read the manifest: %s" % (getattr(exc, "strerror", None) or exc)))
        return []
    try:
        doc = load_yaml(text, path)
        too_deep = _too_deep(doc)
    except YAMLSyntaxError as exc:
        message = exc.message.split(": ", 1)[1] if exc.line else exc.message
        problems.append(Problem(path, "invalid YAML: %s" % message, line=exc.line))
        return []
    except RecursionError:
        too_deep = True
    if too_deep:
        problems.append(Problem(path, "the manifest's structure is too deep (nested more than %d levels)" % MAX_DEPTH))
        return []
    return _load_doc(path, doc, os.path.dirname(os.path.abspath(path)), schema, allow_paths, problems, allowed)


def _load_doc(path: str, doc: Any, base: str, schema: Dict[str, Any], allow_paths: Sequence[str],
              problems: List[Problem], allowed: List[str]) -> List[Entry]:
    """Validate one manifest's data (*path* names it in problems; relative paths are relative to *base*)."""
    found = validate(doc, schema)
    images = doc.get("images") if isinstance(doc, dict) else None
    images = images if isinstance(images, list) else []
    bad_images = set()
    bad_defaults = False
    for problem in found:
        where = problem.location
        if len(where) >= 2 and where[0] == "images" and isinstance(where[1], int):
            bad_images.add(where[1])
            problems.append(Problem(path, problem.message, where[1], _name(images[where[1]]),
                                    _dotted(where[2:]) or None))
        else:
            bad_defaults = bad_defaults or (bool(where) and where[0] == "defaults")
            problems.append(Problem(path, problem.message, field=_dotted(where) or None))
    if found and not isinstance(doc, dict):
        return []
    roots = [os.path.realpath(base)] + [os.path.realpath(d) for d in allow_paths]
    for number, extra in enumerate((doc.get("allow_paths") or []) if not bad_defaults and
                                   isinstance(doc.get("allow_paths"), list) else []):
        if isinstance(extra, str) and "\0" in extra:
            problems.append(Problem(path, "the directory name contains a NUL byte", field="allow_paths[%d]" % number))
        elif isinstance(extra, str):
            roots.append(os.path.realpath(os.path.join(base, os.path.expanduser(extra))))
    allowed.extend(roots)
    defaults = dict(doc.get("defaults") or {})
    default_attrs = {k: defaults.pop(k) for k in ATTRIBUTES if k in defaults}
    if not bad_defaults:
        bad_defaults = not _check_defaults(path, base, defaults, problems)
    entries: List[Entry] = []
    for index, fields in enumerate(images):
        if index in bad_images or bad_defaults:
            continue
        fields = dict(fields)
        attrs = dict(default_attrs)
        attrs.update({k: fields.pop(k) for k in ATTRIBUTES if k in fields})
        name = _name(fields)
        try:
            spec = image_spec(fields, base_dir=base, defaults=defaults)
        except ImageError as exc:
            problems.append(Problem(path, exc.message, index, name, exc.field))
            continue
        try:
            attributes = _attributes(attrs)
        except ValueError as exc:
            problems.append(Problem(path, str(exc.args[1]), index, name, exc.args[0]))
            continue
        escaped = _escaping(spec, roots, base)
        for what, message in escaped:
            problems.append(Problem(path, message, index, name, what))
        if not escaped:
            entries.append(Entry(path, index, name, spec, attributes))
    return entries


def _check_defaults(path: str, base: str, defaults: Dict[str, Any], problems: List[Problem]) -> bool:
    """The defaults' format, options and preallocation, checked once (not again for every image)."""
    # options are only checked against a format the defaults name (images may each name theirs)
    own = {k: defaults[k] for k in ("format", "options", "preallocation") if k in defaults and "format" in defaults}
    try:
        image_spec(dict(own, path="defaults"), base_dir=base)
    except ImageError as exc:
        problems.append(Problem(path, exc.message, field="defaults.%s" % exc.field if exc.field else "defaults"))
        return False
    return True


def _name(fields: Any) -> Optional[str]:
    value = fields.get("path") if isinstance(fields, dict) else None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return None
    # as messages show it: on one line, a NUL or a newline in it escaped
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


class _TooLarge(Exception):
    """The manifest is over MAX_MANIFEST_BYTES."""


def read_manifest(path: str) -> str:
    """The manifest's text, reading at most MAX_MANIFEST_BYTES + 1 bytes.

    A regular file over the limit is refused from its size, unread.  Anything else named as a
    manifest (a pipe, ``/dev/stdin``, a device) is opened without blocking -- a FIFO nobody writes
    to reads as empty instead of hanging the open -- then read to its end or past the limit."""
    limit = MAX_MANIFEST_BYTES
    over = "the manifest is larger than %s%%s; refused" % (
        "%d MiB" % (limit >> 20) if limit % (1 << 20) == 0 else "%d bytes" % limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if stat.S_ISREG(st.st_mode) and st.st_size > limit:
            raise _TooLarge(over % (" (%d bytes)" % st.st_size))
        os.set_blocking(fd, True)       # a pipe with a writer is read to its end
        chunks: List[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise _TooLarge(over % "")
    finally:
        os.close(fd)
    # as open(encoding="utf-8") reads it: universal newlines
    return b"".join(chunks).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _too_deep(doc: Any) -> bool:
    """Whether *doc* nests lists and mappings deeper than MAX_DEPTH (walked without recursion)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def _dotted(location: Sequence[Any]) -> str:
    out = ""
    for part in location:
        out += "[%d]" % part if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _attributes(attrs: Dict[str, Any]) -> Dict[str, Any]:
    """owner/group as given; mode as an int (an octal string such as '0640', or a number as YAML read it)."""
    out = {k: v for k, v in attrs.items() if v is not None}
    for name in ("owner", "group"):
        if isinstance(out.get(name), str) and "\0" in out[name]:
            raise ValueError(name, "the %s name contains a NUL byte" % ("user" if name == "owner" else name))
    mode = out.get("mode")
    if isinstance(mode, str):
        if not re.match(r"^0?[0-7]{3,4}$", mode):
            raise ValueError("mode", "invalid mode %r: expected an octal number such as '0640' (symbolic modes are "
                                     "not supported)" % mode)
        out["mode"] = int(mode, 8)
    if isinstance(out.get("mode"), int) and not 0 <= out["mode"] <= 0o7777:
        raise ValueError("mode", "invalid mode %o" % out["mode"])
    return out


def _inside(path: str, roots: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _escaping(spec: ImageSpec, roots: Sequence[str], base: str) -> List[Tuple[str, str]]:
    """(field, message) for every file the image names outside the manifest's directory and allowed paths."""
    out = []
    named = [("path", spec.path), ("source", spec.source), ("backing_file", backing_path(spec))]
    for what, path in named:
        if path and not _inside(path, roots):
            out.append((what, "%s is outside the manifest's directory %s: allow its directory with allow_paths "
                              "in the manifest or --allow-path" % (path, base)))
    return out


def _key(path: str) -> str:
    return os.path.realpath(path)


def _check_duplicates(entries: List[Entry], problems: List[Problem]) -> None:
    seen: Dict[str, Entry] = {}
    for entry in entries:
        key = _key(entry.spec.path)
        first = seen.get(key)
        if first is None:
            seen[key] = entry
            continue
        problems.append(Problem(entry.manifest, "the same file as %s" % (
            "images[%d]" % first.index if first.manifest == entry.manifest else first.label),
            entry.index, entry.name, "path"))


def _order(entries: List[Entry], problems: List[Problem]) -> List[Entry]:
    """Entries with backing files and sources after them (stable: manifest order otherwise); cycles are problems."""
    by_path = {}
    for position, entry in enumerate(entries):
        by_path.setdefault(_key(entry.spec.path), position)
    deps: List[List[Tuple[int, str]]] = []
    for entry in entries:
        edges = []
        for what, path in (("backing_file", backing_path(entry.spec)), ("source", entry.spec.source)):
            target = by_path.get(_key(path)) if path else None
            if target is not None:
                edges.append((target, what))
                other = entries[target]
                if other.spec.state == "absent" and entry.spec.state == "present":
                    problems.append(Problem(entry.manifest, "%s is deleted by %s (state: absent)" % (
                        other.name, "images[%d]" % other.index if other.manifest == entry.manifest else other.label),
                        entry.index, entry.name, what))
        deps.append(edges)
    # cycles: depth-first search, each cycle reported once at the image listed first in it
    state = [0] * len(entries)
    reported = set()

    def visit(node: int, stack: List[int]) -> None:
        state[node] = 1
        stack.append(node)
        for target, _what in deps[node]:
            if state[target] == 1:
                cycle = stack[stack.index(target):]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    first = min(cycle)
                    cycle = cycle[cycle.index(first):] + cycle[:cycle.index(first)]
                    entry = entries[first]
                    what = [w for t, w in deps[first] if t == cycle[(1 % len(cycle))]][0]
                    chain = " -> ".join(entries[i].name for i in cycle + [first])
                    problems.append(Problem(entry.manifest, "dependency cycle through backing files and sources: %s"
                                            % chain, entry.index, entry.name, what))
            elif state[target] == 0:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for node in range(len(entries)):
        if state[node] == 0:
            visit(node, [])
    if reported:
        return entries
    # stable topological order: always the earliest listed image whose dependencies are placed
    placed: List[int] = []
    done = set()
    while len(placed) < len(entries):
        for node in range(len(entries)):
            if node not in done and all(t in done for t, _w in deps[node]):
                placed.append(node)
                done.add(node)
                break
    new_position = {old: new for new, old in enumerate(placed)}
    out = []
    for old in placed:
        entry = entries[old]
        entry.depends = [new_position[t] for t, _w in deps[old]]
        out.append(entry)
    return out
