"""``vdisk validate|plan|apply [--output=human|json] [--allow-path DIR] MANIFEST.yml ...``.

Exit codes (Terraform's detailed exit codes for plan): validate 0 valid, 1 problems; plan 0 no
changes, 2 changes pending, 1 error; apply 0 done (or nothing to do), 1 error or failed action.
Problems go to stderr as ``vdisk: <command>: <file>: images[i] (<path>): <field>: <message>``,
one per line, all of them; with ``--output=json`` the JSON on stdout carries them too.
"""
import argparse
import os
import sys
from typing import Callable, List, Optional, Type

from .load import load_manifests
from .render import (plan_dict, problem_lines, render_json, render_plan_human, render_report_human, report_dict,
                     validate_dict)
from .run import apply_all, plan_all


def use_color(stream) -> bool:
    """Color on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR") \
        and os.environ.get("TERM") != "dumb"


def run(name: str, argv: List[str], usage_error: Type[Exception] = SystemExit,
        out: Optional[Callable[[str], None]] = None) -> int:
    """Run ``vdisk NAME ARGV`` (NAME: validate, plan or apply); returns the exit status."""
    stdout = sys.stdout
    write = out or (lambda text: stdout.write(text + "\n"))

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise usage_error(message)

    p = _Parser(prog="vdisk %s" % name)
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="images, sources and backing files may also be under DIR")
    color = p.add_mutually_exclusive_group()
    color.add_argument("--color", dest="color", action="store_true", default=None)
    color.add_argument("--no-color", dest="color", action="store_false")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST.yml")
    args = p.parse_args(argv)
    colored = use_color(stdout) if args.color is None else args.color
    colored = colored and args.output == "human"
    loaded = load_manifests(args.manifests, args.allow_path)
    if not loaded.valid:
        if args.output == "json":
            write(render_json(validate_dict(loaded)))
        for line in problem_lines(loaded.problems):
            sys.stderr.write("vdisk: %s: %s\n" % (name, line))
        return 1
    if name == "validate":
        if args.output == "json":
            write(render_json(validate_dict(loaded)))
        else:
            count = len(loaded.entries)
            write("%s: valid (%d image%s)" % (", ".join(args.manifests), count, "" if count == 1 else "s"))
        return 0
    plans = plan_all(loaded)
    errors = [p for p in plans if p.error]
    if errors:
        # apply changes nothing when any image cannot be planned
        for item in errors:
            sys.stderr.write("vdisk: %s: %s: %s\n" % (name, item.entry.label, item.error))
        return 1
    if name == "plan":
        write(render_json(plan_dict(plans)) if args.output == "json" else render_plan_human(plans, colored))
        return 2 if any(p.actions for p in plans) else 0
    report = apply_all(loaded, plans=plans)
    write(render_json(report_dict(report)) if args.output == "json" else render_report_human(report, colored))
    if report.failed is not None:
        entry, _action, message = report.failed
        sys.stderr.write("vdisk: apply: %s: %s\n" % (entry.label, message))
        return 1
    return 0
