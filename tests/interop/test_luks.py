"""luks against qemu-img 7.2: both directions over the supported cipher matrix.

Images qemu-img creates (and qemu-io writes, unaligned ranges too) read byte-identically through
vdisk, and vdisk's writes into them read back through qemu-img; images vdisk creates and writes
open in qemu-img with the same secret (``convert``, ``compare``), show the same ``info`` and
``map``, and refuse a wrong secret in both; no recognizable guest data is left in clear anywhere in
the file; sizes, resize, preallocation and header damage as qemu-img has them. Iteration counts
are kept tiny (``iter-time=10``): the cost is in qemu-img's own PBKDF2 calibration.
"""
import json
import os

import pytest

import helpers
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks import DRIVER, keys
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.map import map_entries
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import probe_file

pytest.importorskip("cryptography")

SECRET = "PASS-w0rd"
OBJECT = ["--object", "secret,id=sec0,data=%s" % SECRET]
WRONG = ["--object", "secret,id=sec0,data=not-it"]
MARK = b"VDISK-LUKS-GUEST-PATTERN!"             # must never be found in clear in an encrypted file

# the supported matrix: cipher-alg, cipher-mode, ivgen-alg (ivgen-hash-alg), hash-alg
COMBOS = [
    {},                                                                     # aes-256-xts-plain64, sha256
    {"cipher-alg": "aes-128"},
    {"cipher-mode": "cbc", "ivgen-alg": "essiv"},
    {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv"},   # ESSIV with AES-256
    {"cipher-mode": "cbc", "ivgen-alg": "plain64"},
    {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "plain64", "hash-alg": "sha1"},
    {"cipher-mode": "cbc", "ivgen-alg": "plain", "hash-alg": "sha512"},
    {"ivgen-alg": "essiv", "ivgen-hash-alg": "md5"},
]
IDS = ["-".join(v for v in c.values()) or "default" for c in COMBOS]


def image_opts(path):
    return "driver=luks,key-secret=sec0,file.filename=%s" % path


def qemu_create(path, size, **opts):
    options = ",".join(["key-secret=sec0", "iter-time=10"] + ["%s=%s" % kv for kv in opts.items()])
    helpers.qemu_img_pbkdf2("create", "-q", "-f", "luks", *OBJECT, "-o", options, path, size)
    return str(path)


def vdisk_create(path, size, **opts):
    DRIVER.create(str(path), size, dict({"key-secret": SECRET.encode(), "iter-time": 10}, **opts))
    return str(path)


def vdisk_open(path, writable=False, secret=SECRET):
    return DRIVER.open(str(path), writable, Policy(passphrase=None if secret is None else secret.encode()))


def qemu_raw(path, tmp_path, obj=OBJECT):
    out = tmp_path / "qemu.raw"
    proc = helpers.qemu_img("convert", *obj, "--image-opts", image_opts(path), "-O", "raw", out)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def qemu_io(path, *cmds):
    return helpers.qemu_io_opts(OBJECT, image_opts(path), *cmds)


def qemu_info(path, *extra):
    proc = helpers.qemu_img("info", "--output=json", *extra, path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def vdisk_read_all(path):
    with vdisk_open(path) as img:
        return img.read(0, img.virtual_size)


def guest_data(size):
    return helpers.marked_pattern(size, MARK)


def assert_info_matches(path, img):
    q = qemu_info(path)
    assert q["format-specific"] == img.info()["format-specific"]
    assert q["virtual-size"] == img.virtual_size and q["encrypted"] is True
    assert q["format"] == "luks" and probe_file(str(path)) == "luks"


# -- qemu-img creates, vdisk reads and writes ------------------------------------------------------
@pytest.mark.parametrize("opts", COMBOS, ids=IDS)
def test_qemu_images_read_identically_and_take_vdisk_writes(tmp_path, opts):
    path = qemu_create(tmp_path / "q.luks", 3 * MiB + 1000, **opts)
    qemu_io(path, "write -P 0x5a 0 64k", "write -P 0xa5 1000 3000", "write -P 0x11 2M 513",
            "write -P 0x77 3M 1000")
    expected = qemu_raw(path, tmp_path)
    with vdisk_open(path) as img:
        assert_info_matches(path, img)
        assert img.virtual_size == 3 * MiB + 1024          # the file's size rounded up to a sector
        assert img.read(0, img.virtual_size) == expected   # unwritten sectors too: ciphertext zeros, decrypted
        for offset, length in ((1, 511), (999, 3002), (2 * MiB - 7, 530), (3 * MiB + 1000, 24)):
            assert img.read(offset, length) == expected[offset:offset + length]
    data = bytearray(expected)
    with vdisk_open(path, writable=True) as img:
        for offset, length in ((0, 512), (700, 70000), (2 * MiB + 5, 1), (img.virtual_size - 300, 300)):
            piece = guest_data(length + 64)[64:]
            img.write(offset, piece)
            data[offset:offset + length] = piece
    assert qemu_raw(path, tmp_path) == bytes(data)
    assert vdisk_read_all(path) == bytes(data)


# -- vdisk creates and writes, qemu-img reads ---------------------------------------------------------
@pytest.mark.parametrize("opts", COMBOS, ids=IDS)
def test_vdisk_images_open_in_qemu(tmp_path, opts):
    size = 2 * MiB
    path = vdisk_create(tmp_path / "v.luks", size, **opts)
    data = guest_data(size)
    with vdisk_open(path, writable=True) as img:
        assert_info_matches(path, img)
        img.write(0, data[:MiB + 100])                   # unaligned end: the last sector is read back and patched
        img.write(MiB + 100, data[MiB + 100:])
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    assert qemu_raw(path, tmp_path) == data
    proc = helpers.qemu_img("compare", *OBJECT, "--image-opts", image_opts(path),
                            "driver=raw,file.filename=%s" % raw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    blob = open(path, "rb").read()
    assert MARK not in blob and data[:4096] not in blob
    # a wrong secret is refused by both
    proc = helpers.qemu_img("convert", *WRONG, "--image-opts", image_opts(path), "-O", "raw", tmp_path / "w.raw")
    assert proc.returncode != 0 and b"Invalid password, cannot unlock any keyslot" in proc.stderr
    before = open(path, "rb").read()
    with pytest.raises(keys.InvalidPassword, match="Invalid password, cannot unlock any keyslot"):
        vdisk_open(path, writable=True, secret="not-it")
    assert open(path, "rb").read() == before


def test_vdisk_image_info_map_and_header(tmp_path):
    path = vdisk_create(tmp_path / "v.luks", 10 * MiB)
    q = qemu_info(path)
    data = q["format-specific"]["data"]
    assert [s["key-offset"] for s in data["slots"]] == [4096 + i * 258048 for i in range(8)]
    assert data["payload-offset"] == 2068480 and os.path.getsize(path) == 2068480 + 10 * MiB
    assert data["slots"][0]["active"] and not any(s["active"] for s in data["slots"][1:])
    assert data["slots"][0]["iters"] >= 1000 and data["master-key-iters"] >= 1000
    assert (data["cipher-alg"], data["cipher-mode"], data["ivgen-alg"], data["hash-alg"]) == (
        "aes-256", "xts", "plain64", "sha256")
    proc = helpers.qemu_img("map", "--output=json", *OBJECT, "--image-opts", image_opts(path))
    qmap = json.loads(proc.stdout)
    with vdisk_open(path) as img:
        ours = [{k: v for k, v in e.items() if k != "_file"} for e in map_entries(img)]
    assert ours == qmap
    # sparse like qemu-img's: the header and slot 0's key material only
    assert qemu_info(path)["actual-size"] <= 300 * 1024
    with open(path, "rb") as f:
        h = hdr.parse_header(f.read(592))
    assert hdr.text(h.cipher_mode) == "xts-plain64" and h.slots[0].stripes == 4000


def test_info_without_secret_and_missing_secret(tmp_path):
    path = vdisk_create(tmp_path / "v.luks", MiB)
    with vdisk_open(path, secret=None) as img:
        assert_info_matches(path, img)
        with pytest.raises(errors.InvalidOption, match="Parameter 'key-secret' is required for cipher"):
            img.read(0, 512)
    proc = helpers.qemu_img("map", "--output=json", path)
    assert b"Parameter 'key-secret' is required for cipher" in proc.stderr
    proc = helpers.qemu_img("create", "-f", "luks", tmp_path / "q.luks", "1M")
    assert b"Parameter 'key-secret' is required for cipher" in proc.stderr
    with pytest.raises(errors.InvalidOption, match="Parameter 'key-secret' is required for cipher"):
        DRIVER.create(str(tmp_path / "n.luks"), MiB, {})
    assert not os.path.exists(tmp_path / "n.luks")


@pytest.mark.parametrize("size", [0, 1000, MiB + 512])
def test_sizes_as_qemu(tmp_path, size):
    q = qemu_create(tmp_path / "q.luks", size)
    v = vdisk_create(tmp_path / "v.luks", size)
    assert os.path.getsize(q) == os.path.getsize(v) == 2068480 + size
    with vdisk_open(v) as img:
        assert img.virtual_size == qemu_info(v)["virtual-size"] == qemu_info(q)["virtual-size"]
    with vdisk_open(q) as img:
        assert img.virtual_size == qemu_info(q)["virtual-size"]


def test_resize_as_qemu(tmp_path):
    path = vdisk_create(tmp_path / "v.luks", MiB)
    data = guest_data(MiB)
    with vdisk_open(path, writable=True) as img:
        img.write(0, data)
        img.resize(3 * MiB + 1000)
        assert img.virtual_size == 3 * MiB + 1024
        with pytest.raises(errors.ImageError, match="Use the --shrink option"):
            img.resize(MiB)
    assert os.path.getsize(path) == 2068480 + 3 * MiB + 1000
    assert qemu_info(path)["virtual-size"] == 3 * MiB + 1024
    assert qemu_raw(path, tmp_path)[:MiB] == data
    with vdisk_open(path, writable=True) as img:
        img.resize(MiB // 2, shrink=True)
    assert qemu_raw(path, tmp_path) == data[:MiB // 2]
    # and the other way round: qemu-img resizes, vdisk reads
    proc = helpers.qemu_img("resize", *OBJECT, "--image-opts", image_opts(path), "2M")
    assert proc.returncode == 0, proc.stderr
    with vdisk_open(path) as img:
        assert img.virtual_size == 2 * MiB and img.read(0, MiB // 2) == data[:MiB // 2]


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_preallocation_as_qemu(tmp_path, mode):
    q = qemu_create(tmp_path / "q.luks", MiB, preallocation=mode)
    v = vdisk_create(tmp_path / "v.luks", MiB, preallocation=mode)
    assert os.path.getsize(q) == os.path.getsize(v)
    assert abs(qemu_info(q)["actual-size"] - qemu_info(v)["actual-size"]) <= 64 * 1024
    assert qemu_raw(v, tmp_path) == vdisk_read_all(v)


def test_unsupported_cipher_made_by_qemu(tmp_path):
    path = qemu_create(tmp_path / "q.luks", MiB, **{"cipher-alg": "twofish-256"})
    with vdisk_open(path, secret=None) as img:
        assert_info_matches(path, img)            # info needs neither the key nor the cipher
    with pytest.raises(errors.UnsupportedFeature) as exc:
        vdisk_open(path)
    assert "twofish-256" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("field, offset, value, message", [
    ("stripes", hdr.slot_offset(3) + 44, (3999).to_bytes(4, "big"), "Keyslot 3 is corrupted (stripes 3999 != 4000)"),
    ("iterations", hdr.Header.offset("mk_digest_iter"), bytes(4), "LUKS key iteration count is zero"),
    ("version", 6, b"\x00\x02", None),
])
def test_damaged_headers_as_qemu(tmp_path, field, offset, value, message):
    path = vdisk_create(tmp_path / "v.luks", MiB)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)
    proc = helpers.qemu_img("info", *OBJECT, "--image-opts", image_opts(path))
    assert proc.returncode != 0
    with pytest.raises(errors.ImageError) as exc:
        vdisk_open(path)
    if message:
        assert message in str(exc.value) and message.encode() in proc.stderr


def test_large_round_trip(tmp_path):
    """16 MiB of random data written in one call and read back (the batched cipher paths; speed is
    the benchmark's business, never a timed assertion here)."""
    path = vdisk_create(tmp_path / "v.luks", 16 * MiB)
    data = os.urandom(16 * MiB)
    with vdisk_open(path, writable=True) as img:
        img.write(0, data)
        img.flush()
        assert img.read(0, 16 * MiB) == data
    assert qemu_raw(path, tmp_path) == data


def test_measure_as_qemu(tmp_path):
    proc = helpers.qemu_img_pbkdf2("measure", "--output=json", *OBJECT, "-O", "luks", "-o", "key-secret=sec0",
                                   "--size", "1G")
    assert DRIVER.measure(1 << 30, {}) == json.loads(proc.stdout)


def qemu_amend(path, *objects_and_options):
    helpers.qemu_img_pbkdf2("amend", *OBJECT, *objects_and_options[:-1], "--image-opts", image_opts(path),
                            "-o", objects_and_options[-1])


def test_key_slots_qemu_adds_and_erases(tmp_path):
    """qemu-img amend adds a second passphrase to a vdisk image (slot 1) and erases the first: vdisk
    unlocks with whichever slot is active, in slot order."""
    path = vdisk_create(tmp_path / "v.luks", MiB)
    data = guest_data(MiB)
    with vdisk_open(path, writable=True) as img:
        img.write(0, data)
    qemu_amend(path, "--object", "secret,id=sec1,data=second", "state=active,new-secret=sec1,iter-time=10")
    with vdisk_open(path, secret="second") as img:
        assert img.info()["format-specific"]["data"]["slots"][1]["active"] is True
        assert img.read(0, MiB) == data
    with vdisk_open(path) as img:
        assert img.read(0, MiB) == data
    qemu_amend(path, "state=inactive,keyslot=0")
    with pytest.raises(keys.InvalidPassword):
        vdisk_open(path)
    with vdisk_open(path, secret="second") as img:
        assert_info_matches(path, img)
        assert img.read(0, MiB) == data
