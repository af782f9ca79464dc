"""Saved plans: ``vdisk plan --out FILE`` writes one, ``vdisk apply FILE`` applies exactly it.

A saved plan records what the plan was made from -- each manifest's SHA-256, and for every image
a fingerprint of the files its plan read (the image, its local source, its backing file: stat
data that any write, resize, chmod, chown, delete or re-create changes) -- and the actions
planned.  Applying it loads the same manifests, plans again under the apply lock, and refuses,
changing nothing, unless the manifests, the fingerprints and the actions are all as saved (as
``terraform apply PLANFILE`` refuses a stale plan).  The fresh plan, equal to the saved one, is
what runs.
"""
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ImageError
from ..state.batch import ImagePlan
from ..state.image import backing_path
from ..units import format_size
from .load import MAX_MANIFEST_BYTES, Entry, Loaded

PLAN_VERSION = 1
KEY = "vdisk_plan"
# the stat fields that change when a file is written, resized, re-created, chmod-ed or chown-ed
STAT_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns", "st_mode", "st_uid", "st_gid")


@dataclass
class SavedPlan:
    """A plan file as read back."""
    path: str
    manifests: List[Dict[str, str]]       # {"path": absolute, "name": as given, "sha256": hex}
    allow_paths: List[str]
    cache: Optional[str]
    images: List[Dict[str, Any]]          # {"manifest", "index", "name", "files", "actions"}

    @property
    def manifest_paths(self) -> List[str]:
        return [m["path"] for m in self.manifests]


def file_digest(path: str) -> Optional[str]:
    """SHA-256 of a manifest's bytes (None when it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def file_state(path: str) -> Dict[str, Any]:
    """A file's fingerprint: ``{"exists": False}`` or its stat fields (``lstat``: a swapped symlink shows)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"exists": False}
    except OSError as exc:
        return {"exists": None, "error": exc.strerror or str(exc)}
    return dict({"exists": True}, **{name[3:]: getattr(st, name) for name in STAT_FIELDS})


def image_files(entry: Entry) -> Dict[str, Dict[str, Any]]:
    """The fingerprint of every local file an image's plan reads, keyed by path."""
    spec = entry.spec
    paths = [spec.path, spec.source, backing_path(spec)]
    return {path: file_state(path) for path in paths if path}


Fingerprints = Dict[Tuple[str, int], Dict[str, Dict[str, Any]]]


def fingerprints(entries: Sequence[Entry]) -> Fingerprints:
    """Every image's :func:`image_files`, keyed by (manifest, index).  Taken *before* planning: a file
    that changes while it is observed then differs from its fingerprint, and the plan is stale."""
    return {_key(e.manifest, e.index): _plain(image_files(e)) for e in entries}


def _key(manifest: str, index: int) -> Tuple[str, int]:
    """An image's key: a plan applied from another directory names its manifests by absolute path."""
    return os.path.abspath(manifest), index


def _actions(plan: ImagePlan) -> List[Dict[str, Any]]:
    """The actions as JSON data (what is compared: kind, path, before and after, parameters)."""
    return _plain([dict(a.to_dict(), params=a.params) for a in plan.actions])


def _plain(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def plan_document(loaded: Loaded, plans: Sequence[ImagePlan], taken: Fingerprints, allow_paths: Sequence[str],
                  cache: Optional[str], shown: Dict[str, Any]) -> Dict[str, Any]:
    """The saved plan: what it was made from, the fingerprints, the actions and *shown* (the JSON plan)."""
    manifests = [{"path": os.path.abspath(m), "name": m, "sha256": file_digest(m) or ""} for m in loaded.manifests]
    images = [{"manifest": p.entry.manifest, "index": p.entry.index, "name": p.entry.name,
               "files": taken[_key(p.entry.manifest, p.entry.index)], "before": _plain(p.before),
               "actions": _actions(p)} for p in plans]
    return {KEY: PLAN_VERSION, "manifests": manifests, "allow_paths": [os.path.abspath(d) for d in allow_paths],
            "cache": os.path.abspath(cache) if cache else None, "images": images, "plan": shown}


def write_plan(path: str, document: Dict[str, Any]) -> None:
    """Write the plan file beside its destination and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path)[:100], suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def read_plan(path: str) -> Optional[SavedPlan]:
    """The saved plan in *path*, or None when *path* is not one (a manifest)."""
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError:
        return None     # the manifest loader reports it
    if not head.lstrip().startswith(b"{") or KEY.encode() not in head:
        return None
    try:
        data = json.loads(head.decode("utf-8"))
    except ValueError:
        return None     # a flow-style YAML manifest that merely mentions the key
    if not isinstance(data, dict) or KEY not in data:
        return None
    if data[KEY] != PLAN_VERSION:
        raise ImageError("a plan of version %r: this vdisk applies version %d plans; make the plan again"
                         % (data[KEY], PLAN_VERSION), path=path)
    try:
        return SavedPlan(path, list(data["manifests"]), list(data["allow_paths"]), data.get("cache"),
                         list(data["images"]))
    except (KeyError, TypeError):
        raise ImageError("not a complete vdisk plan (make the plan again)", path=path) from None


def stale_reasons(saved: SavedPlan, plans: Sequence[ImagePlan], taken: Fingerprints) -> List[str]:
    """Why the saved plan no longer holds (empty: it holds), each reason one line; *taken* are the
    fingerprints taken before *plans* were made."""
    reasons = []
    for manifest in saved.manifests:
        if file_digest(manifest["path"]) != manifest["sha256"]:
            reasons.append("%s changed since the plan was made" % manifest["name"])
    if reasons:
        return reasons
    fresh = {_key(p.entry.manifest, p.entry.index): p for p in plans}
    paths = {m["name"]: m["path"] for m in saved.manifests}
    for image in saved.images:
        label = "%s: images[%d] (%s)" % (image["manifest"], image["index"], image["name"])
        key = (paths.get(image["manifest"], image["manifest"]), image["index"])
        plan = fresh.pop(key, None)
        if plan is None:
            reasons.append("%s is no longer in the manifest" % label)
            continue
        reasons.extend("%s: %s" % (label, why) for why in _drift(image, plan, taken.get(key, {})))
    return reasons


def _drift(saved: Dict[str, Any], plan: ImagePlan, now: Dict[str, Dict[str, Any]]) -> List[str]:
    """The differences of one image: its files, then (only if they are unchanged) its actions."""
    out = []
    for path, before in saved["files"].items():
        after = now.get(path, {"exists": False})
        if after == before:
            continue
        if before.get("exists") and not after.get("exists"):
            out.append("%s was deleted since the plan was made" % path)
        elif after.get("exists") and not before.get("exists"):
            out.append("%s was created since the plan was made" % path)
        else:
            image = _image_changes(saved.get("before") or {}, _plain(plan.before)) if path == plan.entry.spec.path \
                else []
            what = ", ".join(image) or _what_changed(before, after)
            out.append("%s changed since the plan was made (%s)" % (path, what))
    if not out and _actions(plan) != saved["actions"]:
        out.append("its actions differ from the plan's")
    return out


def _image_changes(before: Dict[str, Any], after: Dict[str, Any]) -> List[str]:
    """What the image shows differently (qemu-img info's keys), as ``key old -> new``."""
    out = []
    for key in ("format", "virtual-size", "backing-filename", "backing-filename-format", "snapshots", "options"):
        old, new = before.get(key), after.get(key)
        if old != new:
            out.append("%s %s -> %s" % (key, _shown(key, old), _shown(key, new)))
    return out


def _shown(key: str, value: Any) -> str:
    if value is None or value == [] or value == {}:
        return "none"
    if key == "virtual-size" and isinstance(value, int):
        return format_size(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join("%s=%s" % (k, v) for k, v in sorted(value.items()))
    return str(value)


def _what_changed(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    changed = []
    if before.get("size") != after.get("size"):
        changed.append("size %s -> %s" % (format_size(before.get("size") or 0), format_size(after.get("size") or 0)))
    if before.get("mode") != after.get("mode"):
        changed.append("mode %04o -> %04o" % ((before.get("mode") or 0) & 0o7777, (after.get("mode") or 0) & 0o7777))
    if (before.get("uid"), before.get("gid")) != (after.get("uid"), after.get("gid")):
        changed.append("owner %s:%s -> %s:%s" % (before.get("uid"), before.get("gid"), after.get("uid"),
                                                 after.get("gid")))
    if (before.get("dev"), before.get("ino")) != (after.get("dev"), after.get("ino")):
        changed.append("replaced by another file")
    if not changed and before.get("mtime_ns") != after.get("mtime_ns"):
        changed.append("written to")
    return ", ".join(changed) or "its metadata changed"
