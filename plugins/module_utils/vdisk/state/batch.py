"""The batch planner: plan and apply a list of validated images in dependency order.

Every front end that changes several images at once uses this one planner: ``vdisk plan|apply``
(through ``manifest.run``) and the ``vdisk.images.manifest`` module.  It knows nothing of YAML or
of manifest files: it takes validated entries -- objects with ``spec`` (an ``ImageSpec``),
``attributes`` (owner, group, mode as an int), ``depends`` (positions of the entries it needs:
its backing file, its source; all earlier in the list), ``name`` (as the user wrote the path)
and ``label`` (how messages name it) -- as ``manifest.load.Entry`` is.

Planning observes each image (``state.observe``) and asks ``state.plan`` for its actions; an
image made from a source or on a backing file that the same run makes first is planned against
the predicted state of that image (``state.plan.predict``), so one plan shows the whole run --
check mode on an empty directory included.  File attributes (owner, group, mode) are one more
action, ``attributes``.  Applying re-plans each image just before running its actions (its
dependencies exist by then), stops at the first failure and reports what was done, what failed
and what was not done.

An image made from an http(s) source (``state.download``) is planned from the download cache when
it holds the file (*downloads*), else with its size unknown; applying fetches and verifies the file
first, then plans the image again from it, so its size (a grow, or the refusal to shrink) is known
before anything is converted.
"""
import contextlib
import grp
import os
import pwd
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from ..driver import Policy
from ..errors import HostIOError, ImageError
from ..units import shown
from . import download
from .apply import apply_action
from .download import DownloadSettings
from .image import LocalCopy, plan_one, policy_for, widen
from .observe import ObservedImage, observe
from .plan import CONVERT, CREATE, REPLACE, Action, predict, properties
from .spec import ImageSpec

ATTRIBUTES = "attributes"
MAX_ID = 0xFFFFFFFE          # uid_t and gid_t; 0xFFFFFFFF (-1) means "unchanged" to chown


class Entry(Protocol):
    """What the planner needs of one validated image (``manifest.load.Entry`` is one)."""
    spec: ImageSpec
    attributes: Dict[str, Any]
    depends: List[int]
    name: str

    @property
    def label(self) -> str:
        ...


@dataclass
class ImagePlan:
    """The plan of one image of a batch: its actions and properties before and after them."""
    entry: Entry
    actions: List[Action] = field(default_factory=list)
    before: Dict[str, Any] = field(default_factory=dict)
    after: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    error_field: Optional[str] = None     # the spec field the error is about, when it names one

    @property
    def changed(self) -> bool:
        return bool(self.actions)


@dataclass
class Report:
    """What ``apply`` did: the actions done (per image), the one that failed, and those not done."""
    done: List[Tuple[Entry, Action]] = field(default_factory=list)
    failed: Optional[Tuple[Entry, Optional[Action], str]] = None
    not_done: List[Tuple[Entry, Action]] = field(default_factory=list)
    plans: List[ImagePlan] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed is None


def plan_all(entries: Sequence[Entry], policy: Optional[Policy] = None,
             downloads: Optional[DownloadSettings] = None) -> List[ImagePlan]:
    """The plan of every image of *entries* (in dependency order); one that cannot be planned carries ``error``.
    *downloads*: its cache directory holds the URL sources already downloaded (nothing is downloaded)."""
    policy = with_cache(policy, downloads)
    lookup = cache_lookup(downloads)
    plans: List[ImagePlan] = []
    for entry in entries:
        plans.append(plan_entry(entry, plans, policy, lookup))
    return plans


def with_cache(policy: Optional[Policy], downloads: Optional[DownloadSettings]) -> Policy:
    """*policy* (default: the engine's) with the download cache directory allowed: images are converted from it."""
    if downloads is None or not downloads.cache_dir:
        return policy or Policy()
    return widen(policy, (os.path.realpath(downloads.cache_dir),))


def cache_lookup(downloads: Optional[DownloadSettings]) -> LocalCopy:
    """Where a planner finds a URL source: the verified file in the download cache, if any."""
    return lambda url, checksum: download.cached(checksum, downloads)


def plan_entry(entry: Entry, earlier: List[ImagePlan], policy: Policy,
               local_copy: Optional[LocalCopy] = None) -> ImagePlan:
    """Plan one image; *earlier* are the plans of the images before it (its dependencies among them);
    *local_copy* finds the verified local file of a URL source (none: its size is not known)."""
    spec = entry.spec
    result = ImagePlan(entry)
    for position in entry.depends:
        if position < len(earlier) and earlier[position].error:
            result.error = "not planned: %s (which it depends on) has an error" % earlier[position].entry.name
            return result
    policy = policy_for(spec, policy)
    try:
        observed, actions = plan_one(spec, policy,
                                     lambda path, fmt, pol: _dependency(path, fmt, earlier, pol), local_copy)
        result.before = properties(observed)
        result.after = predict(result.before, actions)
        attributes = _plan_attributes(entry, observed, actions)
        if attributes is not None:
            actions.append(attributes)
            result.after.update(attributes.after)
        result.actions = actions
    except ImageError as exc:
        result.error_field = exc.field
        result.error = exc.message if exc.field is None or exc.message.startswith(exc.field + ":") else \
            "%s: %s" % (exc.field, exc.message)
    return result


def _dependency(path: str, fmt: Optional[str], earlier: List[ImagePlan], policy: Policy) -> ObservedImage:
    """The image at *path* as it will be when the dependent image is made: predicted if this run makes it."""
    path = os.path.normpath(path)     # "vms/../golden/base.qcow2" before vms/ exists
    key = os.path.realpath(path)
    for item in earlier:
        if os.path.realpath(item.entry.spec.path) == key and item.actions:
            after = item.after
            return ObservedImage(path=path, exists=after.get("state") == "present", format=after.get("format"),
                                 virtual_size=after.get("virtual-size"), options=dict(after.get("options") or {}),
                                 backing_file=after.get("backing-filename"),
                                 backing_format=after.get("backing-filename-format"),
                                 encryption=after.get("encryption"))
    return observe(path, fmt, policy)


def _plan_attributes(entry: Entry, observed: ObservedImage, actions: List[Action]) -> Optional[Action]:
    wanted = entry.attributes
    if not wanted or entry.spec.state == "absent":
        return None
    made = not observed.exists or any(a.kind in (CREATE, CONVERT, REPLACE) for a in actions)
    current: Dict[str, Any] = {}
    if not made:
        st = os.stat(entry.spec.path)
        current = {"mode": "%04o" % (st.st_mode & 0o7777), "owner": st.st_uid, "group": st.st_gid}
    before: Dict[str, Any] = {}
    after: Dict[str, Any] = {}
    if "mode" in wanted and current.get("mode") != "%04o" % wanted["mode"]:
        before["mode"], after["mode"] = current.get("mode"), "%04o" % wanted["mode"]
    for name in ("owner", "group"):
        if name in wanted:
            number = resolve_owner(wanted[name], group=name == "group")
            if current.get(name) != number:
                before[name], after[name] = current.get(name), number
    if not after:
        return None
    changes = ", ".join("%s %s -> %s" % (k, before[k], after[k]) for k in sorted(after))
    return Action(ATTRIBUTES, entry.spec.path, "set %s of %s" % (changes, entry.spec.path), before, after,
                  dict(after))


def _apply_attributes(action: Action) -> None:
    try:
        if "owner" in action.params or "group" in action.params:
            os.chown(action.path, action.params.get("owner", -1), action.params.get("group", -1))
        if "mode" in action.params:
            os.chmod(action.path, int(action.params["mode"], 8))
    except OSError as exc:
        raise HostIOError("could not set file attributes: %s" % (exc.strerror or exc), path=action.path) from None


def _make_parent(path: str) -> None:
    """A batch names where its images go: missing directories (inside the allowed roots) are made."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise HostIOError("could not create the directory %s: %s" % (parent, exc.strerror or exc),
                              path=path) from None


def apply_all(entries: Sequence[Entry], policy: Optional[Policy] = None,
              plans: Optional[List[ImagePlan]] = None, downloads: Optional[DownloadSettings] = None) -> Report:
    """Apply every image's plan in dependency order, stopping at the first failure.

    *plans* (from :func:`plan_all`) are made when not given; when any image cannot be planned,
    nothing is applied (the run fails on that image's error, every action not done).  *downloads*:
    how URL sources are fetched (cache directory, progress).
    """
    policy = with_cache(policy, downloads)
    report = Report(plans=plans if plans is not None else plan_all(entries, policy, downloads))
    errors = [item for item in report.plans if item.error]
    if errors:
        report.failed = (errors[0].entry, None, errors[0].error)
        report.not_done = [(item.entry, a) for item in report.plans for a in item.actions]
        return report
    fresh: List[ImagePlan] = []
    for position, entry in enumerate(entries):
        fresh.append(_apply_entry(entry, fresh, policy, downloads, report))
        if report.failed is not None:
            for later in report.plans[position + 1:]:
                report.not_done.extend((later.entry, a) for a in later.actions)
            break
    return report


def _apply_entry(entry: Entry, earlier: List[ImagePlan], policy: Policy, downloads: Optional[DownloadSettings],
                 report: Report) -> ImagePlan:
    """Plan one image again (the images it depends on exist as this run left them) and run its actions;
    a URL source is fetched first and the image planned from the verified file.  Returns the plan,
    its actions cleared: later images see the image as it is on disk now."""
    current = plan_entry(entry, earlier, policy, cache_lookup(downloads))
    fetching = next((a for a in current.actions if a.params.get("source_url")), None)
    with contextlib.ExitStack() as stack:
        if current.error is None and fetching is not None:
            url, checksum = fetching.params["source_url"], fetching.params["source_checksum"]
            try:
                _make_parent(entry.spec.path)       # the download is written beside the image
                local = stack.enter_context(download.fetch(url, checksum, entry.spec.path, downloads))
            except (ImageError, OSError) as exc:
                report.failed = (entry, fetching, _text(exc))
                report.not_done.extend((entry, a) for a in current.actions if a is not fetching)
                return current
            planned = current.actions
            current = plan_entry(entry, earlier, policy,
                                 lambda u, c: local if (u, c) == (url, checksum) else None)
            if current.error is not None:       # e.g. the download is larger than the size asked for
                report.not_done.extend((entry, a) for a in planned)
        if current.error is not None:
            report.failed = (entry, None, current.error)
            return current
        _run_actions(entry, current.actions, policy_for(entry.spec, policy), downloads, report)
    current.actions = []
    return current


def _run_actions(entry: Entry, actions: List[Action], policy: Policy, downloads: Optional[DownloadSettings],
                 report: Report) -> None:
    """Run one image's actions in order; the first failure is the report's, the actions after it not done."""
    for number, action in enumerate(actions):
        try:
            if action.kind == ATTRIBUTES:
                _apply_attributes(action)
            else:
                if action.kind in (CREATE, CONVERT, REPLACE):
                    _make_parent(action.path)
                apply_action(action, policy, downloads)
        except (ImageError, OSError) as exc:
            report.failed = (entry, action, _text(exc))
            report.not_done.extend((entry, a) for a in actions[number + 1:])
            return
        report.done.append((entry, action))


def _text(exc: BaseException) -> str:
    if isinstance(exc, ImageError):
        return str(exc)
    return "%s%s" % ("%s: " % exc.filename if getattr(exc, "filename", None) else "",
                     getattr(exc, "strerror", None) or exc)


def resolve_owner(value: Any, group: bool = False) -> int:
    """A user (or group) name or number as a numeric id; an unknown name is an :class:`ImageError`."""
    what, kind = ("group", "group") if group else ("owner", "user")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value) if len(value.lstrip("0")) <= 10 else MAX_ID + 1
    if isinstance(value, int):
        if not 0 <= value <= MAX_ID:
            raise ImageError("%s id %s is out of range (0 to %d)" % (kind, shown(value), MAX_ID), field=what)
        return value
    if "\0" in str(value):
        raise ImageError("the %s name contains a NUL byte" % kind, field=what)
    try:
        return grp.getgrnam(value).gr_gid if group else pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ImageError("unknown %s '%s'" % (kind, value), field=what) from None
