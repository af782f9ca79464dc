"""``vdisk validate|plan|apply [--output=human|json] [--allow-path DIR] MANIFEST.yml ...``.

Exit codes (Terraform's detailed exit codes for plan): validate 0 valid, 1 problems; plan 0 no
changes, 2 changes pending, 1 error; apply 0 done (or nothing to do), 1 error or failed action.

Every problem of every manifest and every image that cannot be planned is reported in one run:
one line each on stderr (``vdisk: <command>: <file>: line N: images[i] (<path>): <field>:
<message>``), and with ``--output=json`` as ``diagnostics`` in the one JSON document that
stdout always gets.  ``plan --out FILE`` saves the plan; ``apply FILE`` applies exactly a saved
plan, refusing a stale one.  ``apply`` holds the apply lock (``manifest.lock``) for its run.
"""
import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Type

from ..errors import ImageError
from ..units import format_size
from . import saved as saved_plans
from .load import Loaded, load_manifests
from .lock import apply_lock, parse_timeout
from .render import (diagnostic, diagnostics, plan_dict, render_json, render_plan_human, render_report_human,
                     report_dict, validate_dict)
from .run import apply_all, plan_all


def use_color(stream) -> bool:
    """Color on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR") \
        and os.environ.get("TERM") != "dumb"


DESCRIPTIONS = {
    "validate": "Check manifests (YAML, schema, image specs, paths, duplicates, dependencies); exit 0 valid, 1 "
                "problems (all listed).",
    "plan": "Show what apply would change; exit 0 no changes, 2 changes pending, 1 errors (every image still "
            "planned).",
    "apply": "Make the images what the manifests (or a saved plan) describe, under the apply lock; exit 0 done, 1 "
             "error.",
}


def _parser(name: str, usage_error: Type[Exception]) -> argparse.ArgumentParser:
    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise usage_error(message)

    p = _Parser(prog="vdisk %s" % name, description=DESCRIPTIONS[name])
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="human: text (problems on stderr); json: one JSON document on stdout, with diagnostics")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="images, sources and backing files may also be under DIR")
    color = p.add_mutually_exclusive_group()
    color.add_argument("--color", dest="color", action="store_true", default=None,
                       help="color the human output even when stdout is not a terminal")
    color.add_argument("--no-color", dest="color", action="store_false",
                       help="no color (also: NO_COLOR set, TERM=dumb)")
    if name in ("plan", "apply"):
        p.add_argument("--cache", metavar="DIR", help="download cache of http(s) sources, keyed by checksum")
    if name == "plan":
        p.add_argument("--out", metavar="FILE", help="save the plan for `vdisk apply FILE`")
    if name == "apply":
        p.add_argument("--lock-timeout", default="0", metavar="SECONDS",
                       help="wait this long for another apply's lock (default 0: fail at once)")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST.yml" if name != "apply" else "MANIFEST.yml|PLAN",
                   help="the manifests (YAML)" + ("; or one plan file saved by `vdisk plan --out`"
                                                   if name == "apply" else ""))
    return p


class _Run:
    """One run of validate, plan or apply: its arguments, output streams and what it found."""

    def __init__(self, name: str, args: argparse.Namespace, write: Callable[[str], None]):
        self.name, self.args, self.write = name, args, write
        self.json = args.output == "json"
        colored = use_color(sys.stdout) if args.color is None else args.color
        self.color = bool(colored) and not self.json

    def error(self, text: str) -> None:
        sys.stderr.write("vdisk: %s: %s\n" % (self.name, text))

    def downloads(self, cache: Optional[str]):
        from ..state.download import DownloadSettings
        return DownloadSettings(cache_dir=cache, progress=_Progress(sys.stderr))


def run(name: str, argv: List[str], usage_error: Type[Exception] = SystemExit,
        out: Optional[Callable[[str], None]] = None) -> int:
    """Run ``vdisk NAME ARGV`` (NAME: validate, plan or apply); returns the exit status."""
    stdout = sys.stdout
    args = _parser(name, usage_error).parse_args(argv)
    this = _Run(name, args, out or (lambda text: stdout.write(text + "\n")))
    try:
        if name == "validate":
            return _validate(this)
        if name == "plan":
            return _plan(this)
        return _apply(this, usage_error)
    except ImageError as exc:
        this.error(str(exc))
        if this.json:
            this.write(render_json({"format_version": 1, "ok": False,
                                    "diagnostics": [diagnostic(str(exc), path=exc.path, field=exc.field)]}))
        return 1


def _report_problems(this: _Run, found: Sequence[Dict[str, Any]]) -> None:
    for item in found:
        this.error(item["text"])


def _validate(this: _Run) -> int:
    loaded = load_manifests(this.args.manifests, this.args.allow_path)
    found = diagnostics(loaded, [])
    _report_problems(this, found)
    if this.json:
        this.write(render_json(validate_dict(loaded)))
    elif loaded.valid:
        count = len(loaded.entries)
        this.write("%s: valid (%d image%s)" % (", ".join(this.args.manifests), count, "" if count == 1 else "s"))
    return 0 if loaded.valid else 1


def _plan(this: _Run) -> int:
    args = this.args
    loaded = load_manifests(args.manifests, args.allow_path)
    taken = saved_plans.fingerprints(loaded.entries)
    plans = plan_all(loaded, downloads=this.downloads(args.cache))
    found = diagnostics(loaded, plans)
    _report_problems(this, found)
    shown = plan_dict(plans, found)
    this.write(render_json(shown) if this.json else render_plan_human(plans, this.color, len(found)))
    if found:
        if args.out:
            this.error("no plan written to %s: the plan has errors" % args.out)
        return 1
    if args.out:
        try:
            saved_plans.write_plan(args.out, saved_plans.plan_document(loaded, plans, taken, args.allow_path,
                                                                       args.cache, shown))
        except OSError as exc:
            raise ImageError("could not write the plan: %s" % (exc.strerror or exc), path=args.out) from None
    return 2 if any(p.actions for p in plans) else 0


def _apply(this: _Run, usage_error: Type[Exception]) -> int:
    args = this.args
    try:
        timeout = parse_timeout(args.lock_timeout)
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    saved = saved_plans.read_plan(args.manifests[0]) if len(args.manifests) == 1 else None
    if saved is not None and (args.allow_path or args.cache):
        raise usage_error("a saved plan is applied with the --allow-path and --cache it was made with")
    manifests = saved.manifest_paths if saved is not None else args.manifests
    allow = saved.allow_paths if saved is not None else args.allow_path
    cache = saved.cache if saved is not None else args.cache
    loaded = load_manifests(manifests, allow)
    if not loaded.valid:
        # refused before the lock is taken: an invalid manifest leaves no lock file behind
        return _refuse(this, loaded, plan_all(loaded), diagnostics(loaded, []), [])
    with apply_lock(manifests[0], timeout):
        loaded = load_manifests(manifests, allow)       # again, under the lock: what is planned is what runs
        taken = saved_plans.fingerprints(loaded.entries)
        downloads = this.downloads(cache)
        plans = plan_all(loaded, downloads=downloads)
        found = diagnostics(loaded, plans)
        stale = saved_plans.stale_reasons(saved, plans, taken) if saved is not None and not found else []
        if found or stale:
            return _refuse(this, loaded, plans, found, stale)
        report = apply_all(loaded, plans=plans, downloads=downloads)
    this.write(render_json(report_dict(report, [])) if this.json else render_report_human(report, this.color))
    if report.failed is not None:
        entry, _action, message = report.failed
        this.error("%s: %s" % (entry.label, message))
        return 1
    return 0


def _refuse(this: _Run, loaded: Loaded, plans, found: List[Dict[str, Any]], stale: List[str]) -> int:
    """Apply changes nothing: the manifests have problems, an image cannot be planned, or the saved plan is stale."""
    _report_problems(this, found)
    for reason in stale:
        this.error("the plan is stale: %s" % reason)
    if this.json:
        from ..state.batch import Report
        report = Report(plans=list(plans))
        report.not_done = [(p.entry, a) for p in plans for a in p.actions]
        stale_found = [diagnostic("the plan is stale: %s" % r) for r in stale]
        this.write(render_json(report_dict(report, found + stale_found)))
    return 1


class _Progress:
    """Download progress on stderr: a line redrawn in place on a terminal; elsewhere (CI logs) a line at
    the start and one at the end of each download."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.shown = -1

    def __call__(self, url: str, done: int, total: Optional[int]) -> None:
        finished = total is not None and done >= total
        if self.tty:
            percent = " (%d%%)" % (100 * done // total) if total else ""
            self.stream.write("\rvdisk: downloading %s: %s%s%s" % (url, format_size(done), " of %s" % format_size(
                total) if total else "", percent) + ("\n" if finished else ""))
        elif done == 0:
            self.stream.write("vdisk: downloading %s%s\n" % (url, " (%s)" % format_size(total) if total else ""))
        elif finished:
            self.stream.write("vdisk: downloaded %s\n" % url)
        self.stream.flush()
