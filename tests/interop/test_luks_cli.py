"""luks through the command line, as qemu-img takes it: ``--object secret,...``, ``-o key-secret=ID``
and ``--image-opts driver=luks,key-secret=ID,file.filename=PATH`` (cli/secrets.py).

Images made by each tool are converted by the other with the same secret; the messages for a
missing, unknown and wrong secret are qemu-img's; ``info`` needs no secret (as qemu-img's); the
secret's bytes appear in no output, and no guest data in clear in the encrypted file.
"""
import pytest

import helpers
from helpers import MiB

pytest.importorskip("cryptography")

SECRET = "s3cret-PASS"
OBJECT = "secret,id=sec0,data=%s" % SECRET
MARK = b"VDISK-CLI-LUKS-PATTERN"


def opts(path, secret_id="sec0"):
    return "driver=luks,key-secret=%s,file.filename=%s" % (secret_id, path)


def vdisk(*args):
    proc = helpers.vdisk_cli(*[str(a) for a in args])
    assert SECRET not in proc.stdout + proc.stderr
    return proc


def qemu_luks(path, size="4M"):
    helpers.qemu_img_pbkdf2("create", "-q", "-f", "luks", "--object", OBJECT, "-o", "key-secret=sec0,iter-time=10",
                            path, size)


def test_vdisk_creates_and_converts_what_qemu_img_opens(tmp_path):
    raw = tmp_path / "src.raw"
    helpers.make_raw(raw, 4 * MiB, [(MiB, 64 * 1024)])
    with open(raw, "r+b") as f:
        f.seek(2 * MiB)
        f.write(MARK * 100)
    made = tmp_path / "made.luks"
    proc = vdisk("create", "-f", "luks", "--object", OBJECT, "-o", "key-secret=sec0,iter-time=10", made, "4M")
    assert proc.returncode == 0, proc.stderr
    assert "key-secret=sec0" in proc.stdout
    converted = tmp_path / "conv.luks"
    proc = vdisk("convert", "--object", OBJECT, "-O", "luks", "-o", "key-secret=sec0,iter-time=10", raw, converted)
    assert proc.returncode == 0, proc.stderr
    assert MARK not in converted.read_bytes()
    for path in (made, converted):
        assert helpers.qemu_img("check", "--object", OBJECT, "--image-opts", opts(path)).returncode in (0, 63)
    compare = helpers.qemu_img("compare", "--object", OBJECT, "--image-opts", opts(converted),
                               "driver=raw,file.filename=%s" % raw)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_qemu_img_images_convert_in_vdisk(tmp_path):
    path = tmp_path / "q.luks"
    qemu_luks(path)
    io = helpers.run("qemu-io", "--object", OBJECT, "--image-opts", opts(path), "-c", "write -P 0x5a 1000 70000",
                     check=False)
    assert io.returncode == 0, io.stderr
    mine, theirs = tmp_path / "mine.qcow2", tmp_path / "theirs.qcow2"
    proc = vdisk("convert", "--object", OBJECT, "--image-opts", "-O", "qcow2", opts(path), mine)
    assert proc.returncode == 0, proc.stderr
    helpers.qemu_img("convert", "--object", OBJECT, "--image-opts", "-O", "qcow2", opts(path), theirs, check=True)
    assert helpers.qemu_compare(mine, theirs, fa="qcow2", fb="qcow2")
    info = vdisk("info", "--output=json", path)           # no secret needed, as with qemu-img
    assert info.returncode == 0 and '"encrypted": true' in info.stdout
    mapped = vdisk("map", "--output=json", "--object", OBJECT, "--image-opts", opts(path))
    assert mapped.returncode == 0, mapped.stderr


@pytest.mark.parametrize("args, message", [
    (["--image-opts", "OPTS-nope"], "No secret with id 'nope'"),
    (["--object", "secret,id=sec0,data=wrong", "--image-opts", "OPTS"], "Invalid password, cannot unlock any keyslot"),
    (["PATH"], "Parameter 'key-secret' is required for cipher"),
    (["--image-opts", "-f", "luks", "OPTS"], "--image-opts and --format are mutually exclusive"),
])
def test_secret_refusals_as_qemu_img(tmp_path, args, message):
    path = tmp_path / "q.luks"
    qemu_luks(path)
    before = path.read_bytes()
    out = tmp_path / "out.raw"

    def concrete(a):
        return {"OPTS": opts(path), "OPTS-nope": opts(path, "nope"), "PATH": str(path)}.get(a, a)
    mine = vdisk("convert", *[concrete(a) for a in args], "-O", "raw", out)
    theirs = helpers.qemu_img("convert", *[concrete(a) for a in args], "-O", "raw", tmp_path / "q.raw")
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr and message.encode() in theirs.stderr
    assert mine.stderr.count("\n") == 1
    assert not out.exists()
    assert path.read_bytes() == before


def test_create_refusals_as_qemu_img(tmp_path):
    path = tmp_path / "n.luks"
    proc = vdisk("create", "-f", "luks", path, "1M")
    assert proc.returncode == 1 and "Parameter 'key-secret' is required for cipher" in proc.stderr
    proc = vdisk("create", "-f", "luks", "--object", OBJECT, "-o", "key-secret=other", path, "1M")
    assert proc.returncode == 1 and "No secret with id 'other'" in proc.stderr
    proc = vdisk("create", "-f", "luks", "--object", "secret,id=sec0", "-o", "key-secret=sec0", path, "1M")
    assert proc.returncode == 1 and "Either 'file' or 'data' must be provided" in proc.stderr
    assert not path.exists()


def test_convert_into_an_existing_encrypted_target(tmp_path):
    """``-n --target-image-opts``: the existing target (made by qemu-img) is unlocked with its own
    key-secret, a different secret from the source's; qemu-img then reads the source's bytes in it."""
    raw = tmp_path / "src.raw"
    helpers.make_raw(raw, 4 * MiB, [(0, 4096), (MiB + 512, 70000)])
    target = tmp_path / "t.luks"
    qemu_luks(target)
    proc = vdisk("convert", "-n", "--object", OBJECT, "--target-image-opts", "-f", "raw", raw, opts(target))
    assert proc.returncode == 0, proc.stderr
    compare = helpers.qemu_img("compare", "--object", OBJECT, "--image-opts", opts(target),
                               "driver=raw,file.filename=%s" % raw)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    plain = raw.read_bytes()[MiB + 512:MiB + 512 + 4096]       # the fill pattern, in clear in the source
    assert plain in raw.read_bytes()
    assert plain not in target.read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--target-image-opts"], "--target-image-opts requires use of -n flag"),
    (["-n", "--target-image-opts", "-O", "luks"], "--image-opts and --format are mutually exclusive"),
])
def test_target_image_opts_refusals_as_qemu_img(tmp_path, args, message):
    raw = tmp_path / "src.raw"
    helpers.make_raw(raw, MiB, [(0, 4096)])
    target = tmp_path / "t.luks"
    qemu_luks(target, "1M")
    before = target.read_bytes()
    argv = ["convert", "--object", OBJECT] + args + ["-f", "raw", str(raw), opts(target)]
    theirs = helpers.qemu_img(*argv)
    mine = vdisk(*argv)
    assert theirs.returncode != 0
    assert mine.returncode != 0
    assert message in theirs.stderr.decode()
    assert message in mine.stderr
    assert target.read_bytes() == before


def test_existing_encrypted_target_needs_its_secret(tmp_path):
    """-n without --target-image-opts opens the target with no secret: refused as by qemu-img, nothing written."""
    raw = tmp_path / "src.raw"
    helpers.make_raw(raw, MiB, [(0, 4096)])
    target = tmp_path / "t.luks"
    qemu_luks(target, "1M")
    before = target.read_bytes()
    theirs = helpers.qemu_img("convert", "-n", "-f", "raw", "-O", "luks", raw, target)
    mine = vdisk("convert", "-n", "-f", "raw", "-O", "luks", raw, target)
    assert theirs.returncode != 0
    assert mine.returncode != 0
    assert "Parameter 'key-secret' is required for cipher" in theirs.stderr.decode()
    assert "Parameter 'key-secret' is required for cipher" in mine.stderr
    assert target.read_bytes() == before
