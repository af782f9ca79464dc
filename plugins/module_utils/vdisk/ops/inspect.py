"""``vdisk inspect``: what an untrusted image is and what it would make vdisk open.

The report an image-upload pipeline runs first: the detected format, every format the
file is valid as (a polyglot is refused), every file the image refers to with the policy's
verdict on it, and named checks that pass or fail.  Nothing named by the image is opened
unless the policy allows it, and nothing is ever written.
"""
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..driver import Policy
from ..errors import ImageError
from ..registry import get_driver, probe_header, probe_scores
from .chain import close_chain, is_raw_view, open_image, open_reference

# the checks of a report, in order, with what each one asserts
CHECKS = (
    ("regular-file", "the file is a regular file (not a device, FIFO or directory)"),
    ("single-format", "the content is valid as at most one format (no polyglot)"),
    ("declared-format", "the declared format is the detected one"),
    ("header", "the image opens: its header, tables and sizes are within the format's limits"),
    ("references", "every file the image names is inside the allowed directories, not a protocol or json: "
                   "name, and a regular file"),
    ("backing-chain", "the backing chain opens: allowed files, recorded formats, no loop, depth within the limit"),
)

# a drive letter, a UNC or a volume path ("\\\\?\\Volume{...}"): what Windows tools store in parent locators
_WINDOWS_ABSOLUTE = re.compile(r"^([A-Za-z]:|\\\\|//)")


@dataclass
class Reference:
    """One file an image names."""
    image: str              # the image whose metadata names it
    kind: str               # backing file, data file, extent, parent locator
    name: str               # as stored in the image
    path: Optional[str]     # the host path it resolves to (None when refused before resolving)
    allowed: bool
    followed: bool = False  # opened by the backing-chain check
    problem: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {"image": self.image, "kind": self.kind, "name": self.name, "path": self.path,
                "allowed": self.allowed, "followed": self.followed, "problem": self.problem}


@dataclass
class Report:
    filename: str
    format: Optional[str] = None
    declared_format: Optional[str] = None
    matches: List[str] = field(default_factory=list)
    references: List[Reference] = field(default_factory=list)
    checks: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def safe(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append({"name": name, "passed": passed, "detail": detail})

    def to_json(self) -> Dict[str, Any]:
        return {"filename": self.filename, "format": self.format, "declared-format": self.declared_format,
                "format-matches": self.matches, "references": [r.to_json() for r in self.references],
                "checks": self.checks, "safe": self.safe}


def inspect_image(path: str, fmt: Optional[str] = None, policy: Optional[Policy] = None) -> Report:
    """Inspect *path* (declared format *fmt*, if any) under *policy* (default: its own directory tree)."""
    base = policy or Policy()
    policy = base.with_root(path)      # the verdicts on named files; opens re-root *base* themselves
    report = Report(filename=path, declared_format=fmt)
    if fmt is not None:
        get_driver(fmt)     # an unknown declared format is a usage error, not a failed check
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ImageError("Could not open '%s': %s" % (path, exc.strerror or exc), path=path) from None
    if not stat.S_ISREG(mode):
        report.check("regular-file", False, "not a regular file; refused without opening it")
        for name, dummy in CHECKS[1:]:
            report.check(name, False, "not checked: not a regular file")
        return report
    report.check("regular-file", True, "a regular file")

    matches = [name for dummy, name in probe_scores(probe_header(path), path) if name != "raw"]
    report.matches = matches
    report.format = matches[0] if matches else "raw"
    if len(matches) > 1:
        report.check("single-format", False, "valid as %s: a polyglot is never opened on a guess"
                     % " and ".join(matches))
    else:
        report.check("single-format", True, "valid as %s only" % report.format)
    if fmt is None:
        report.check("declared-format", True, "no format declared; detected %s" % report.format)
    elif fmt == report.format or fmt in matches or (fmt == "raw" and all(is_raw_view(m) for m in matches)):
        report.check("declared-format", True, "declared %s, detected %s" % (fmt, report.format))
    else:
        report.check("declared-format", False, "declared %s, but the content is %s" % (fmt, report.format))

    used = fmt or report.format
    _collect_references(report, path, used, policy)
    try:
        image = open_image(path, used, writable=False, policy=base, backing=False)
        image.close()
        report.check("header", True, "opens as %s" % used)
    except ImageError as exc:
        report.check("header", False, str(exc))
    refused = [r for r in report.references if not r.allowed]
    if refused:
        report.check("references", False, "; ".join(r.problem or r.name for r in refused))
    else:
        report.check("references", True, "%d file(s) named, all allowed" % len(report.references))
    _check_chain(report, path, used, base)
    return report


def _collect_references(report: Report, path: str, fmt: str, policy: Policy, checked=None) -> None:
    """Add the files the image at *path* names, each with the policy's verdict (nothing is opened).
    *checked*: the ``ResolvedPath`` *path* was opened as, when an image named it (a backing file)."""
    refs = getattr(get_driver(fmt), "references", None)
    try:
        named = (refs(path) if checked is None else refs(path, checked=checked)) if refs else []
    except ImageError:
        named = []      # an unreadable header fails the "header" check
    if not refs:
        bare = policy.replace(allowed_dirs=())
        try:
            image = (open_image(path, fmt, writable=False, policy=bare, backing=False) if checked is None
                     else open_reference(checked, fmt, False, bare))
        except ImageError:
            return
        try:
            named = [("backing file", image.backing_filename)] if image.backing_filename else []
        finally:
            image.close()
    for kind, name in named:
        if kind == "parent locator" and _WINDOWS_ABSOLUTE.match(name):
            report.references.append(Reference(path, kind, name, None, False, problem="parent locator %r is a "
                                               "Windows absolute path (parent locators are never followed)" % name))
            continue
        # W2ru ".\\parent.vhd" is judged as the POSIX path it means
        host_name = name.replace("\\", "/") if kind == "parent locator" else name
        try:
            # the one rule the opens use (Policy.resolve): the verdict is on the path that would be opened
            ref = policy.resolve(host_name, path, kind)
            report.references.append(Reference(path, kind, name, ref.real, True))
        except ImageError as exc:
            report.references.append(Reference(path, kind, name, None, False, problem=exc.message))


def _check_chain(report: Report, path: str, fmt: str, policy: Policy) -> None:
    """Open the whole chain read-only under the policy; list what the backing images name."""
    if not any(r.kind == "backing file" for r in report.references):
        report.check("backing-chain", True, "no backing file")
        return
    try:
        image = open_image(path, fmt, writable=False, policy=policy, backing=True)
    except ImageError as exc:
        report.check("backing-chain", False, str(exc))
        return
    try:
        depth = 0
        layer = image
        while layer.backing is not None:
            depth += 1
            for ref in report.references:
                if ref.image == layer.path and ref.kind == "backing file":
                    ref.followed = True
            _collect_references(report, layer.backing.path, layer.backing.driver.name, policy.with_root(path),
                                checked=layer.backing.opened_as)
            layer = layer.backing
        report.check("backing-chain", True, "%d backing image(s), all allowed" % depth)
    finally:
        close_chain(image)


def render_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=4)


def render_human(report: Report) -> str:
    lines = ["image: %s" % report.filename, "detected format: %s" % (report.format or "unknown")]
    if report.declared_format:
        lines.append("declared format: %s" % report.declared_format)
    lines.append("format matches: %s" % (", ".join(report.matches) or "none (raw)"))
    lines.append("referenced files:" if report.references else "referenced files: none")
    for ref in report.references:
        verdict = ("followed" if ref.followed else "allowed") if ref.allowed else "refused: %s" % ref.problem
        lines.append("    %s %r (in %s) -> %s [%s]" % (ref.kind, ref.name, ref.image, ref.path or "-", verdict))
    lines.append("checks:")
    for c in report.checks:
        lines.append("    %s %-16s %s" % ("pass" if c["passed"] else "FAIL", c["name"], c["detail"]))
    lines.append("result: %s" % ("safe" if report.safe else "unsafe"))
    return "\n".join(lines)


def dump_structures(path: str, fmt: Optional[str] = None, policy: Optional[Policy] = None) -> List[str]:
    """``vdisk inspect --dump``: the on-disk structures of the image (opened read-only, its backing
    chain not followed), one line per field, for debugging."""
    image = open_image(path, fmt, policy=policy, backing=False)
    try:
        lines: List[str] = []
        for title, offset, rec in image.structures():
            lines.append("%s (%s, %d bytes at 0x%x):" % (title, type(rec).__name__, rec.SIZE, offset))
            lines.extend("  " + line for line in rec.dump(offset))
        if not lines:
            lines.append("%s: no structures declared for format %s" % (path, image.driver.name))
        return lines
    finally:
        close_chain(image)
