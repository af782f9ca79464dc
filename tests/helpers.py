"""Helpers shared by every suite: the qemu-img/qemu-io oracle, the vdisk CLI, the fill pattern.

Import as ``import helpers`` (``tests/`` is on ``sys.path`` through ``tests/conftest.py``).
qemu-img and qemu-io must be installed (``make test`` installs Debian's qemu-utils): a missing
tool fails the run, it never skips.

The fill pattern: the byte at guest offset ``o`` is ``(o // MiB + 7 * (o // 512)) mod 256``.
MiB *i* therefore starts with byte *i* (mod 256), and every 512-byte sector differs from its
neighbours, so a sector read from or written to the wrong place is detected without stored
checksums: ``data == pattern(offset, len(data))`` verifies any range.
"""
import fcntl
import json
import os
import struct
import subprocess
import sys
import time

MiB = 1 << 20
CLI_MODULE = "ansible_collections.vdisk.images.plugins.module_utils.vdisk"


def _txt(b):
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else (b or "")


def run(*args, check=True, input=None, env=None):
    """Run a command (arguments str()-ed); on failure with *check* the assertion shows its output."""
    args = [str(a) for a in args]
    proc = subprocess.run(args, capture_output=True, input=input, env=env)
    if check and proc.returncode != 0:
        raise AssertionError("command failed (rc=%d): %s\nstdout: %s\nstderr: %s"
                             % (proc.returncode, " ".join(args), _txt(proc.stdout), _txt(proc.stderr)))
    return proc


def qemu_img(*args, check=False):
    """``qemu-img ARGS`` as a CompletedProcess (bytes); *check* asserts exit 0."""
    return run("qemu-img", *args, check=check)


# qemu-img times 2**15 PBKDF2 rounds to calibrate a LUKS key and fails with "Unable to get accurate
# CPU usage" when the thread's CPU clock has not moved: with SHA-NI those rounds take ~4 ms, under
# one scheduler tick. Without the hardware hash (GnuTLS and Nettle both honour an override) they
# take ~12 ms, which the clock always sees; the retries cover what is left.
_PBKDF2_ENV = {"GNUTLS_CPUID_OVERRIDE": "0x1", "NETTLE_FAT_OVERRIDE": "none"}


def qemu_img_pbkdf2(*args, attempts=10):
    """``qemu-img ARGS`` for a command that derives a LUKS key (luks/encrypted create, amend, measure),
    retried while qemu-img's PBKDF2 calibration gives up; asserts exit 0 and returns the process."""
    env = dict(os.environ, **_PBKDF2_ENV)
    for dummy in range(attempts):
        proc = run("qemu-img", *args, check=False, env=env)
        if b"Unable to get accurate CPU usage" not in proc.stderr:
            break
    assert proc.returncode == 0, _txt(proc.stderr)
    return proc


def qemu_io(fmt, path, *cmds, check=True):
    """Run qemu-io commands (each a string, e.g. ``"write -P 1 0 64k"``) on *path*.

    With *check*, fails when qemu-io exits non-zero or prints an error (qemu-io often exits 0
    after a failed command). Returns the combined output as text.
    """
    return _qemu_io(["-f", fmt], path, cmds, check)


def qemu_io_opts(objects, image_opts, *cmds, check=True):
    """:func:`qemu_io` on an image named with ``--image-opts`` (an encrypted one: *objects* are the
    ``--object`` arguments that hold its secret)."""
    return _qemu_io(list(objects) + ["--image-opts"], image_opts, cmds, check)


def _qemu_io(options, path, cmds, check):
    args = ["qemu-io"] + options
    for c in cmds:
        args += ["-c", c]
    proc = run(*args, path, check=check)
    out = _txt(proc.stdout) + _txt(proc.stderr)
    if check:
        for line in out.splitlines():
            low = line.lower()
            if "failed" in low or "error" in low or "cannot" in low or "pattern verification" in low:
                raise AssertionError("qemu-io %s %s: %s" % (path, " ".join(repr(c) for c in cmds), out))
    return out


def qemu_check(path, fmt="qcow2"):
    """``qemu-img check --output=json`` parsed, plus ``rc`` (its exit status) and ``stderr``."""
    proc = qemu_img("check", "--output=json", "-f", fmt, path)
    try:
        result = json.loads(_txt(proc.stdout))
    except ValueError:
        raise AssertionError("qemu-img check %s gave no JSON (rc=%d): %s %s"
                             % (path, proc.returncode, _txt(proc.stdout), _txt(proc.stderr)))
    result["rc"] = proc.returncode
    result["stderr"] = _txt(proc.stderr)
    return result


def qemu_compare(a, b, fa="qcow2", fb="raw", strict=False):
    """``qemu-img compare``: True when identical (exit 0), False when different (exit 1); raises on errors."""
    args = ["compare", "-f", fa, "-F", fb] + (["-s"] if strict else []) + [a, b]
    proc = qemu_img(*args)
    if proc.returncode not in (0, 1):
        raise AssertionError("qemu-img compare %s %s failed (rc=%d): %s"
                             % (a, b, proc.returncode, _txt(proc.stderr)))
    return proc.returncode == 0


def qemu_info(path, fmt=None, *extra):
    """``qemu-img info --output=json`` parsed (asserts exit 0)."""
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + list(extra) + [path]
    return json.loads(_txt(qemu_img(*args, check=True).stdout))


def vdisk_cli(*args, check=False, input=None):
    """The vdisk CLI as a subprocess (``python -m``, the source tree via PYTHONPATH), as text."""
    proc = subprocess.run([sys.executable, "-m", CLI_MODULE] + [str(a) for a in args],
                          capture_output=True, input=input, text=True, env=dict(os.environ))
    if check and proc.returncode != 0:
        raise AssertionError("vdisk %s failed (rc=%d):\n%s%s"
                             % (" ".join(map(str, args)), proc.returncode, proc.stdout, proc.stderr))
    return proc


def pattern(offset, length):
    """The fill pattern for guest bytes ``[offset, offset + length)`` (see the module docstring)."""
    out = bytearray()
    pos, end = offset, offset + length
    while pos < end:
        sector_end = min((pos // 512 + 1) * 512, end)
        out += bytes([(pos // MiB + 7 * (pos // 512)) & 0xFF]) * (sector_end - pos)
        pos = sector_end
    return bytes(out)


def marked_pattern(size, mark):
    """Recognizable guest data: the fill pattern with *mark* in every sector (an encrypted output must
    hold it nowhere)."""
    data = bytearray(pattern(0, size))
    for pos in range(0, size - len(mark), 512):
        data[pos + 37:pos + 37 + len(mark)] = mark
    return bytes(data)


def make_raw(path, size, extents=()):
    """A sparse raw file of *size* bytes holding the fill pattern at each ``(offset, length)`` of *extents*."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in extents:
            f.seek(offset)
            f.write(pattern(offset, length))
    return str(path)


F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
FLOCK = struct.Struct("hhqqi4x")        # struct flock on 64-bit Linux
QEMU_WRITE_PERM_BYTE = 101              # QEMU's lock byte for the "write" permission


def byte_locked(path, byte):
    """Whether any process holds a lock on *byte* of *path* (F_OFD_GETLK: takes no lock itself)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        raw = fcntl.fcntl(fd, F_OFD_GETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    finally:
        os.close(fd)
    return FLOCK.unpack(raw)[0] != fcntl.F_UNLCK


def wait_until_qemu_writes(proc, path, timeout=15):
    """Wait until the QEMU process *proc* holds *path*'s write lock. Polling with qemu-img instead would
    take locks itself and could make a qemu-io that is still starting fail to get its own."""
    deadline = time.time() + timeout
    while not byte_locked(path, QEMU_WRITE_PERM_BYTE):
        assert proc.poll() is None, "qemu-io exited: %s" % proc.stderr.read()
        assert time.time() < deadline, "qemu-io did not lock %s within %d s" % (path, timeout)
        time.sleep(0.05)


def default_signals():
    """``preexec_fn`` of a child the test signals: SIGINT and SIGHUP back to their default action.

    A test run started in the background (``make test &``, ``nohup``) hands its children these
    signals ignored, and an ignored signal stays ignored: the child would never see it."""
    import signal
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
