"""The ``vdisk`` command line: qemu-img's commands and flags.

Every failure is one line ``vdisk: <command>: <what is wrong>`` on stderr and a
non-zero exit (1, or the command's own codes: check 2/3/63, compare 1/2).
"""
import argparse
import json
import os
import re
import sys
from typing import Callable, Dict, FrozenSet, List, Optional

from .. import __version__
from ..driver import Policy, merge_option_strings
from ..errors import ImageError, InvalidOption
from ..interrupt import Terminated, signals_raise
from ..ops.chain import close_chain, open_image
from ..registry import DRIVERS, get_driver
from ..units import parse_relative_size, parse_size
from . import secrets

COMMANDS: Dict[str, Callable] = {}


class UsageError(Exception):
    """Bad command-line usage (exit 1, like qemu-img)."""


class HelpShown(Exception):
    """``COMMAND --help`` has printed the command's help: it is done (exit 0)."""


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, sized to the terminal without shutil: argparse makes a formatter for
    every argument added (to check its metavar), and shutil's import costs each command's start-up."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: Optional[int] = None):
        super().__init__(prog, indent_increment, max_help_position, _help_width() if width is None else width)


def _help_width() -> int:
    """What shutil.get_terminal_size gives argparse: $COLUMNS, else the terminal's width, else 80; less 2."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _Parser(argparse.ArgumentParser):
    """argparse with qemu-img's exits: a usage error is one line on stderr and exit 1; ``-h`` and
    ``--help`` print the command's options on stdout and exit 0."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(message)

    def exit(self, status=0, message=None):
        # argparse exits only after printing the help here: its errors go through error()
        raise HelpShown()


# help texts of the flags several commands share
_HELP_QUIET = "quiet: print nothing but errors"
_HELP_FMT = "format of the image (detected from its content when not given)"
_HELP_SHARE = "open the image without taking its locks (read-only commands only)"
_HELP_PROGRESS = "show progress on stdout"
_CACHE_MODES = "none, writeback, writethrough, directsync or unsafe"


def _warn(command_name: str, text: str) -> None:
    """A warning on stderr, one line, as qemu-img's ``qemu-img: warning: ...``."""
    sys.stderr.write("vdisk: %s: warning: %s\n" % (command_name, text))


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def _policy(args, **extra) -> Policy:
    dirs = tuple(os.path.realpath(d) for d in (getattr(args, "allow_path", None) or ()))
    extra.setdefault("block_devices", True)     # the image a command names may be a device: the user named it
    key_secret = getattr(args, "key_secret", None)
    if key_secret is not None:
        extra.setdefault("passphrase", secrets.lookup(_secrets(args), key_secret))
    return Policy(allowed_dirs=dirs, force_share=getattr(args, "force_share", False), **extra)


def _add_secret_options(p: argparse.ArgumentParser, image_opts: bool = True) -> None:
    """qemu-img's ``--object`` (secrets) and, where FILE may carry them, ``--image-opts``."""
    p.add_argument("--object", action="append", metavar="OBJECTDEF",
                   help="a secret for an encrypted image: secret,id=ID,data=SECRET or secret,id=ID,file=PATH"
                        "[,format=raw|base64] (repeatable)")
    if image_opts:
        p.add_argument("--image-opts", action="store_true",
                       help="FILE is QEMU's image options: driver=FMT,key-secret=ID,file.filename=PATH")


def _secrets(args) -> Dict[str, bytes]:
    """The ``--object`` secrets of the command line, parsed once."""
    if getattr(args, "_secret_table", None) is None:
        args._secret_table = secrets.parse_objects(getattr(args, "object", None))
    return args._secret_table


def _image_opts(args, name: str = "filename", fmt: str = "fmt") -> None:
    """With ``--image-opts`` the image argument holds QEMU's options: the file, the format (driver)
    and the id of the secret that unlocks it replace them (``-f`` is then refused, as by qemu-img)."""
    _secrets(args)       # a bad --object is an error even when no image names it
    if not getattr(args, "image_opts", False):
        return
    if getattr(args, fmt, None):
        raise UsageError("--image-opts and --format are mutually exclusive")
    opts = secrets.parse_image_opts(getattr(args, name))
    setattr(args, name, opts.filename)
    setattr(args, fmt, opts.driver)
    args.key_secret = opts.key_secret


def _secret_option_names(specs) -> FrozenSet[str]:
    """The options whose value is the id of a ``--object secret``: every option of type "secret" in
    *specs*, the options of the format at hand (one rule for all of them)."""
    return frozenset(spec.name for spec in specs if spec.type == "secret")


def _resolve_key_secret(args, options: Dict[str, str], path: str, specs) -> Dict[str, object]:
    """``-o NAME=ID`` for every option of type "secret" (``key-secret`` of a new encrypted image, amend's
    ``new-secret``, ``old-secret``...): the secret's bytes instead of its id (see _secret_option_names)."""
    table = _secrets(args)
    resolved: Dict[str, object] = dict(options)
    for name in _secret_option_names(specs):
        if name in resolved:
            resolved[name] = secrets.lookup(table, str(resolved[name]), path, field=name)
    return resolved


def _add_allow_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-path", action="append", metavar="DIR",
                   help="also allow files named by the image (backing files...) under DIR")


def _progress(enabled: bool, stream=None):
    """qemu-img's -p on stdout: a bar redrawn in place on a terminal, one line per percent otherwise."""
    if not enabled:
        return None
    out = stream or sys.stdout
    tty = out.isatty()
    state = {"last": -1.0}

    def report(done: int, total: int) -> None:
        pct = done * 100.0 / total if total else 100.0
        step = round(pct, 1) if tty else float(int(pct))
        if step == state["last"]:
            return
        state["last"] = step
        if tty:
            width = 30
            filled = int(width * pct / 100)
            out.write("\r    (%6.2f/100%%) [%s%s]" % (pct, "#" * filled, "-" * (width - filled)))
            if done >= total:
                out.write("\n")
        else:
            out.write("    (%.2f/100%%)\n" % step)
        out.flush()
    return report


def _out(text: str, quiet: bool = False) -> None:
    if not quiet:
        sys.stdout.write(text + "\n")


# -- create --------------------------------------------------------------------------------
@command("create")
def cmd_create(argv: List[str]) -> int:
    p = _Parser(prog="vdisk create", description="Create the disk image FILE.")
    p.add_argument("-q", action="store_true", dest="quiet", help=_HELP_QUIET)
    p.add_argument("-f", dest="fmt", default="raw", help="format of the new image (default: raw)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="format options NAME=VALUE[,NAME=VALUE...] (repeatable); -o help lists them")
    p.add_argument("-b", dest="backing", metavar="BACKING",
                   help="backing file, stored as given (a relative name is relative to FILE's directory)")
    p.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT", help="format of the backing file")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE and -F are then required)")
    _add_secret_options(p, image_opts=False)
    _add_allow_path(p)
    p.add_argument("filename", nargs="?", help="the new image")
    p.add_argument("size", nargs="?",
                   help="virtual size in bytes, or with a suffix k, M, G, T, P, E (default: the backing file's)")
    args = p.parse_args(argv)
    from ..ops.create import create, describe
    options = merge_option_strings(args.options)
    driver = get_driver(args.fmt)
    if "help" in options:
        _out(driver.options_help())
        return 0
    if not args.filename:
        raise UsageError("Expecting image file name")
    size = parse_size(args.size, "size") if args.size is not None else None
    given = options
    options = _resolve_key_secret(args, options, args.filename, driver.create_options)
    notes: List[str] = []
    # FILE may be the user's block device (raw only); the -b file never is one
    used = create(args.filename, args.fmt, size, options, args.backing, args.backing_fmt, _policy(args),
                  notes=notes, unsafe=args.unsafe)
    if notes:     # what vdisk did beyond qemu-img, in one line
        sys.stderr.write("vdisk: create: %s\n" % "; ".join(notes))
    shown = {k: (given[k] if k in ("key-secret", "encrypt.key-secret") else v) for k, v in used.items()}
    _out(describe(args.filename, args.fmt, shown), args.quiet)     # a secret's id, never its bytes
    return 0


# -- info ----------------------------------------------------------------------------------
@command("info")
def cmd_info(argv: List[str]) -> int:
    p = _Parser(prog="vdisk info", description="Show the format, sizes, backing file and snapshots of an image.")
    p.add_argument("-f", dest="fmt", help=_HELP_FMT)
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="human (default) or json (qemu-img's ImageInfo keys)")
    p.add_argument("--backing-chain", action="store_true", help="also show every image of the backing chain")
    p.add_argument("-U", "--force-share", action="store_true", help=_HELP_SHARE)
    _add_secret_options(p)
    _add_allow_path(p)
    p.add_argument("filename", help="the image")
    args = p.parse_args(argv)
    from ..ops.info import chain_info, image_info, render_human, render_json
    _image_opts(args)
    args.key_secret = None       # info never unlocks an encrypted image (nor does qemu-img's)
    image = open_image(args.filename, args.fmt, policy=_policy(args), backing=True)
    try:
        infos = chain_info(image) if args.backing_chain else [image_info(image)]
    finally:
        close_chain(image)
    if args.output == "json":
        _out(render_json(infos if args.backing_chain else infos[0]))
    else:
        _out("\n\n".join(render_human(i) for i in infos))
    return 0


# -- map -----------------------------------------------------------------------------------
@command("map")
def cmd_map(argv: List[str]) -> int:
    p = _Parser(prog="vdisk map", description="Show which ranges of an image hold data, zeros or nothing.")
    p.add_argument("-f", dest="fmt", help=_HELP_FMT)
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="human (default: the ranges that hold data) or json (every range, as qemu-img)")
    p.add_argument("-U", "--force-share", action="store_true", help=_HELP_SHARE)
    _add_secret_options(p)
    _add_allow_path(p)
    p.add_argument("filename", help="the image")
    args = p.parse_args(argv)
    from ..ops.map import HiddenData, map_entries, render_human, render_json
    _image_opts(args)
    image = open_image(args.filename, args.fmt, policy=_policy(args))
    try:
        entries = map_entries(image)
    finally:
        close_chain(image)
    try:
        _out(render_json(entries) if args.output == "json" else render_human(entries))
    except HiddenData as exc:
        _out(exc.printed)        # what qemu-img prints before its error
        raise
    return 0


# -- convert -------------------------------------------------------------------------------
def _strtol(text: str) -> int:
    """A count as qemu-img reads it (strtol): the leading digits, 0 without any; a long number is
    out of every range checked here (never int() of thousands of digits)."""
    match = re.match(r"\s*([+-]?)0*([0-9]*)", text)
    digits = match.group(2) if match else ""
    if len(digits) > 18:
        return -(1 << 63) if match.group(1) == "-" else (1 << 63) - 1
    return int(match.group(1) + digits) if digits else 0


@command("convert")
def cmd_convert(argv: List[str]) -> int:
    p = _Parser(prog="vdisk convert", description="Copy the guest content of SRC (several are concatenated) "
                "into a new image DST.")
    p.add_argument("-q", action="store_true", dest="quiet", help=_HELP_QUIET)
    p.add_argument("-p", action="store_true", dest="progress", help=_HELP_PROGRESS)
    p.add_argument("-c", action="store_true", dest="compress",
                   help="write compressed clusters (qcow2, qcow, vmdk streamOptimized)")
    p.add_argument("-f", dest="fmt", help="format of the sources (detected when not given)")
    p.add_argument("-O", dest="out_fmt", metavar="OUTPUT_FMT", help="format of DST (default: raw)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="format options of DST, NAME=VALUE[,...] (repeatable); -o help lists them")
    p.add_argument("-B", dest="backing", metavar="BACKING",
                   help="DST gets this backing file and holds only what differs from it")
    p.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT", help="format of the -B backing file")
    p.add_argument("-t", dest="cache", default="unsafe",
                   help="cache mode of DST: %s (default: unsafe, no flush at the end)" % _CACHE_MODES)
    p.add_argument("-T", dest="src_cache", metavar="SRC_CACHE",
                   help="cache mode of the sources (accepted for compatibility)")
    p.add_argument("-S", dest="sparse", metavar="SIZE",
                   help="zero runs of at least SIZE bytes are left unallocated (default 4k; 0: allocate all)")
    p.add_argument("-C", action="store_true", dest="copy_offload", help="copy offloading (accepted; not with -S)")
    p.add_argument("-n", action="store_true", dest="existing", help="write into the existing DST, do not create it")
    p.add_argument("-m", dest="coroutines", type=_strtol, metavar="N",
                   help="parallel requests, 1 to 16 (accepted for compatibility)")
    p.add_argument("-W", action="store_true", dest="out_of_order", help="out-of-order writes (accepted)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                   help="convert this internal snapshot: ID_OR_NAME, snapshot.id=ID or snapshot.name=NAME")
    p.add_argument("-U", "--force-share", action="store_true", help=_HELP_SHARE)
    p.add_argument("--target-is-zero", action="store_true",
                   help="DST already reads as zeros: do not write zeros (needs -n)")
    p.add_argument("--bitmaps", action="store_true",
                   help="also copy the persistent dirty bitmaps of SRC (qcow2 to qcow2)")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps: skip inconsistent bitmaps with a warning instead of failing")
    _add_secret_options(p)
    p.add_argument("--target-image-opts", action="store_true",
                   help="DST (with -n) is QEMU's image options: driver=FMT[,key-secret=ID],file.filename=PATH")
    _add_allow_path(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="the source images, then DST, the new image")
    args = p.parse_intermixed_args(argv)     # options may follow the files, as qemu-img's getopt allows
    if len(args.files) < 2:
        raise UsageError("Expecting one image file name")
    from ..ops.convert import ConvertOptions, convert
    options = merge_option_strings(args.options)
    if "help" in options:
        _out(get_driver(args.out_fmt or "raw").options_help())
        return 0
    if args.backing_fmt and not args.backing:
        raise UsageError("-F (backing format) needs -B")
    if args.target_is_zero and not args.existing:
        raise UsageError("--target-is-zero requires use of -n flag")
    if args.target_image_opts and not args.existing:
        raise UsageError("--target-image-opts requires use of -n flag")
    if args.copy_offload and args.sparse is not None:
        raise UsageError("Cannot enable copy offloading when -S is used")
    if args.coroutines is not None and not 1 <= args.coroutines <= 16:
        raise UsageError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    sources = args.files[:-1]
    if args.image_opts:
        if args.fmt:
            raise UsageError("--image-opts and --format are mutually exclusive")
        parsed = [secrets.parse_image_opts(text) for text in sources]
        if len({(o.driver, o.key_secret) for o in parsed}) > 1:
            raise UsageError("vdisk converts several --image-opts sources only with the same driver and key-secret")
        sources = [o.filename for o in parsed]
        args.fmt, args.key_secret = parsed[0].driver, parsed[0].key_secret
    dest, target_passphrase = args.files[-1], None
    if args.target_image_opts:
        if args.out_fmt:
            raise UsageError("--image-opts and --format are mutually exclusive")
        target = secrets.parse_image_opts(dest)
        dest, args.out_fmt = target.filename, target.driver
        if target.key_secret is not None:
            target_passphrase = secrets.lookup(_secrets(args), target.key_secret, dest)
    options = _resolve_key_secret(args, options, dest, get_driver(args.out_fmt or "raw").create_options)
    opts = ConvertOptions(src_fmt=args.fmt, out_fmt=args.out_fmt or "raw", options=options, compress=args.compress,
                          sparse_size=parse_size(args.sparse or "4k", "-S"), existing=args.existing,
                          target_is_zero=args.target_is_zero, snapshot=args.snapshot, backing=args.backing,
                          backing_fmt=args.backing_fmt, cache=args.cache, copy_offload=args.copy_offload,
                          bitmaps=args.bitmaps, skip_broken_bitmaps=args.skip_broken_bitmaps,
                          target_passphrase=target_passphrase)
    convert(sources, dest, opts, policy=_policy(args),
            progress=_progress(args.progress and not args.quiet), warn=lambda text: _warn("convert", text))
    return 0


# -- check ---------------------------------------------------------------------------------
@command("check")
def cmd_check(argv: List[str]) -> int:
    p = _Parser(prog="vdisk check", description="Check the metadata of an image for consistency. Exit status: "
                "0 clean, 1 check not completed, 2 corruptions, 3 leaked clusters only, 63 format has no check.")
    p.add_argument("-q", action="store_true", dest="quiet", help=_HELP_QUIET)
    p.add_argument("-f", dest="fmt", help=_HELP_FMT)
    p.add_argument("-r", dest="repair", choices=("leaks", "all"),
                   help="repair leaked clusters only (leaks), or every inconsistency (all)")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="human (default) or json (qemu-img's ImageCheck keys)")
    p.add_argument("-U", "--force-share", action="store_true", help=_HELP_SHARE)
    _add_secret_options(p)
    _add_allow_path(p)
    p.add_argument("filename", help="the image")
    args = p.parse_args(argv)
    _image_opts(args)
    from ..errors import UnsupportedFeature
    policy = _policy(args, repair=bool(args.repair), follow_backing=False, check=True)
    image = open_image(args.filename, args.fmt, writable=bool(args.repair), policy=policy, backing=False)
    try:
        try:
            result = image.check(args.repair)
        except UnsupportedFeature as exc:
            if "does not support checks" in str(exc):
                sys.stderr.write("vdisk: check: This image format does not support checks\n")
                return 63
            raise
    finally:
        close_chain(image)
    if not args.quiet:
        for message in result.messages:
            sys.stderr.write(message + "\n")
    if args.output == "json":
        _out(json.dumps(result.to_json(), indent=4))
        return result.exit_code()
    lines = []
    if result.corruptions_fixed or result.leaks_fixed:
        lines.append("The following inconsistencies were found and repaired:\n\n    %d leaked clusters\n"
                     "    %d corruptions\n\nDouble checking the fixed image now..."
                     % (result.leaks_fixed, result.corruptions_fixed))
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if result.corruptions:
            lines.append("\n%d errors were found on the image.\nData may be corrupted, or further writes to the "
                         "image may corrupt it." % result.corruptions)
        if result.leaks:
            lines.append("\n%d leaked clusters were found on the image.\nThis means waste of disk space, but no "
                         "harm to data." % result.leaks)
        if result.check_errors:
            lines.append("\n%d internal errors have occurred during the check." % result.check_errors)
    if result.total_clusters and result.allocated_clusters:
        lines.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters" % (
            result.allocated_clusters, result.total_clusters,
            result.allocated_clusters * 100.0 / result.total_clusters,
            result.fragmented_clusters * 100.0 / result.allocated_clusters,
            result.compressed_clusters * 100.0 / result.allocated_clusters))
    if result.image_end_offset:
        lines.append("Image end offset: %d" % result.image_end_offset)
    _out("\n".join(lines), args.quiet)
    return result.exit_code()


# -- snapshot ------------------------------------------------------------------------------
@command("snapshot")
def cmd_snapshot(argv: List[str]) -> int:
    p = _Parser(prog="vdisk snapshot", description="List, create, apply or delete the internal snapshots of an image.")
    p.add_argument("-q", action="store_true", dest="quiet", help=_HELP_QUIET)
    p.add_argument("-f", dest="fmt", help=_HELP_FMT)
    p.add_argument("-U", "--force-share", action="store_true", help="with -l: open the image without taking its locks")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="with -l: human (default, qemu-img's table) or json (a list of qemu-img's SnapshotInfo)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("-l", action="store_true", dest="list", help="list the snapshots")
    group.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot of the current content")
    group.add_argument("-a", dest="apply", metavar="NAME", help="revert the image to this snapshot")
    group.add_argument("-d", dest="delete", metavar="NAME", help="delete this snapshot")
    _add_secret_options(p)
    _add_allow_path(p)
    p.add_argument("filename", help="the image")
    args = p.parse_args(argv)
    _image_opts(args)
    from ..ops.info import render_json, render_snapshot_table
    writable = not args.list
    image = open_image(args.filename, args.fmt, writable=writable, policy=_policy(args), backing=False)
    try:
        if args.list:
            snaps = image.snapshots()
            if args.output == "json":
                _out(render_json(snaps))
            elif snaps:
                _out("Snapshot list:\n" + "\n".join(render_snapshot_table(snaps)))
        elif args.create is not None:
            image.create_snapshot(args.create)
        elif args.apply is not None:
            try:
                image.apply_snapshot(args.apply)
            except ImageError as exc:
                raise ImageError("Could not apply snapshot '%s': %s" % (args.apply, exc.message),
                                 path=exc.path) from None
        else:
            try:
                image.delete_snapshot(args.delete)
            except ImageError as exc:
                raise ImageError("Could not delete snapshot '%s': %s" % (args.delete, exc.message),
                                 path=exc.path) from None
    finally:
        close_chain(image)
    return 0


# -- resize --------------------------------------------------------------------------------
@command("resize")
def cmd_resize(argv: List[str]) -> int:
    p = _Parser(prog="vdisk resize", description="Change the virtual size of an image.")
    p.add_argument("-q", action="store_true", dest="quiet", help=_HELP_QUIET)
    p.add_argument("-f", dest="fmt", help=_HELP_FMT)
    p.add_argument("--shrink", action="store_true", help="allow a smaller size (the data past it is lost)")
    p.add_argument("--preallocation", default="off", choices=("off", "metadata", "falloc", "full"),
                   help="how the added space is allocated (default: off)")
    _add_secret_options(p)
    _add_allow_path(p)
    p.add_argument("filename", help="the image")
    p.add_argument("size", help="the new size, or +SIZE / -SIZE to grow or shrink by SIZE (suffixes k, M, G, T, ...)")
    # a negative size ("-5G") is the last argument, not an option
    if argv and re.match(r"^-[0-9.]", argv[-1]):
        argv = argv[:-1] + ["--", argv[-1]]
    args = p.parse_args(argv)
    _image_opts(args)
    image = open_image(args.filename, args.fmt, writable=True, policy=_policy(args))
    try:
        sign, amount = parse_relative_size(args.size)
        new = image.virtual_size + amount if sign == "+" else image.virtual_size - amount if sign == "-" \
            else amount
        if new < 0:
            raise ImageError("New image size must be positive", path=args.filename, field="size")
        image.resize(new, shrink=args.shrink, preallocation=args.preallocation)
    finally:
        close_chain(image)
    _out("Image resized.", args.quiet)
    return 0


# -- commit --------------------------------------------------------------------------------
@command("commit")
def cmd_commit(argv: List[str]) -> int:
    p = _Parser(prog="vdisk commit", description="Write the changes an overlay holds into its backing file.")
    p.add_argument("-q", action="store_true", dest="quiet", help=_HELP_QUIET)
    p.add_argument("-p", action="store_true", dest="progress", help=_HELP_PROGRESS)
    p.add_argument("-f", dest="fmt", help=_HELP_FMT)
    p.add_argument("-b", dest="base", metavar="BASE",
                   help="commit into this image of the backing chain (default: the backing file); implies -d")
    p.add_argument("-d", action="store_true", dest="drop", help="leave the overlay as it is instead of emptying it")
    p.add_argument("-t", dest="cache", help="cache mode: %s (accepted for compatibility)" % _CACHE_MODES)
    _add_allow_path(p)
    p.add_argument("filename", help="the overlay")
    args = p.parse_args(argv)
    from ..ops.commit import commit
    commit(args.filename, args.fmt, args.base, args.drop, _policy(args), _progress(args.progress and not args.quiet))
    _out("Image committed.", args.quiet)
    return 0


# -- rebase --------------------------------------------------------------------------------
@command("rebase")
def cmd_rebase(argv: List[str]) -> int:
    p = _Parser(prog="vdisk rebase", description="Give an image another backing file, keeping its guest content.")
    p.add_argument("-q", action="store_true", dest="quiet", help=_HELP_QUIET)
    p.add_argument("-p", action="store_true", dest="progress", help=_HELP_PROGRESS)
    p.add_argument("-f", dest="fmt", help=_HELP_FMT)
    p.add_argument("-u", action="store_true", dest="unsafe",
                   help="unsafe: only change the name stored in the image, copy no data (needs -F)")
    p.add_argument("-b", dest="backing", required=True, metavar="BACKING",
                   help='the new backing file ("": none, the image becomes standalone)')
    p.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT", help="format of the new backing file")
    p.add_argument("-t", dest="cache", help="cache mode: %s (accepted for compatibility)" % _CACHE_MODES)
    p.add_argument("-T", dest="src_cache", metavar="SRC_CACHE",
                   help="cache mode of the backing files (accepted for compatibility)")
    _add_allow_path(p)
    p.add_argument("filename", help="the image")
    args = p.parse_args(argv)
    from ..ops.rebase import rebase
    rebase(args.filename, args.backing, args.backing_fmt, args.fmt, args.unsafe, _policy(args),
           _progress(args.progress and not args.quiet))
    return 0


# -- amend ---------------------------------------------------------------------------------
@command("amend")
def cmd_amend(argv: List[str]) -> int:
    p = _Parser(prog="vdisk amend", description="Change format options of an existing image.")
    p.add_argument("-q", action="store_true", dest="quiet", help=_HELP_QUIET)
    p.add_argument("-p", action="store_true", dest="progress", help=_HELP_PROGRESS + " (accepted)")
    p.add_argument("-f", dest="fmt", help=_HELP_FMT)
    p.add_argument("-o", dest="options", action="append", required=True, metavar="OPTIONS",
                   help="the options to change, NAME=VALUE[,...] (repeatable); -o help lists them")
    p.add_argument("--force", action="store_true",
                   help="allow unsafe changes: overwrite an active key slot, erase the last ones (luks)")
    _add_secret_options(p)
    _add_allow_path(p)
    p.add_argument("filename", help="the image")
    args = p.parse_args(argv)
    _image_opts(args)
    options = merge_option_strings(args.options)
    if "help" in options and args.fmt:
        amend_specs = getattr(get_driver(args.fmt), "amend_options", None)
        if amend_specs is not None:      # qemu-img lists them without opening the image
            _out(_amend_help(args.fmt, amend_specs))
            return 0
    image = open_image(args.filename, args.fmt, writable=True, policy=_policy(args))
    try:
        amend_specs = getattr(image.driver, "amend_options", None)
        if "help" in options:
            _out(_amend_help(image.driver.name, amend_specs) if amend_specs is not None else image.driver.options_help())
            return 0
        # the secrets (options of type "secret") are resolved here: their ids never reach the driver
        resolved = _resolve_key_secret(args, options, args.filename, amend_specs if amend_specs is not None else
                                       tuple(image.driver.create_options)
                                       + tuple(getattr(image.driver, "amend_extra_options", ())))
        if amend_specs is not None:
            # a driver with its own amend options (luks' key slots) parses them with QEMU's messages
            typed = resolved
        else:
            typed = {}
            for name, value in resolved.items():
                spec = None
                try:
                    spec = image.driver.option(name)
                    typed[name] = spec.parse(value)
                except ImageError:
                    if spec is not None and spec.amendable and spec.type in ("int", "size"):
                        raise       # a number it takes is checked first, as qemu's option parser does
                    typed[name] = value   # the driver's amend names what it refuses
        image.amend(typed, force=args.force)
    finally:
        close_chain(image)
    return 0


def _amend_help(fmt: str, specs) -> str:
    """qemu-img amend's ``-o help`` for a driver that declares its amend options."""
    return "\n".join(["Amend options for '%s':" % fmt] + [spec.help_line() for spec in sorted(specs, key=lambda s: s.name)])


# -- bitmap --------------------------------------------------------------------------------
class _BitmapOperation(argparse.Action):
    """--add ... --merge SOURCE: each appends to one list, so the operations run in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..ops.bitmap import Operation
        ops = list(getattr(namespace, self.dest) or [])
        ops.append(Operation(option_string.lstrip("-"), values if values != [] else None))
        setattr(namespace, self.dest, ops)


@command("bitmap")
def cmd_bitmap(argv: List[str]) -> int:
    p = _Parser(prog="vdisk bitmap",
                usage="vdisk bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... "
                      "[-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] [--allow-path DIR] FILE BITMAP",
                description="Add, remove, clear, enable, disable or merge a persistent "
                "dirty bitmap of an image (qcow2 version 3); several operations run in the order given.")
    for flag, text in (("--add", "add BITMAP, enabled (recording future writes); with --disable, disabled"),
                       ("--remove", "remove BITMAP"),
                       ("--clear", "clear every bit of BITMAP"),
                       ("--enable", "enable BITMAP: it records future writes"),
                       ("--disable", "disable BITMAP: it stops recording writes")):
        p.add_argument(flag, dest="operations", action=_BitmapOperation, nargs=0, help=text)
    p.add_argument("--merge", dest="operations", action=_BitmapOperation, metavar="SOURCE",
                   help="merge the bits of bitmap SOURCE (of this image, or of -b SOURCE_FILE) into BITMAP")
    p.add_argument("-b", "--source-file", dest="source_file", metavar="SOURCE_FILE",
                   help="the image --merge takes its SOURCE bitmaps from (default: FILE)")
    p.add_argument("-F", "--source-format", dest="source_fmt", metavar="SOURCE_FMT", help="format of SOURCE_FILE")
    p.add_argument("-g", "--granularity", dest="granularity", metavar="GRANULARITY",
                   help="bytes per bit of a bitmap --add creates: a power of two, 512 to 2G (default: the "
                        "cluster size within 4k..64k; suffixes k, M, G)")
    p.add_argument("-f", dest="fmt", help=_HELP_FMT)
    p.add_argument("--object", metavar="OBJECTDEF", help="QEMU objects (secrets): not supported by vdisk")
    _add_allow_path(p)
    p.add_argument("operands", nargs="*", metavar="FILE BITMAP", help="the image and the name of the bitmap")
    args = p.parse_intermixed_args(argv)
    # qemu-img's checks, in its order and words
    if args.object is not None:
        raise UsageError("--object is not supported by vdisk")
    if not args.operations:
        raise UsageError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    granularity = 0
    if args.granularity is not None:
        try:
            granularity = parse_size(args.granularity, "granularity")
        except ImageError:
            raise UsageError("Invalid granularity specified. You may use k, M, G, T, P or E suffixes for "
                             "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
    names = [op.name for op in args.operations]
    if granularity and "add" not in names:
        raise UsageError("granularity only supported with --add")
    if args.source_fmt is not None and args.source_file is None:
        raise UsageError("-F only supported with -b")
    if args.source_file is not None and "merge" not in names:
        raise UsageError("Merge bitmap source file only supported with --merge")
    if len(args.operands) != 2:
        raise UsageError("Expecting filename and bitmap name")
    from ..ops.bitmap import edit_bitmap
    # QEMU takes the granularity as a 32-bit number; 0 means the default
    edit_bitmap(args.operands[0], args.operands[1], args.operations, args.fmt,
                granularity & 0xFFFFFFFF if granularity else None, args.source_file, args.source_fmt,
                _policy(args))
    return 0


# -- compare -------------------------------------------------------------------------------
@command("compare")
def cmd_compare(argv: List[str]) -> int:
    p = _Parser(prog="vdisk compare", description="Compare the guest content of two images. Exit status: "
                "0 identical, 1 different, 2 error.")
    p.add_argument("-q", action="store_true", dest="quiet", help=_HELP_QUIET)
    p.add_argument("-p", action="store_true", dest="progress", help=_HELP_PROGRESS)
    p.add_argument("-f", dest="fmt_a", metavar="FMT", help="format of A (detected when not given)")
    p.add_argument("-F", dest="fmt_b", metavar="FMT", help="format of B (detected when not given)")
    p.add_argument("-s", action="store_true", dest="strict",
                   help="strict: images of different sizes, or with different allocation, differ")
    p.add_argument("-U", "--force-share", action="store_true", help=_HELP_SHARE)
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="human (default, qemu-img's messages) or json: identical, first-difference, "
                        "size-mismatch, block-status-mismatch")
    _add_secret_options(p)
    _add_allow_path(p)
    p.add_argument("a", metavar="A", help="the first image")
    p.add_argument("b", metavar="B", help="the second image")
    args = p.parse_args(argv)
    from ..ops.compare import compare_images
    as_json = args.output == "json"
    try:
        # --image-opts: both A and B are option strings, each with its own key-secret (as qemu-img)
        if args.image_opts and (args.fmt_a or args.fmt_b):
            raise InvalidOption("--image-opts and --format are mutually exclusive", field="--image-opts")
        _image_opts(args, "a", "fmt_a")
        policy_a = _policy(args)
        args.key_secret = None
        _image_opts(args, "b", "fmt_b")
        verdict = compare_images(args.a, args.b, args.fmt_a, args.fmt_b, args.strict, policy_a,
                                 lambda line: _out(line, args.quiet or as_json),
                                 _progress(args.progress and not args.quiet and not as_json), policy_b=_policy(args))
    except (ImageError, OSError) as exc:
        # qemu-img compare: 0 identical, 1 different, 2 (and up) an error
        if isinstance(exc, ImageError):
            text = str(exc)
        else:
            text = "%s%s" % ("'%s': " % exc.filename if getattr(exc, "filename", None) else "",
                             exc.strerror or exc)
        sys.stderr.write("vdisk: compare: %s\n" % text)
        return 2
    if as_json:
        _out(json.dumps(verdict.to_json(), indent=4))
    return verdict.exit_code


# -- measure -------------------------------------------------------------------------------
@command("measure")
def cmd_measure(argv: List[str]) -> int:
    """qemu-img measure: the bytes a new image needs, for --size or for converting FILE."""
    p = _Parser(prog="vdisk measure", description="Show the size a new image needs, for --size or for "
                "converting FILE.")
    p.add_argument("-O", dest="out_fmt", default="raw", metavar="OUTPUT_FMT",
                   help="format of the new image (default: raw)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="its format options, NAME=VALUE[,...] (repeatable)")
    p.add_argument("--size", help="virtual size of an empty new image (instead of FILE)")
    p.add_argument("-f", dest="fmt", help="format of FILE (detected when not given)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                   help="measure this internal snapshot of FILE: ID_OR_NAME, snapshot.id=ID or snapshot.name=NAME")
    p.add_argument("--output", default="human", help="human (default) or json (keys required, fully-allocated, "
                   "bitmaps)")
    p.add_argument("-U", "--force-share", action="store_true", help=_HELP_SHARE)
    _add_secret_options(p, image_opts=False)
    _add_allow_path(p)
    p.add_argument("files", nargs="*", metavar="FILE", help="the image to be converted")
    args = p.parse_args(argv)
    from ..ops.measure import measure, render_human, render_json
    if args.output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    size = None
    if args.size is not None:
        try:
            size = parse_size(args.size, "--size")
        except ImageError as exc:
            if "must be between" in str(exc):
                raise UsageError("Invalid image size specified. Must be between 0 and 9223372036854775807.") \
                    from None
            raise UsageError("Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
                             "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
    if len(args.files) > 1:
        raise UsageError("At most one filename argument is allowed.")
    # an encrypted target's key-secret (qemu-img needs it even to measure): the secret, not its id
    options = _resolve_key_secret(args, merge_option_strings(args.options), args.files[0] if args.files else "",
                                  get_driver(args.out_fmt).create_options)
    result = measure(args.out_fmt, options, size,
                     args.files[0] if args.files else None, args.fmt, args.snapshot, _policy(args))
    _out(render_json(result) if args.output == "json" else render_human(result))
    return 0


# -- inspect -------------------------------------------------------------------------------
@command("inspect")
def cmd_inspect(argv: List[str]) -> int:
    p = _Parser(prog="vdisk inspect", description="Show the detected format of a file, the files it names and "
                "the result of vdisk's safety checks; exit 1 when one fails.")
    p.add_argument("-f", dest="fmt", help="the format the file is declared as (checked against its content)")
    p.add_argument("--output", choices=("human", "json"), default="human", help="human (default) or json")
    p.add_argument("--dump", action="store_true",
                   help="print the image's on-disk structures field by field (offset, name, value) instead")
    _add_allow_path(p)
    p.add_argument("filename", help="the file")
    args = p.parse_args(argv)
    from ..ops.inspect import dump_structures, inspect_image, render_human, render_json
    if args.dump:
        _out("\n".join(dump_structures(args.filename, args.fmt, policy=_policy(args))))
        return 0
    report = inspect_image(args.filename, args.fmt, policy=_policy(args))
    _out(render_json(report) if args.output == "json" else render_human(report))
    return 0 if report.safe else 1


# -- validate / plan / apply (manifests) --------------------------------------------------
def _manifest_command(name: str) -> Callable:
    def run(argv: List[str]) -> int:
        from ..manifest.cli import run as run_manifest
        try:
            return run_manifest(name, argv, UsageError)
        except SystemExit as exc:     # its argparse after --help (its usage errors raise UsageError)
            return 0 if exc.code is None else int(exc.code)
    return run


for _name in ("validate", "plan", "apply"):
    COMMANDS[_name] = _manifest_command(_name)


# -- entry point ---------------------------------------------------------------------------
USAGE = """usage: vdisk [-h] [-V] COMMAND [options]

Commands (qemu-img's syntax):
  create  [-q] [-f FMT] [-o OPTS] [-b BACKING [-F BACKING_FMT]] [-u] FILE [SIZE]
  convert [-q] [-p] [-c | -C] [-f FMT] [-O FMT] [-o OPTS] [-B BACKING [-F FMT]] [-l SNAPSHOT] [-S SIZE] [-n]
          [--target-is-zero] [--bitmaps [--skip-broken-bitmaps]] [-m N] [-W] SRC [SRC...] DST
  info    [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE
  check   [-q] [-f FMT] [-r leaks|all] [--output=human|json] FILE
  resize  [-q] [-f FMT] [--shrink] [--preallocation=MODE] FILE [+|-]SIZE
  snapshot [-q] (-l [--output=human|json] | -c NAME | -a NAME | -d NAME) FILE
  commit  [-q] [-p] [-f FMT] [-b BASE] [-d] FILE
  rebase  [-q] [-p] [-f FMT] [-u] -b BACKING [-F FMT] FILE
  compare [-q] [-p] [-f FMT] [-F FMT] [-s] [--output=human|json] A B
  map     [-f FMT] [--output=human|json] FILE
  measure [-O FMT] [-o OPTS] (--size SIZE | [-f FMT] [-l SNAPSHOT] FILE) [--output=human|json]
  amend   [-f FMT] -o OPTS FILE
  bitmap  (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]]
          [-g GRANULARITY] [-f FMT] FILE BITMAP
  inspect [-f FMT] [--output=human|json] FILE
          (detected format, files the image names, safety checks; exits 1 when one fails)
  validate|plan|apply [--output=human|json] [--allow-path DIR] MANIFEST.yml ...
          (plan exits 0: no changes, 2: changes pending, 1: error)

Every command that opens images takes --allow-path DIR (repeatable) to allow files the
image names (backing files) outside the image's own directory tree.
`vdisk COMMAND --help` describes each option of COMMAND.
Supported formats: %s
""" % " ".join(sorted(DRIVERS))


def main(argv: Optional[List[str]] = None) -> int:
    """Run one vdisk command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 1
    if argv[0] in ("-V", "--version"):
        _out("vdisk version %s" % __version__)
        return 0
    name, rest = argv[0], argv[1:]
    fn = COMMANDS.get(name)
    if fn is None:
        sys.stderr.write("vdisk: Command not found: %s\n" % name)
        return 1
    try:
        with signals_raise():      # SIGTERM, SIGHUP: unwind and clean up as on SIGINT
            return fn(rest)
    except Terminated as exc:
        sys.stderr.write("vdisk: %s: %s\n" % (name, exc))
        return exc.exit_status
    except UsageError as exc:
        sys.stderr.write("vdisk: %s: %s\n" % (name, " ".join(str(exc).split())))
        return 1
    except HelpShown:
        return 0
    except ImageError as exc:
        sys.stderr.write("vdisk: %s: %s\n" % (name, exc))
        return 1
    except OSError as exc:
        where = " '%s'" % exc.filename if getattr(exc, "filename", None) else ""
        sys.stderr.write("vdisk: %s:%s %s\n" % (name, where, exc.strerror or exc))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("vdisk: %s: interrupted\n" % name)
        return 130
    except RecursionError:
        sys.stderr.write("vdisk: %s: image structure too deep\n" % name)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
