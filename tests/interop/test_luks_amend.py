"""``vdisk amend`` on luks key slots against qemu-img 7.2's ``amend -o state=active|inactive,...``.

Slots vdisk adds open in qemu-img/qemu-io with the new secret (and the old one still); slots vdisk
erases no longer do ("Invalid password, cannot unlock any keyslot"); every refusal is qemu-img's
message and exit status on a twin copy, and writes nothing; what qemu-img amends, vdisk reads; the
same sequence of amends run by both tools on twin copies gives the same ``info`` (bar the
calibrated iteration counts) and the same erased slot entries.
"""
import hashlib
import json
import re
import shutil

import pytest

import helpers

pytest.importorskip("cryptography")

SECRETS = {"sec0": "zero-PASS", "sec1": "one-PASS", "sec2": "two-PASS"}
OBJECTS = [a for sid, data in SECRETS.items() for a in ("--object", "secret,id=%s,data=%s" % (sid, data))]
PATTERN = 0x5A
SLOT_SIZE = 48
HEADER_SIZE = 208


def opts(path, sid="sec0"):
    return "driver=luks,key-secret=%s,file.filename=%s" % (sid, path)


def qemu_luks(path):
    helpers.qemu_img_pbkdf2("create", "-q", "-f", "luks", *OBJECTS, "-o", "key-secret=sec0,iter-time=10", path, "1M")
    helpers.run("qemu-io", *OBJECTS, "--image-opts", opts(path), "-c", "write -P %d 0 64k" % PATTERN)


def vdisk_amend(path, options, sid="sec0", *extra):
    proc = helpers.vdisk_cli("amend", *OBJECTS, *extra, "--image-opts", "-o", options, opts(path, sid))
    for secret in SECRETS.values():
        assert secret not in proc.stdout + proc.stderr
    return proc


def qemu_amend(path, options, sid="sec0", *extra, derive=False):
    args = ["amend", *OBJECTS, *extra, "--image-opts", "-o", options, opts(path, sid)]
    return helpers.qemu_img_pbkdf2(*args) if derive else helpers.qemu_img(*args)


def qemu_reads(path, sid):
    """qemu-io opens the image with secret *sid* and reads the pattern: (ok, stderr)."""
    proc = helpers.run("qemu-io", *OBJECTS, "--image-opts", opts(path, sid), "-c", "read -P %d 0 64k" % PATTERN,
                       check=False)
    err = proc.stderr.decode()
    return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout.decode() + err, err


def slots(path):
    return helpers.qemu_info(str(path))["format-specific"]["data"]["slots"]


def active(path):
    return [s["active"] for s in slots(path)]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def message(text, program, path):
    """One stderr line without the program's prefix, the file's name and the option it names."""
    lines = text.splitlines()
    assert len(lines) == 1, text
    line = lines[0].strip()
    line = line[len(program):] if line.startswith(program) else line
    line = re.sub(r"^Could not open '[^']*': ", "", line)
    for name in (str(path) + ": ", "key-secret: ", "new-secret: ", "old-secret: "):
        if line.startswith(name):
            line = line[len(name):]
    return line


def test_help_lists_qemu_img_amend_options(tmp_path):
    mine = helpers.vdisk_cli("amend", "-f", "luks", "-o", "help", tmp_path / "none.luks")
    theirs = helpers.qemu_img("amend", "-f", "luks", "-o", "help", tmp_path / "none.luks")
    assert mine.returncode == theirs.returncode == 0, mine.stderr
    assert mine.stdout == theirs.stdout.decode()


def test_add_first_free_slot_opens_in_qemu(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    proc = vdisk_amend(path, "state=active,new-secret=sec1,iter-time=10")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert active(path) == [True, True] + [False] * 6
    for sid in ("sec0", "sec1"):
        ok, err = qemu_reads(path, sid)
        assert ok, err
    ok, err = qemu_reads(path, "sec2")
    assert not ok and "Invalid password, cannot unlock any keyslot" in err
    compare = helpers.qemu_img("compare", *OBJECTS, "--image-opts", opts(path, "sec1"), opts(path, "sec0"))
    assert compare.returncode == 0, compare.stderr


def test_add_explicit_keyslot(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    proc = vdisk_amend(path, "state=active,new-secret=sec2,keyslot=0x5,iter-time=010")     # numbers as QEMU reads them
    assert proc.returncode == 0, proc.stderr
    assert active(path) == [True, False, False, False, False, True, False, False]
    assert slots(path)[5]["iters"] >= 1000 and slots(path)[5]["stripes"] == 4000
    for sid in ("sec0", "sec2"):
        ok, err = qemu_reads(path, sid)
        assert ok, err
    # and the slot is used by vdisk to open the image too
    out = tmp_path / "out.raw"
    proc = helpers.vdisk_cli("convert", *OBJECTS, "--image-opts", opts(path, "sec2"), "-O", "raw", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:65536] == bytes([PATTERN]) * 65536


def test_force_overwrites_an_active_slot(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    assert vdisk_amend(path, "state=active,new-secret=sec1,iter-time=10").returncode == 0
    proc = vdisk_amend(path, "state=active,new-secret=sec2,keyslot=1,iter-time=10", "sec0", "--force")
    assert proc.returncode == 0, proc.stderr
    assert active(path) == [True, True] + [False] * 6
    assert qemu_reads(path, "sec2")[0]
    assert not qemu_reads(path, "sec1")[0]


def test_erase_by_keyslot(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    assert vdisk_amend(path, "state=active,new-secret=sec1,iter-time=10").returncode == 0
    material = path.read_bytes()[4096:4096 + 64 * 4000]
    proc = vdisk_amend(path, "state=inactive,keyslot=0", "sec1")
    assert proc.returncode == 0, proc.stderr
    assert active(path) == [False, True] + [False] * 6
    ok, err = qemu_reads(path, "sec0")
    assert not ok and "Invalid password, cannot unlock any keyslot" in err
    ok, err = qemu_reads(path, "sec1")
    assert ok, err
    data = path.read_bytes()
    assert data[4096:4096 + 64 * 4000] != material          # the key material is overwritten
    entry = data[HEADER_SIZE:HEADER_SIZE + SLOT_SIZE]        # slot 0: inactive, no count, no salt
    assert entry[:40] == b"\x00\x00\xde\xad" + bytes(36)


def test_erase_by_old_secret(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    for slot in (2, 6):
        assert vdisk_amend(path, "state=active,new-secret=sec1,iter-time=10,keyslot=%d" % slot).returncode == 0
    assert active(path) == [True, False, True, False, False, False, True, False]
    proc = vdisk_amend(path, "state=inactive,old-secret=sec1")
    assert proc.returncode == 0, proc.stderr
    assert active(path) == [True] + [False] * 7
    ok, err = qemu_reads(path, "sec1")
    assert not ok and "Invalid password, cannot unlock any keyslot" in err
    assert qemu_reads(path, "sec0")[0]


def test_erasing_the_last_slot_needs_force(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    twin = tmp_path / "twin.luks"
    shutil.copyfile(path, twin)
    before = sha(path)
    mine = vdisk_amend(path, "state=inactive,keyslot=0")
    theirs = qemu_amend(twin, "state=inactive,keyslot=0")
    assert mine.returncode == theirs.returncode == 1
    assert message(mine.stderr, "vdisk: amend: ", path) == message(theirs.stderr.decode(), "qemu-img: ", twin) == (
        "Attempt to erase the only active keyslot 0 which will erase all the data in the image irreversibly - "
        "refusing operation")
    assert sha(path) == before
    mine = vdisk_amend(path, "state=inactive,keyslot=0", "sec0", "--force")
    theirs = qemu_amend(twin, "state=inactive,keyslot=0", "sec0", "--force")
    assert mine.returncode == theirs.returncode == 0, mine.stderr
    assert active(path) == active(twin) == [False] * 8
    ok, err = qemu_reads(path, "sec0")
    assert not ok and "Invalid password, cannot unlock any keyslot" in err
    # the same header bytes as qemu-img's (the slot entries: inactive, zero count and salt)
    assert path.read_bytes()[:592] == twin.read_bytes()[:592]


REFUSALS = [
    # (options, key secret, --force, qemu-img's message)
    ("state=active,keyslot=0,new-secret=sec1", "sec0", "Refusing to overwrite active keyslot 0 - please erase it first"),
    ("state=active,keyslot=9,new-secret=sec1", "sec0", "Invalid keyslot 9 specified, must be between 0 and 7"),
    ("state=active", "sec0", "'new-secret' is required to activate a keyslot"),
    ("state=active,keyslot=-1,new-secret=sec1", "sec0", "Invalid keyslot 4294967295 specified, must be between 0 and 7"),
    ("state=active,new-secret=sec1,old-secret=sec0", "sec0", "'old-secret' must not be given when activating keyslots"),
    ("state=active,new-secret=nope", "sec0", "No secret with id 'nope'"),
    ("state=inactive,new-secret=sec1", "sec0", "'new-secret' must not be given when erasing keyslots"),
    ("state=inactive,keyslot=0,iter-time=10", "sec0", "'iter-time' must not be given when erasing keyslots"),
    ("state=inactive", "sec0", "To erase keyslot(s), either explicit keyslot index or the password currently "
                               "contained in them must be given"),
    ("state=inactive,keyslot=3", "sec0", "Given keyslot 3 is already erased (inactive)"),
    ("state=inactive,keyslot=-1", "sec0", "Invalid keyslot -1 specified, must be between 0 and 7"),
    ("state=inactive,keyslot=8", "sec0", "Invalid keyslot 8 specified, must be between 0 and 7"),
    ("state=inactive,old-secret=sec0", "sec0", "All the active keyslots match the (old) password that was given and "
                                               "erasing them will erase all the data in the image irreversibly - "
                                               "refusing operation"),
    ("state=inactive,old-secret=sec1", "sec0", "No keyslots match given (old) password for erase operation"),
    ("state=inactive,keyslot=0,old-secret=sec1", "sec0",
     "Given keyslot 0 doesn't contain the given old password for erase operation"),
    ("state=foo", "sec0", "Parameter 'state' does not accept value 'foo'"),
    ("keyslot=1", "sec0", "Parameter 'state' is missing"),
    ("state=inactive,keyslot=abc", "sec0", "Parameter 'keyslot' expects a number"),
    ("state=active,new-secret=sec1,iter-time=x", "sec0", "Parameter 'iter-time' expects a number"),
    ("bogus=1", "sec0", "Invalid parameter 'bogus'"),
    ("state=inactive,keyslot=1", "sec2", "Invalid password, cannot unlock any keyslot"),
    ("state=active,new-secret=sec1", "nope", "No secret with id 'nope'"),
]


@pytest.mark.parametrize("options, sid, expected", REFUSALS, ids=[r[0] + "/" + r[1] for r in REFUSALS])
def test_refusals_as_qemu_img(tmp_path, options, sid, expected):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    twin = tmp_path / "twin.luks"
    shutil.copyfile(path, twin)
    before = sha(path)
    mine = vdisk_amend(path, options, sid)
    theirs = qemu_amend(twin, options, sid)
    assert (mine.returncode, theirs.returncode) == (1, 1), mine.stderr
    assert message(mine.stderr, "vdisk: amend: ", path) == message(theirs.stderr.decode(), "qemu-img: ", twin) == expected
    assert sha(path) == before == sha(twin)


def test_all_slots_in_use(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    for slot in range(1, 8):
        assert vdisk_amend(path, "state=active,new-secret=sec1,iter-time=10,keyslot=%d" % slot).returncode == 0
    twin = tmp_path / "twin.luks"
    shutil.copyfile(path, twin)
    before = sha(path)
    mine = vdisk_amend(path, "state=active,new-secret=sec2,iter-time=10")
    theirs = qemu_amend(twin, "state=active,new-secret=sec2,iter-time=10")
    assert mine.returncode == theirs.returncode == 1
    assert message(mine.stderr, "vdisk: amend: ", path) == message(theirs.stderr.decode(), "qemu-img: ", twin) == \
        "Can't add a keyslot - all keyslots are in use"
    assert sha(path) == before


def test_missing_key_secret_as_qemu_img(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    before = sha(path)
    mine = helpers.vdisk_cli("amend", *OBJECTS, "-f", "luks", "-o", "state=inactive,keyslot=0", path)
    theirs = helpers.qemu_img("amend", *OBJECTS, "-f", "luks", "-o", "state=inactive,keyslot=0", path)
    assert mine.returncode == theirs.returncode == 1
    assert message(mine.stderr, "vdisk: amend: ", path) == message(theirs.stderr.decode(), "qemu-img: ", path) == \
        "Parameter 'key-secret' is required for cipher"
    assert sha(path) == before


def test_qemu_img_amend_read_by_vdisk(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    qemu_amend(path, "state=active,new-secret=sec1,keyslot=3,iter-time=10", derive=True)
    qemu_amend(path, "state=active,new-secret=sec2,iter-time=10", derive=True)
    mine = json.loads(helpers.vdisk_cli("info", "--output=json", path, check=True).stdout)
    assert mine["format-specific"]["data"]["slots"] == slots(path)
    assert [s["active"] for s in slots(path)] == [True, True, False, True] + [False] * 4
    # vdisk opens with the slots qemu-img added, and erases one of them
    for sid in ("sec1", "sec2"):
        out = tmp_path / ("%s.raw" % sid)
        proc = helpers.vdisk_cli("convert", *OBJECTS, "--image-opts", opts(path, sid), "-O", "raw", out)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes()[:65536] == bytes([PATTERN]) * 65536
    assert vdisk_amend(path, "state=inactive,old-secret=sec1", "sec2").returncode == 0
    assert active(path) == [True, True] + [False] * 6


def _without_iters(info):
    data = dict(info["format-specific"]["data"])
    data["slots"] = [{k: v for k, v in s.items() if k != "iters"} for s in data["slots"]]
    return data


def test_same_amend_sequence_same_info(tmp_path):
    path = tmp_path / "a.luks"
    qemu_luks(path)
    twin = tmp_path / "twin.luks"
    shutil.copyfile(path, twin)
    sequence = [
        ("state=active,new-secret=sec1,iter-time=10", "sec0", ()),
        ("state=active,new-secret=sec2,keyslot=6,iter-time=10", "sec1", ()),
        ("state=inactive,old-secret=sec1", "sec0", ()),
        ("state=active,new-secret=sec1,keyslot=6,iter-time=10", "sec0", ("--force",)),
        ("state=inactive,keyslot=0", "sec1", ()),
    ]
    for options, sid, extra in sequence:
        proc = vdisk_amend(path, options, sid, *extra)
        assert proc.returncode == 0, proc.stderr
        qemu_amend(twin, options, sid, *extra, derive=True)
    mine = json.loads(helpers.vdisk_cli("info", "--output=json", path, check=True).stdout)
    theirs = helpers.qemu_info(str(twin))
    assert _without_iters(mine) == _without_iters(theirs) == _without_iters(helpers.qemu_info(str(path)))
    assert [s["active"] for s in mine["format-specific"]["data"]["slots"]] == [False] * 6 + [True, False]
    for image in (path, twin):
        assert qemu_reads(image, "sec1")[0]
        assert not qemu_reads(image, "sec0")[0]
        assert not qemu_reads(image, "sec2")[0]
    # the header outside the active slot's salt and count is byte for byte qemu-img's
    mine_hdr, their_hdr = path.read_bytes()[:592], twin.read_bytes()[:592]
    slot6 = HEADER_SIZE + 6 * SLOT_SIZE
    assert mine_hdr[:slot6] == their_hdr[:slot6] and mine_hdr[slot6 + SLOT_SIZE:] == their_hdr[slot6 + SLOT_SIZE:]
