"""Run a plan's actions with the engine, in order, stopping at the first failure.

New files (create, convert, replace) are written beside their destination and renamed into
place, so an image is either the old one or the complete new one.  In-place changes (amend,
resize, snapshots) are each crash-safe in the engine (QEMU's write ordering); a plan interrupted
between two of them is completed by the next run, because planning starts from what is on disk.
An image made from an http(s) source is converted from the verified download (``state.download``).
"""
from typing import Any, Dict, Iterable, Optional

from ..driver import Policy
from ..errors import ImageError, InvalidOption
from ..io import remove_file
from ..ops.chain import close_chain, open_image
from . import download
from . import plan as p
from .encryption import create_options, unlocking


def apply(actions: Iterable[p.Action], policy: Optional[Policy] = None,
          downloads: Optional[download.DownloadSettings] = None) -> None:
    """Execute *actions* (from :func:`plan.plan`, :func:`plan.plan_snapshot` or
    :func:`plan.plan_convert`) in order; errors are :class:`ImageError`.  *downloads*: how a URL
    source is fetched (its cache, progress)."""
    for action in actions:
        apply_action(action, policy, downloads)


def apply_action(action: p.Action, policy: Optional[Policy] = None,
                 downloads: Optional[download.DownloadSettings] = None) -> None:
    """Execute one action."""
    handler = _HANDLERS.get(action.kind)
    if handler is None:
        raise InvalidOption("unknown action %r" % action.kind, path=action.path)
    if handler in (_create, _convert):
        handler(action, policy, downloads)
    else:
        handler(action, policy)


def _create(action: p.Action, policy: Optional[Policy], downloads: Optional[download.DownloadSettings]) -> None:
    from ..ops.create import create
    params = action.params
    # replacing: io.AtomicOutput takes the destination's write lock (refused while a VM holds it) and keeps
    # it until the new image is renamed into place
    if params.get("source"):
        _convert(action, policy, downloads)
        return
    options = _raw_options(params, action.path)
    create(action.path, params["format"], params.get("size"), options, params.get("backing_file"),
           params.get("backing_format"), policy)


def _convert(action: p.Action, policy: Optional[Policy], downloads: Optional[download.DownloadSettings]) -> None:
    params = action.params
    url = params.get("source_url")
    if not url:
        _convert_from(action, params["source"], policy)
        return
    checksum = params["source_checksum"]
    local = params.get("source_file")
    if local and download.verify_file(local, checksum):
        # the copy the plan was made with (the batch fetched it, or the cache holds it), unchanged since
        _convert_from(action, local, policy)
        return
    with download.fetch(url, checksum, action.path, downloads) as local:
        download.observe_download(local, url, params.get("source_format"), policy)
        _convert_from(action, local, policy)


def _convert_from(action: p.Action, source: str, policy: Optional[Policy]) -> None:
    """Convert the local file *source* into the action's new image."""
    from ..ops.convert import ConvertOptions, convert
    params = action.params
    backing = params.get("backing_file")
    opts = ConvertOptions(src_fmt=params.get("source_format"), out_fmt=params["format"],
                          options=_raw_options(params, action.path),
                          compress=bool(params.get("compress")), snapshot=params.get("snapshot"),
                          backing=backing or None,
                          backing_fmt=(params.get("backing_format") or None) if backing else None)
    # the source opens with its own passphrase (image_convert's source_encryption); the new image with the
    # passphrase its create options carry
    convert([source], action.path, opts, policy=unlocking(policy, params.get("source_encryption"), source))


def _raw_options(params: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The create options of a new image: the typed options, preallocation, encryption (its passphrase read now)."""
    options = dict(params.get("options") or {})
    if params.get("preallocation"):
        options["preallocation"] = params["preallocation"]
    options.update(create_options(params["format"], params.get("encryption"), path))
    return options


def _delete(action: p.Action, policy: Optional[Policy]) -> None:
    """Delete the file under its write lock: a disk a running VM holds is refused (io.remove_file)."""
    remove_file(action.path)       # refuses a symlink, directory or device too


def _resize(action: p.Action, policy: Optional[Policy]) -> None:
    params = action.params
    # the backing chain is opened: growing a qcow2 must hide what a longer backing file holds past the old end
    image = open_image(action.path, params["format"], writable=True,
                       policy=unlocking(policy, params.get("encryption"), action.path))
    try:
        image.resize(params["size"], shrink=action.kind == p.SHRINK, preallocation=params.get("preallocation") or "off")
        image.flush()
    finally:
        close_chain(image)


def _in_place(action: p.Action, policy: Optional[Policy]) -> None:
    params = action.params
    image = open_image(action.path, params.get("format"), writable=True,
                       policy=unlocking(policy, params.get("encryption"), action.path), backing=False)
    try:
        if action.kind == p.AMEND:
            image.amend(dict(params["options"]))
        elif action.kind == p.SNAPSHOT_CREATE:
            image.create_snapshot(params["name"])
        elif action.kind == p.SNAPSHOT_DELETE:
            _named(image.delete_snapshot, params["name"], "delete")
        else:
            _named(image.apply_snapshot, params["name"], "apply")
        image.flush()
    finally:
        close_chain(image)


def _named(fn, name: str, verb: str) -> None:
    try:
        fn(name)
    except ImageError as exc:
        raise exc.__class__("Could not %s snapshot '%s': %s" % (verb, name, exc.message), path=exc.path,
                            field=exc.field) from None


_HANDLERS = {p.CREATE: _create, p.REPLACE: _create, p.CONVERT: _convert, p.DELETE: _delete,
             p.GROW: _resize, p.SHRINK: _resize, p.AMEND: _in_place, p.SNAPSHOT_CREATE: _in_place,
             p.SNAPSHOT_DELETE: _in_place, p.SNAPSHOT_APPLY: _in_place}
