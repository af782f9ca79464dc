"""Load and validate manifests: YAML, the JSON Schema, each image's spec, paths, duplicates, dependencies.

A manifest file is read with PyYAML's safe loader (``marked_yaml``: every mapping and list knows its
lines) and checked against the JSON Schema with jsonschema (``schema_check``); both packages are
imported only when a file is read, so that the Ansible module, which validates its ``images`` data
with :func:`load_data`, runs on managed hosts with only the standard library.

Every problem of every manifest is collected (``vdisk validate`` reports them all at once) and
sorted in manifest order: by the manifest's position on the command line, then by line.  Each names
the file, the line, the image (``images[INDEX]`` and the path as written) and the field.  The images
without problems are :class:`Entry` objects in dependency order -- an image comes after the images
of the manifests that are its backing file or its source -- even when other images have problems:
the planner plans them and shows the problems beside.
"""
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..errors import ImageError, MissingPackage
from ..state.image import backing_path
from ..state.spec import FIELDS, ImageSpec, image_spec
from .marked_yaml import TOO_DEEP, YAMLProblem, int_text, line_of, load_marked
from .schema_check import SchemaProblem, schema_problems, show_value

# file attributes: manifest (and role) fields the state layer leaves to the caller
ATTRIBUTES = ("owner", "group", "mode")
# a manifest larger than this is refused before it is read (docs/manifest.md); so is one nested
# deeper than MAX_DEPTH levels (a manifest needs five: the document, images, an image, its
# options, a list in them), and one that its aliases expand to more than MAX_NODES nodes
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 1000000
# the fields that name files: the file system must be able to take them
FILE_FIELDS = ("path", "source", "backing_file")
# the schema's x-error for defaults.path (tests/unit/test_manifest_schema.py checks they agree)
PATH_IN_DEFAULTS = "path is not taken in defaults: every image names its own"


@dataclass
class Problem:
    """One thing wrong with a manifest; ``str()`` is the one line users see."""
    manifest: str
    message: str
    index: Optional[int] = None        # images[index]; None for the file or its top-level keys
    image: Optional[str] = None        # the image's path as written
    field: Optional[str] = None        # "size", "options.cluster_size", "defaults.format", ...
    line: Optional[int] = None         # of the offending key or image; None for the whole file (or data)
    severity: str = "error"

    def __str__(self) -> str:
        parts = [self.manifest]
        if self.line:
            parts.append("line %d" % self.line)
        if self.index is not None:
            parts.append("images[%d]%s" % (self.index, " (%s)" % self.image if self.image else ""))
        # "path is required" names its field already
        if self.field and not self.message.startswith((self.field + ":", self.field + " ")):
            parts.append(self.field)
        return "%s: %s" % (": ".join(parts), self.message)

    def to_dict(self) -> Dict[str, Any]:
        """The problem for ``--output=json``."""
        return {"severity": self.severity, "manifest": self.manifest, "line": self.line, "index": self.index,
                "image": self.image, "field": self.field, "message": self.message, "text": str(self)}


@dataclass
class Entry:
    """One image of a manifest, validated."""
    manifest: str                      # the manifest file as named on the command line
    index: int
    name: str                          # the image's path as written in the manifest
    spec: ImageSpec                    # paths resolved against the manifest's directory
    attributes: Dict[str, Any] = field(default_factory=dict)   # owner, group, mode (mode as an int)
    depends: List[int] = field(default_factory=list)           # positions in Loaded.entries (backing, source)
    line: Optional[int] = None         # where the image's mapping starts; None for load_data's images
    lines: Dict[str, int] = field(default_factory=dict, repr=False, compare=False)   # of each field written

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


def load_manifests(paths: Sequence[str], allow_paths: Sequence[str] = ()) -> Loaded:
    """Read and validate every manifest in *paths*; *allow_paths* are directories outside the
    manifests' own directories that images may be in (``--allow-path``).

    Needs PyYAML and jsonschema: when one is missing, each manifest gets one problem naming it."""
    return _combine(list(paths), [_check_file(path, allow_paths) for path in paths], allow_paths)


def load_data(images: Any, defaults: Optional[Dict[str, Any]] = None, base_dir: Optional[str] = None,
              allow_paths: Sequence[str] = (), name: str = "images") -> Loaded:
    """Validate a manifest given as data -- its ``images`` list and ``defaults`` -- as the Ansible
    module gets them; problems name *name* where they would name a file.  Relative paths are
    relative to *base_dir* (default: the current directory), which is allowed as a manifest's
    directory is; so are *allow_paths*.

    Needs neither PyYAML nor jsonschema: the data is already parsed, Ansible's argument spec makes
    ``images`` a list of dicts and ``defaults`` a dict, and each image's fields are checked by
    ``state.spec.image_spec`` (which refuses unknown fields and values of the wrong type) -- the
    checks and messages of :func:`load_manifests` after its schema.  An integer ``mode`` is the
    numeric mode, as Ansible's file module takes it (Ansible's YAML reads ``0640`` as 416; a manifest
    file, whose text is known, refuses a decimal ``640``)."""
    base = os.path.abspath(base_dir or os.getcwd())
    doc: Dict[str, Any] = {"version": 1, "images": images}
    if defaults:
        doc["defaults"] = defaults
    checked = _Checked()
    if _too_deep(doc):
        checked.problems.append(Problem(name, TOO_DEEP % MAX_DEPTH))
    else:
        _check_doc(name, doc, base, allow_paths, _data_problems(images, defaults), checked)
    return _combine([name], [checked], allow_paths)


class _Claim(NamedTuple):
    """An image's claim on a file, for duplicate detection: made whatever else is wrong with the image."""
    manifest: str
    index: int
    name: Optional[str]
    real: str                          # the real path its ``path`` names
    line: Optional[int]                # of its ``path``
    entry: Optional[Entry]             # the image's entry, when it is valid otherwise


@dataclass
class _Checked:
    """What one manifest gave: its problems, its valid images, the files its images name, its allowed roots."""
    problems: List[Problem] = field(default_factory=list)
    entries: List[Entry] = field(default_factory=list)
    claims: List[_Claim] = field(default_factory=list)
    roots: List[str] = field(default_factory=list)


def _check_file(path: str, allow_paths: Sequence[str]) -> _Checked:
    """Read one manifest file and check all of it."""
    checked = _Checked()
    try:
        text = read_manifest(path)
    except _TooLarge as exc:
        checked.problems.append(Problem(path, str(exc)))
        return checked
    except (OSError, UnicodeDecodeError) as exc:
        checked.problems.append(Problem(path, "could not read the manifest: %s"
                                        % (getattr(exc, "strerror", None) or exc)))
        return checked
    try:
        doc = load_marked(text, MAX_DEPTH, MAX_NODES)
        if doc is None:
            checked.problems.append(Problem(path, "the manifest is empty: expected a mapping with version and images"))
            return checked
        found = schema_problems(doc)
    except YAMLProblem as exc:
        checked.problems.append(Problem(path, exc.message, line=exc.line))
        return checked
    except MissingPackage as exc:
        checked.problems.append(Problem(path, exc.message))
        return checked
    _check_doc(path, doc, os.path.dirname(os.path.abspath(path)), allow_paths, found, checked)
    return checked


def _data_problems(images: Any, defaults: Any) -> List[SchemaProblem]:
    """What the schema would say of the module's data that neither Ansible's argument spec nor
    image_spec says as well: a wrong structure (for callers other than Ansible), unknown fields
    (image_spec's list of known fields leaves out owner, group and mode), ``path`` in defaults."""
    found: List[SchemaProblem] = []

    def add(location: Tuple[Any, ...], message: str) -> None:
        found.append(SchemaProblem(location, message, location))

    known = FIELDS + ATTRIBUTES
    if defaults is not None and not isinstance(defaults, dict):
        add(("defaults",), "expected a mapping, got %s" % show_value(defaults))
    elif defaults:
        for key in defaults:
            if key not in known:
                add(("defaults", key), "unknown field '%s' (known: %s)" % (key, ", ".join(known)))
        if "path" in defaults:
            add(("defaults",), PATH_IN_DEFAULTS)
    if not isinstance(images, list):
        add(("images",), "expected a list, got %s" % show_value(images))
        return found
    for index, image in enumerate(images):
        if not isinstance(image, dict):
            add(("images", index), "expected a mapping, got %s" % show_value(image))
            continue
        for key in image:
            if key not in known:
                add(("images", index, key), "unknown field '%s' (known: %s)" % (key, ", ".join(known)))
    return found


def _check_doc(name: str, doc: Any, base: str, allow_paths: Sequence[str], found: List[SchemaProblem],
               checked: _Checked) -> None:
    """Check one manifest's data given the schema's problems *found*: *name* names it in problems,
    relative paths are relative to *base*.  An image the schema faults is not checked further (one
    mistake, one problem) but still claims its file; so is every image when the defaults are faulty."""
    checked.problems.extend(_schema_problem(name, doc, problem) for problem in found)
    if not isinstance(doc, dict):
        return
    faulty_images = {p.location[1] for p in found if len(p.location) > 1 and p.location[0] == "images"}
    faulty_defaults = any(p.location[:1] == ("defaults",) for p in found)
    checked.roots = _roots(name, doc, base, allow_paths, checked.problems)
    images = doc.get("images")
    images = images if isinstance(images, list) else []
    settled = None if faulty_defaults else _defaults(name, base, doc.get("defaults"), checked.problems)
    for index, image in enumerate(images):
        entry = None
        if settled is not None and index not in faulty_images:
            entry = _entry(name, index, image, base, settled, checked)
        claim = _claim(name, index, image, base, entry)
        if claim is not None:
            checked.claims.append(claim)
        if entry is not None:
            checked.entries.append(entry)


def _schema_problem(name: str, doc: Any, found: SchemaProblem) -> Problem:
    """A schema problem as a manifest's Problem: an image's, with its index and path, or the document's."""
    where, line = found.location, line_of(doc, found.at)
    if len(where) > 1 and where[0] == "images" and isinstance(where[1], int):
        return Problem(name, found.message, where[1], _name(doc["images"][where[1]]), _dotted(where[2:]) or None,
                       line)
    return Problem(name, found.message, field=_dotted(where) or None, line=line)


def _roots(name: str, doc: Dict[str, Any], base: str, allow_paths: Sequence[str],
           problems: List[Problem]) -> List[str]:
    """The directories the manifest's files may be in: its own, *allow_paths*, its ``allow_paths``."""
    roots = [os.path.realpath(base)] + [os.path.realpath(d) for d in allow_paths]
    extra = doc.get("allow_paths")
    for number, directory in enumerate(extra if isinstance(extra, list) else []):
        if not isinstance(directory, str) or not directory:
            continue            # the schema's problem
        unusable = _unusable_file_name(directory, "directory")
        if unusable:
            problems.append(Problem(name, unusable, field="allow_paths[%d]" % number,
                                    line=line_of(doc, ("allow_paths", number))))
        else:
            roots.append(os.path.realpath(os.path.join(base, os.path.expanduser(directory))))
    return roots


class _Settled(NamedTuple):
    """The defaults, checked: image fields (merged under each image's) and file attributes."""
    fields: Dict[str, Any]
    attributes: Dict[str, Any]


def _defaults(name: str, base: str, defaults: Any, problems: List[Problem]) -> Optional[_Settled]:
    """The defaults checked once (not again for every image); None when they have a problem."""
    defaults = defaults if isinstance(defaults, dict) else {}
    fields = dict(defaults)
    attributes = {k: fields.pop(k) for k in ATTRIBUTES if k in fields}
    try:
        attributes = _attributes(attributes, defaults)
    except _BadField as exc:
        problems.append(Problem(name, exc.message, field="defaults.%s" % exc.field,
                                line=line_of(defaults, (exc.field,))))
        return None
    # options are only checked against a format the defaults name (images may each name theirs)
    own = {k: fields[k] for k in ("format", "options", "preallocation", "encryption") if k in fields and "format" in fields}
    if own.get("format") == "luks" and "encryption" not in own:
        # a luks image needs encryption, which each image may give: the defaults' own fields are checked as if given
        own["encryption"] = {"passphrase_file": "-"}
    try:
        image_spec(dict(own, path="defaults"), base_dir=base)
    except ImageError as exc:
        problems.append(Problem(name, exc.message, field="defaults.%s" % exc.field if exc.field else "defaults",
                                line=_field_line(defaults, exc.field)))
        return None
    return _Settled(fields, attributes)


def _entry(name: str, index: int, image: Dict[str, Any], base: str, settled: _Settled,
           checked: _Checked) -> Optional[Entry]:
    """One image checked: its spec, file attributes and paths; None (and its problems) when it has any."""
    label = _name(image)

    def fault(message: str, what: Optional[str]) -> None:
        checked.problems.append(Problem(name, message, index, label, what, _field_line(image, what)))

    fields = dict(image)
    attributes = {k: fields.pop(k) for k in ATTRIBUTES if k in fields}
    for what in FILE_FIELDS:
        unusable = _unusable_file_name(fields.get(what), "file")
        if unusable:
            fault(unusable, what)
            return None
    try:
        spec = image_spec(fields, base_dir=base, defaults=settled.fields)
        attributes = dict(settled.attributes, **_attributes(attributes, image))
    except ImageError as exc:
        fault(exc.message, exc.field)
        return None
    except _BadField as exc:
        fault(exc.message, exc.field)
        return None
    escaped = _escaping(spec, checked.roots, base)
    for what, message in escaped:
        fault(message, what)
    if escaped:
        return None
    return Entry(name, index, label or spec.path, spec, attributes, line=getattr(image, "line", None),
                 lines=dict(getattr(image, "key_lines", {})))


def _field_line(mapping: Any, what: Optional[str]) -> Optional[int]:
    """The line of field *what* in an image (or the defaults): its key, else its key among the
    image's options (image_spec names a create option by its own name), else the key of a dotted
    field in its mapping (``encryption.cipher_alg``), else the image's."""
    if what and isinstance(mapping, dict) and what not in mapping and isinstance(mapping.get("options"), dict) \
            and what in mapping["options"]:
        return line_of(mapping, ("options", what))
    head, dot, rest = (what or "").partition(".")
    if dot and isinstance(mapping, dict) and isinstance(mapping.get(head), dict) and rest in mapping[head]:
        return line_of(mapping, (head, rest))       # encryption.cipher_alg
    return line_of(mapping, (what,) if what else ())


def _claim(name: str, index: int, image: Any, base: str, entry: Optional[Entry]) -> Optional[_Claim]:
    """The file an image's ``path`` names, when it is a usable file name (whatever else is wrong)."""
    path = image.get("path") if isinstance(image, dict) else None
    if isinstance(path, int) and not isinstance(path, bool):
        path = str(path)
    if not isinstance(path, str) or not path or _unusable_file_name(path, "file"):
        return None
    real = os.path.realpath(os.path.join(base, os.path.expanduser(path)))
    return _Claim(name, index, _name(image), real, line_of(image, ("path",)), entry)


def _unusable_file_name(value: Any, what: str) -> Optional[str]:
    """Why text cannot name a file (a NUL byte; a character the file system encoding cannot
    take, such as a lone surrogate from a YAML escape), or None."""
    if not isinstance(value, str):
        return None
    if "\0" in value:
        return "the %s name contains a NUL byte" % what
    try:
        os.fsencode(value)
    except UnicodeError as exc:
        return "the %s name contains %s, which no file name can hold" % (
            what, ascii(value[exc.start:exc.end]) if isinstance(exc, UnicodeEncodeError) else "invalid text")
    return None


def _combine(names: List[str], checked: Sequence[_Checked], allow_paths: Sequence[str]) -> Loaded:
    """The manifests' results as one :class:`Loaded`: duplicates across all of them found, the
    valid entries in dependency order, the problems in manifest order."""
    problems = [p for one in checked for p in one.problems]
    duplicates = _duplicates([claim for one in checked for claim in one.claims])
    problems.extend(problem for problem, _entry in duplicates)
    taken = {id(entry) for _problem, entry in duplicates if entry is not None}
    entries = [e for one in checked for e in one.entries if id(e) not in taken]
    ordered = _order(entries, problems)
    allowed = [os.path.realpath(d) for d in allow_paths] + [root for one in checked for root in one.roots]
    return Loaded(names, ordered, _in_manifest_order(problems, names), tuple(dict.fromkeys(allowed)))


def _in_manifest_order(problems: List[Problem], names: List[str]) -> List[Problem]:
    """Sorted by the manifest's position on the command line, then line (whole-file problems first),
    then image (for data, which has no lines), then as found (the sort is stable)."""
    position: Dict[str, int] = {}
    for number, name in enumerate(names):
        position.setdefault(name, number)
    return sorted(problems, key=lambda p: (position.get(p.manifest, len(names)), p.line or 0,
                                           -1 if p.index is None else p.index))


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
        out += "[%d]" % part if isinstance(part, int) and not isinstance(part, bool) else \
            ("." if out else "") + str(part)
    return out


class _BadField(Exception):
    """A file attribute that is not valid: its field and the message."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.field = name
        self.message = message


def _attributes(attrs: Dict[str, Any], written: Mapping[str, Any]) -> Dict[str, Any]:
    """owner and group as given (a name or an id), mode as an int; *written* is the mapping they
    were read from (a manifest's marked mapping tells how an integer mode was written)."""
    out = {k: v for k, v in attrs.items() if v is not None}
    for name in ("owner", "group"):
        value = out.get(name)
        if name in out and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise _BadField(name, "expected a string or an integer, got %s" % show_value(value))
        if isinstance(value, str) and "\0" in value:
            raise _BadField(name, "the %s name contains a NUL byte" % ("user" if name == "owner" else name))
    if "mode" in out:
        out["mode"] = _mode(out["mode"], int_text(written, "mode"))
    return out


def _mode(value: Any, text: Optional[str]) -> int:
    """A mode as an int: an octal string ('0640', '640', '0o640'), or an integer.  YAML reads
    ``mode: 0640`` as the octal number 416 but ``mode: 640`` as decimal 640 (mode 1200): when the
    manifest's *text* of the number is known, only octal with a leading 0 is taken."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _BadField("mode", "expected a string or an integer, got %s" % show_value(value))
    if isinstance(value, str):
        match = re.match(r"^(?:0o|0)?([0-7]{3,4})$", value)
        if not match:
            raise _BadField("mode", "invalid mode %s: expected an octal number such as '0640' (symbolic modes are "
                                    "not supported)" % show_value(value))
        return int(match.group(1), 8)
    if text is not None and not re.match(r"^[-+]?0[0-7_]*$", text):
        raise _BadField("mode", _not_octal(text))
    if not 0 <= value <= 0o7777:
        raise _BadField("mode", "invalid mode %s: expected 0 to 07777" % (text or "%o" % value))
    return value


def _not_octal(text: str) -> str:
    """The message for an integer mode not written in octal (YAML read it as another base)."""
    digits = text.replace("_", "")
    if re.match(r"^[0-7]{3,4}$", digits):
        return "%s is read as a decimal number: write '0%s' (quoted) or 0%s for an octal mode" % (text, digits, digits)
    if re.match(r"^[+-]?[0-9]+$", digits):
        return "%s is read as a decimal number: write an octal mode such as '0640' (quoted) or 0640" % text
    return "%s is not an octal number: write an octal mode such as '0640' (quoted) or 0640" % text


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


def _duplicates(claims: Sequence[_Claim]) -> List[Tuple[Problem, Optional[Entry]]]:
    """A problem for every image naming the same file (the same real path) as an earlier one, in
    any manifest, with the entry of the image that repeats it."""
    first: Dict[str, _Claim] = {}
    found: List[Tuple[Problem, Optional[Entry]]] = []
    for claim in claims:
        earlier = first.setdefault(claim.real, claim)
        if earlier is claim:
            continue
        other = "images[%d]" % earlier.index if earlier.manifest == claim.manifest else \
            "%s: images[%d]%s" % (earlier.manifest, earlier.index, " (%s)" % earlier.name if earlier.name else "")
        found.append((Problem(claim.manifest, "the same file as %s" % other, claim.index, claim.name, "path",
                              claim.line), claim.entry))
    return found


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
                        entry.index, entry.name, what, entry.lines.get(what, entry.line)))
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
                                            % chain, entry.index, entry.name, what,
                                            entry.lines.get(what, entry.line)))
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
