"""Plans and apply reports as text (colored on a terminal) and as JSON for pipelines.

Images are named as the manifest writes them (``golden/base.qcow2``), so the output reads the
same on every machine; the JSON carries the resolved paths too.
"""
import json
from typing import Any, Dict, List, Optional, Sequence

from ..state.plan import (AMEND, CONVERT, CREATE, DELETE, GROW, REPLACE, SHRINK, SNAPSHOT_APPLY, SNAPSHOT_CREATE,
                          SNAPSHOT_DELETE, Action)
from ..state.batch import ATTRIBUTES, ImagePlan, Report
from ..units import format_size
from .load import Loaded, Problem

GREEN, YELLOW, RED, BOLD, RESET = "\033[32m", "\033[33m", "\033[31m", "\033[1m", "\033[0m"
JSON_VERSION = 1


def image_change(plan: ImagePlan) -> str:
    """create, replace, delete or update (anything in place) for an image with actions."""
    kinds = [a.kind for a in plan.actions]
    if REPLACE in kinds:
        return "replace"
    if DELETE in kinds:
        return "delete"
    if CREATE in kinds or CONVERT in kinds:
        return "create"
    return "update"


_SYMBOLS = {"create": ("+", GREEN), "delete": ("-", RED), "replace": ("-/+", RED), "update": ("~", YELLOW)}


def summary(plans: Sequence[ImagePlan]) -> Dict[str, int]:
    """How many images each kind of change touches, and how many are unchanged."""
    counts = {"create": 0, "update": 0, "replace": 0, "delete": 0, "unchanged": 0, "error": 0}
    for item in plans:
        counts["error" if item.error else image_change(item) if item.actions else "unchanged"] += 1
    return counts


def _value(key: str, value: Any) -> str:
    if value is None and key == "virtual-size":
        return "size known after the download"      # an image made from a URL not yet in the cache
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if key == "virtual-size" and isinstance(value, int):
        return format_size(value)
    if isinstance(value, dict):
        return ", ".join("%s=%s" % (k, _value(k, v)) for k, v in sorted(value.items())) or "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _changes(before: Dict[str, Any], after: Dict[str, Any], keys: Sequence[str]) -> List[str]:
    return ["%s: %s -> %s" % (k, _value(k, before.get(k)), _value(k, after.get(k)))
            for k in keys if k in after and before.get(k) != after.get(k)]


def action_text(action: Action, names: Dict[str, str]) -> str:
    """One line for one action, with before -> after for what it changes."""
    kind, after, before = action.kind, action.after, action.before
    if kind in (CREATE, CONVERT, REPLACE):
        what = ["%s, %s" % (after.get("format"), _value("virtual-size", after.get("virtual-size")))]
        if after.get("backing-filename"):
            what.append("backing file %s" % after["backing-filename"])
        if action.params.get("source"):
            what.append("content from %s" % names.get(action.params["source"], action.params["source"]))
        if action.params.get("compress"):
            what.append("compressed")
        if after.get("options"):
            what.append("options %s" % _value("options", after["options"]))
        if after.get("encryption"):
            what.append("encrypted (%s)" % _value("encryption", after["encryption"]))
        text = "%s: %s" % ("convert" if kind == CONVERT else kind, "; ".join(what))
        if kind == REPLACE:
            changed = _changes(before, after, ("format", "virtual-size", "backing-filename", "encryption"))
            changed += ["%s: %s -> %s" % (k, _value(k, before.get("options", {}).get(k)), _value(k, v))
                        for k, v in sorted(after.get("options", {}).items())
                        if before.get("options", {}).get(k) not in (None, v)]
            text += " (%s)" % "; ".join(changed) if changed else ""
        return text
    if kind == DELETE:
        return "delete: %s, %s" % (before.get("format"), _value("virtual-size", before.get("virtual-size")))
    if kind in (GROW, SHRINK):
        return "%s: virtual-size %s -> %s" % (kind, _value("virtual-size", before.get("virtual-size")),
                                              _value("virtual-size", after.get("virtual-size")))
    if kind == SNAPSHOT_CREATE:
        return "create snapshot '%s'" % action.params["name"]
    if kind == SNAPSHOT_DELETE:
        return "delete snapshot '%s'" % action.params["name"]
    if kind == SNAPSHOT_APPLY:
        return "revert to snapshot '%s'" % action.params["name"]
    if kind in (AMEND, ATTRIBUTES):
        return "%s: %s" % ("amend" if kind == AMEND else "set",
                           ", ".join("%s %s -> %s" % (k, _value(k, before.get(k)), _value(k, after[k]))
                                     for k in sorted(after)))
    return action.description


def _names(plans: Sequence[ImagePlan]) -> Dict[str, str]:
    return {p.entry.spec.path: p.entry.name for p in plans}


def _paint(text: str, code: str, color: bool) -> str:
    return "%s%s%s" % (code, text, RESET) if color else text


def render_plan_human(plans: Sequence[ImagePlan], color: bool = False, errors: int = 0) -> str:
    """The plan as text: one block per changed image and per image that cannot be planned, then a
    summary line; *errors* counts every problem (the manifests' and the images')."""
    names = _names(plans)
    lines: List[str] = []
    for item in plans:
        if item.error:
            lines.append(_paint("! %s" % item.entry.name, RED + BOLD if color else RED, color))
            lines.append("    error: %s" % item.error)
            continue
        if not item.actions:
            continue
        symbol, code = _SYMBOLS[image_change(item)]
        lines.append(_paint("%s %s" % (symbol, item.entry.name), code + BOLD if color else code, color))
        for action in item.actions:
            lines.append("    %s" % action_text(action, names))
    counts = summary(plans)
    if not lines and not errors:
        return no_changes(counts["unchanged"])
    if lines:
        lines.append("")
    lines.append("Plan: %d to create, %d to update, %d to replace, %d to delete; %d unchanged%s." % (
        counts["create"], counts["update"], counts["replace"], counts["delete"], counts["unchanged"],
        "; %d error%s" % (errors, "" if errors == 1 else "s") if errors else ""))
    return "\n".join(lines)


def no_changes(count: int) -> str:
    """The line of a plan without actions."""
    return "No changes: %d image%s as the manifests describe." % (count, " is" if count == 1 else "s are")


def plan_dict(plans: Sequence[ImagePlan], found: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    """The plan for ``--output=json``: every image planned, and the *found* :func:`diagnostics`."""
    names = _names(plans)
    images = []
    for item in plans:
        entry = item.entry
        images.append({"manifest": entry.manifest, "index": entry.index, "name": entry.name,
                       "path": entry.spec.path,
                       "change": "error" if item.error else image_change(item) if item.actions else "none",
                       "error": item.error,
                       "actions": [dict(a.to_dict(), summary=action_text(a, names)) for a in item.actions],
                       "before": item.before, "after": item.after})
    return {"format_version": JSON_VERSION, "changes": any(p.actions for p in plans), "summary": summary(plans),
            "images": images, "diagnostics": list(found)}


def render_json(data: Dict[str, Any]) -> str:
    """JSON as every vdisk command prints it."""
    return json.dumps(data, indent=2, sort_keys=False, default=str)


def render_report_human(report: Report, color: bool = False) -> str:
    """What apply did, then (on failure) what failed and what was not done."""
    names = _names(report.plans)
    lines: List[str] = []
    for entry, action in report.done:
        lines.append("%s %s: %s" % (_paint("done", GREEN, color), entry.name, action_text(action, names)))
    if report.failed is not None:
        entry, action, message = report.failed
        what = action_text(action, names) if action else "plan"
        lines.append("%s %s: %s: %s" % (_paint("FAILED", RED, color), entry.name, what, message))
        for entry, action in report.not_done:
            lines.append("%s %s: %s" % (_paint("not done", YELLOW, color), entry.name, action_text(action, names)))
        lines.append("")
        lines.append("Apply failed: %d action%s done, 1 failed, %d not done." % (
            len(report.done), "" if len(report.done) == 1 else "s", len(report.not_done)))
    elif report.done:
        lines.append("")
        lines.append("Apply complete: %d action%s done." % (len(report.done), "" if len(report.done) == 1 else "s"))
    else:
        lines.append(no_changes(len(report.plans)))
    return "\n".join(lines)


def report_dict(report: Report, found: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    """The apply report for ``--output=json``, with the *found* :func:`diagnostics` that stopped it."""
    names = _names(report.plans)

    def one(entry, action):
        out = {"manifest": entry.manifest, "index": entry.index, "name": entry.name, "path": entry.spec.path}
        if action is not None:
            out.update(action=action.kind, summary=action_text(action, names))
        return out
    failed = None
    if report.failed is not None:
        failed = dict(one(report.failed[0], report.failed[1]), error=report.failed[2])
    ok = report.ok and not found
    return {"format_version": JSON_VERSION, "ok": ok, "done": [one(e, a) for e, a in report.done],
            "failed": failed, "not_done": [one(e, a) for e, a in report.not_done], "diagnostics": list(found)}


def validate_dict(loaded: Loaded) -> Dict[str, Any]:
    """``vdisk validate --output=json``."""
    return {"format_version": JSON_VERSION, "valid": loaded.valid, "manifests": loaded.manifests,
            "images": len(loaded.entries), "problems": [p.to_dict() for p in loaded.problems],
            "diagnostics": diagnostics(loaded, [])}


def plan_problem(plan: ImagePlan) -> Problem:
    """An image that cannot be planned, as a :class:`Problem` of its manifest (with the image's line)."""
    entry, message, field = plan.entry, plan.error or "", plan.error_field
    if field and message.startswith(field + ": "):
        message = message[len(field) + 2:]
    return Problem(entry.manifest, message, entry.index, entry.name, field, getattr(entry, "line", None))


def diagnostics(loaded: Loaded, plans: Sequence[ImagePlan]) -> List[Dict[str, Any]]:
    """Every problem of the manifests and every image that cannot be planned, in manifest order (by
    manifest, then line), as ``--output=json`` lists them: severity, manifest, index, path (the
    image's path as written), field, line, message, and text (the one line stderr shows)."""
    problems = list(loaded.problems) + [plan_problem(p) for p in plans if p.error]
    position = {name: number for number, name in enumerate(loaded.manifests)}
    problems.sort(key=lambda p: (position.get(p.manifest, len(position)), p.line or 0))
    return [diagnostic(p.message, str(p), p.manifest, p.index, p.image, p.field, p.line, p.severity)
            for p in problems]


def diagnostic(message: str, text: Optional[str] = None, manifest: Optional[str] = None,
               index: Optional[int] = None, path: Optional[str] = None, field: Optional[str] = None,
               line: Optional[int] = None, severity: str = "error") -> Dict[str, Any]:
    """One item of ``diagnostics`` (docs/schemas/plan-output.schema.json); *text* defaults to *message*."""
    return {"severity": severity, "manifest": manifest, "index": index, "path": path, "field": field, "line": line,
            "message": message, "text": text or message}
