"""Small helpers of the qcow2 interop/model tests: engine import path, qemu-img/qemu-io runners.

Importing this module makes ``ansible_collections.vdisk.images`` importable from the source
tree when it is not installed (a symlink tree in a temporary directory, put on ``sys.path``),
unless the shared ``tests/conftest.py`` already did so.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = "ansible_collections.vdisk.images.plugins.module_utils.vdisk"


def _ensure_importable():
    try:
        import ansible_collections.vdisk.images.plugins.module_utils.vdisk  # noqa: F401
        return
    except ImportError:
        pass
    root = os.path.join(tempfile.gettempdir(), "vdisk-qcow2-tests-%d" % os.getuid())
    link = os.path.join(root, "ansible_collections", "vdisk", "images")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not (os.path.islink(link) and os.readlink(link) == REPO):
        tmp = "%s.%d" % (link, os.getpid())
        os.symlink(REPO, tmp)
        os.replace(tmp, link)
    sys.path.insert(0, root)
    for name in [m for m in sys.modules if m == "ansible_collections" or m.startswith("ansible_collections.")]:
        del sys.modules[name]
    import ansible_collections.vdisk.images.plugins.module_utils.vdisk  # noqa: F401,F811


_ensure_importable()

from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import compress as _compress  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import (  # noqa: E402
    close_chain, open_image)
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver  # noqa: E402

KiB = 1024
MiB = 1024 * 1024
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

# the engine's own probe: compression.zstd (Python 3.14+) or the backports.zstd package
HAVE_ZSTD = _compress.zstd_available()


def run(*args, check=True, **kw):
    """Run a command; on failure the assertion shows the command and its output."""
    args = [str(a) for a in args]
    proc = subprocess.run(args, capture_output=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError("command failed (rc=%d): %s\nstdout: %s\nstderr: %s"
                             % (proc.returncode, " ".join(args), _txt(proc.stdout), _txt(proc.stderr)))
    return proc


def _txt(b):
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


def qemu_img(*args, check=True):
    return run(QEMU_IMG, *args, check=check)


def qemu_io(path, *cmds, fmt="qcow2"):
    """Run qemu-io commands (each a string) on *path*; fails loudly when qemu-io reports an error."""
    args = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    proc = run(*args, path)
    out = _txt(proc.stdout) + _txt(proc.stderr)
    for line in out.splitlines():
        low = line.lower()
        if "failed" in low or "error" in low or "cannot" in low:
            raise AssertionError("qemu-io %s: %s" % (" ".join(repr(c) for c in cmds), out))
    return out


def qemu_create(path, size, fmt="qcow2", options=None, backing=None, backing_fmt=None):
    args = ["create", "-q", "-f", fmt]
    if options:
        args += ["-o", ",".join("%s=%s" % kv for kv in options.items())]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    args.append(path)
    if size is not None:
        args.append(size)
    qemu_img(*args)


def qemu_check(path, fmt="qcow2"):
    """``qemu-img check --output=json`` as a dict (also when it exits non-zero)."""
    proc = qemu_img("check", "--output=json", "-f", fmt, path, check=False)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError("qemu-img check %s failed (rc=%d): %s %s"
                             % (path, proc.returncode, _txt(proc.stdout), _txt(proc.stderr)))
    result["rc"] = proc.returncode
    result["stderr"] = _txt(proc.stderr)
    return result


def assert_check_clean(path, fmt="qcow2"):
    result = qemu_check(path, fmt)
    bad = {k: result.get(k) for k in ("check-errors", "corruptions", "leaks") if result.get(k)}
    assert result["rc"] == 0 and not bad, "qemu-img check %s not clean: %s\n%s" % (path, bad, result["stderr"])
    return result


def qemu_compare(a, b, fmt_a="qcow2", fmt_b="raw"):
    """Assert ``qemu-img compare`` finds the two images identical."""
    proc = qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert proc.returncode == 0, "qemu-img compare %s %s: rc=%d %s %s" % (
        a, b, proc.returncode, _txt(proc.stdout).strip(), _txt(proc.stderr).strip())


def qemu_to_raw(path, fmt="qcow2"):
    """The guest-visible content of *path* according to qemu-img (convert -O raw)."""
    out = str(path) + ".qemu.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def qemu_map(path, fmt="qcow2"):
    return json.loads(qemu_img("map", "--output=json", "-f", fmt, path).stdout)


def pattern(seed, length):
    """Deterministic non-repeating-looking bytes (never all zero)."""
    block = bytes(((seed * 131 + i * 7) % 251) + 1 for i in range(4096))
    reps = -(-length // len(block))
    return (block * reps)[:length]


def raw_write(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def make_raw(path, size, content=b""):
    with open(path, "wb") as f:
        f.write(content[:size])
        f.truncate(size)


def vdisk_create(path, size, **options):
    drv = get_driver("qcow2")
    drv.create(str(path), size, drv.parse_options({k: v for k, v in options.items() if v is not None}))


def read_image(img, chunk=4 * MiB):
    """The whole guest content of an open image (chain) through vdisk."""
    size = img.virtual_size
    out = bytearray()
    for off in range(0, size, chunk):
        out += img.read(off, min(chunk, size - off))
    return bytes(out)


def vdisk_read_all(path, fmt="qcow2"):
    img = open_image(str(path), fmt, writable=False)
    try:
        return read_image(img)
    finally:
        close_chain(img)


def discard_like_qemu(model, offset, length, cluster_size, virtual_size, v3, has_backing):
    """Apply a qcow2 discard to a bytearray model the way QEMU 7.2 does (checked with qemu-io).

    Only whole clusters are discarded (partial head/tail clusters are ignored, except a
    partial last cluster at the end of the image); a discarded cluster reads as zeros (v3:
    zero flag; v2 without backing file: unallocated). v2 with a backing file cannot express
    it and QEMU leaves the image unchanged (-ENOTSUP, ignored).
    """
    if not v3 and has_backing:
        return
    start = -(-offset // cluster_size) * cluster_size
    end = offset + length
    if end != virtual_size:
        end = end // cluster_size * cluster_size
    if start < end:
        model[start:end] = bytes(end - start)


def first_diff(a, b):
    """A short description of where two byte strings differ (for assertion messages)."""
    if len(a) != len(b):
        return "lengths differ: %d != %d" % (len(a), len(b))
    for i in range(0, len(a), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            j = next(k for k in range(i, min(i + 4096, len(a))) if a[k] != b[k])
            return "first difference at byte %d (0x%x): %r != %r" % (j, j, a[j:j + 8], b[j:j + 8])
    return "equal"


# -- map comparison -------------------------------------------------------------------------
def _merge(runs):
    out = []
    for s, e, cls, depth in runs:
        if e <= s:
            continue
        if out and out[-1][1] == s and out[-1][2] == cls and out[-1][3] == depth:
            out[-1] = (out[-1][0], e, cls, depth)
        else:
            out.append((s, e, cls, depth))
    return out


def normalize_qemu_map(entries):
    """qemu-img map JSON -> merged [(start, end, class, depth)]; class data|zero|unallocated.

    zero:true wins over data:true: a preallocated cluster whose host range is a hole is DATA
    with ``reads_zero`` in vdisk's extents, and data:true, zero:true in qemu-img map.

    The depth is kept for data and zero runs (which layer decides) and dropped (None) for
    unallocated ones, whose depth qemu reports as the deepest layer covering the offset.
    """
    runs = []
    for e in entries:
        if e.get("present", True) and e["zero"]:
            cls = "zero"      # also data:true+zero:true (an allocated cluster over a host hole): reads as zeros
        elif e["data"]:
            cls = "data"
        else:
            cls = "unallocated"
        runs.append((e["start"], e["start"] + e["length"], cls, None if cls == "unallocated" else e["depth"]))
    return _merge(runs)


def normalize_vdisk_map(img):
    """The same view from vdisk's extents, walking the backing chain as qemu-img map does."""
    runs = []
    _walk(img, 0, img.virtual_size, 0, runs)
    runs.sort()
    return _merge((s, s + n, cls, None if cls == "unallocated" else d) for s, n, cls, d in runs)


def _walk(img, offset, length, depth, out):
    end = offset + length
    for ext in img.extents(offset, length):
        s = max(ext.offset, offset)
        e = min(ext.offset + ext.length, end)
        if e <= s:
            continue
        if ext.kind == "unallocated":
            if img.backing is not None and s < img.backing.virtual_size:
                be = min(e, img.backing.virtual_size)
                _walk(img.backing, s, be - s, depth + 1, out)
                if be < e:
                    out.append((be, e - be, "unallocated", depth))
            else:
                out.append((s, e - s, "unallocated", depth))
        else:
            out.append((s, e - s, "zero" if ext.reads_zero else ext.kind, depth))


# -- info comparison ------------------------------------------------------------------------
def assert_info_agrees(path, fmt="qcow2"):
    """vdisk's Image.info() agrees with ``qemu-img info --output=json`` on every key both print."""
    theirs = json.loads(qemu_img("info", "--output=json", "-f", fmt, path).stdout)
    img = open_image(str(path), fmt, writable=False)
    try:
        mine = dict(img.info())
        mine.setdefault("virtual-size", img.virtual_size)
    finally:
        close_chain(img)
    diffs = []
    _compare_common(mine, theirs, "", diffs)
    assert not diffs, "vdisk info differs from qemu-img info for %s: %s" % (path, "; ".join(diffs))


def _compare_common(a, b, where, diffs):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) & set(b):
            _compare_common(a[key], b[key], "%s.%s" % (where, key) if where else key, diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append("%s: %d items != %d" % (where, len(a), len(b)))
        for i, (x, y) in enumerate(zip(a, b)):
            _compare_common(x, y, "%s[%d]" % (where, i), diffs)
    elif a != b:
        diffs.append("%s: vdisk %r != qemu %r" % (where, a, b))


def assert_map_agrees(path, fmt="qcow2"):
    """vdisk's extents (down the chain) agree with ``qemu-img map --output=json`` on every range."""
    img = open_image(str(path), fmt, writable=False)
    try:
        mine = normalize_vdisk_map(img)
    finally:
        close_chain(img)
    theirs = normalize_qemu_map(qemu_map(path, fmt))
    if mine != theirs:
        lines = []
        for i in range(max(len(mine), len(theirs))):
            a = mine[i] if i < len(mine) else None
            b = theirs[i] if i < len(theirs) else None
            if a != b:
                lines.append("  #%d vdisk=%s qemu=%s" % (i, a, b))
                if len(lines) > 6:
                    break
        raise AssertionError("extents of %s differ from qemu-img map:\n%s" % (path, "\n".join(lines)))
