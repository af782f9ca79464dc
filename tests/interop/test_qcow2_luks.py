"""qcow2 with LUKS encryption (encrypt.format=luks) against qemu-img 7.2, both directions.

qemu-img-made encrypted images (every cipher combination vdisk supports, written by qemu-io) read
byte-identically in vdisk; vdisk-made ones open in qemu-img with the same secret (compare, check,
convert); info, check, map and measure give qemu-img's answers; a wrong secret is refused with
QEMU's message and nothing written; no guest pattern is left in clear in the file. QEMU facts
these pin down: data units are numbered by their HOST offset (crypt_physical_offset), the LUKS
header sits in clusters after the L1 table with the extension's length = its payload offset.
"""
import contextlib
import hashlib
import json

import cryptography  # noqa: F401  (required: no skip when it is missing)
import pytest

import helpers
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import header as qhdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2.driver import DRIVER
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.map import map_entries

SECRET = "PASS-w0rd"
OBJECT = ["--object", "secret,id=sec0,data=%s" % SECRET]
WRONG = ["--object", "secret,id=sec0,data=not-it"]
MARK = b"VDISK-QCOW2-LUKS-PATTERN!"

COMBOS = [{"cipher-alg": alg, "cipher-mode": mode, "ivgen-alg": iv}
          for alg in ("aes-128", "aes-256") for mode in ("xts", "cbc") for iv in ("plain", "plain64", "essiv")]
for c in COMBOS:
    if c["ivgen-alg"] == "essiv":
        c["ivgen-hash-alg"] = "sha256"
IDS = ["-".join(c.values()) for c in COMBOS]


def image_opts(path):
    return "driver=qcow2,encrypt.key-secret=sec0,file.filename=%s" % path


def enc_opts(**opts):
    return ",".join(["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10"]
                    + ["encrypt.%s=%s" % kv for kv in opts.items()])


def qemu_create(path, size, *extra, **opts):
    helpers.qemu_img_pbkdf2("create", "-q", "-f", "qcow2", *OBJECT, "-o", enc_opts(**opts), *extra, path, size)
    return str(path)


def vdisk_create(path, size, **opts):
    options = {"encrypt.format": "luks", "encrypt.key-secret": SECRET.encode(), "encrypt.iter-time": 10}
    options.update({"encrypt." + k: v for k, v in opts.items()})
    DRIVER.create(str(path), size, options)
    return str(path)


def vdisk_open(path, writable=False, secret=SECRET):
    return DRIVER.open(str(path), writable, Policy(passphrase=None if secret is None else secret.encode()))


def qemu_io(path, *cmds):
    return helpers.qemu_io_opts(OBJECT, image_opts(path), *cmds)


def qemu_raw(path, tmp_path):
    out = tmp_path / "qemu.raw"
    proc = helpers.qemu_img("convert", *OBJECT, "--image-opts", image_opts(path), "-O", "raw", out)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def qemu_compare_raw(path, raw):
    proc = helpers.qemu_img("compare", *OBJECT, "--image-opts", image_opts(path),
                            "driver=raw,file.filename=%s" % raw)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def qemu_check(path):
    proc = helpers.qemu_img("check", "--output=json", *OBJECT, "--image-opts", image_opts(path))
    result = json.loads(proc.stdout)
    result["rc"] = proc.returncode
    return result


def vdisk_read_all(path):
    with vdisk_open(path) as img:
        return img.read(0, img.virtual_size)


def guest_data(size):
    return helpers.marked_pattern(size, MARK)


def sha(path):
    return hashlib.sha256(open(str(path), "rb").read()).hexdigest()


def crypto_pointer(path):
    with vdisk_open(path, secret=None) as img:
        return img.header.crypt_method, img.header.crypto_header(), img.cs


# -- qemu-img creates and writes, vdisk reads -------------------------------------------------------
@pytest.mark.parametrize("opts", COMBOS, ids=IDS)
def test_qemu_images_read_identically(tmp_path, opts):
    path = qemu_create(tmp_path / "q.qcow2", 3 * MiB + 1024, **opts)
    qemu_io(path, "write -P 0x5a 0 64k", "write -P 0xa5 1000 70000", "write -P 0x11 2M 513",
            "write -z 1M 128k", "write -P 0x22 3M 1024")
    expected = qemu_raw(path, tmp_path)
    assert vdisk_read_all(path) == expected
    # vdisk writes into it (partial clusters, a new cluster), qemu-img reads them back
    with vdisk_open(path, writable=True) as img:
        img.write(100, b"\x77" * 300)
        img.write(2 * MiB + 70000, guest_data(5000))
        img.flush()
    expected = bytearray(expected)
    expected[100:400] = b"\x77" * 300
    expected[2 * MiB + 70000:2 * MiB + 75000] = guest_data(5000)
    assert qemu_raw(path, tmp_path) == bytes(expected)
    assert qemu_check(path)["rc"] == 0


def test_data_units_numbered_by_host_offset(tmp_path):
    """QEMU's crypt_physical_offset: the same plaintext in two clusters encrypts differently, and the
    IV of a unit is its host sector (decrypting with the guest sector gives noise)."""
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks.cipher import SectorCipher
    path = qemu_create(tmp_path / "q.qcow2", 4 * MiB)
    qemu_io(path, "write -P 0x33 3M 64k")
    with vdisk_open(path) as img:
        host = [e for e in map_entries(img) if e["data"]][0]
        assert img.read(3 * MiB, 512) == b"\x33" * 512
        entry = img._segments(3 * MiB, 512).__next__()        # (guest, n, kind, host, entry)
        host_off = entry[3]
        assert host_off != 3 * MiB and host is not None
        cipher = img.crypto.cipher()
        raw = open(path, "rb").read()[host_off:host_off + 512]
        assert bytes(cipher.decrypt(host_off // 512, raw)) == b"\x33" * 512
        assert bytes(cipher.decrypt(3 * MiB // 512, raw)) != b"\x33" * 512
        assert isinstance(cipher, SectorCipher)


# -- vdisk creates, qemu-img reads ------------------------------------------------------------------
@pytest.mark.parametrize("opts", [COMBOS[1], COMBOS[8], COMBOS[11]], ids=[IDS[1], IDS[8], IDS[11]])
def test_vdisk_images_open_in_qemu(tmp_path, opts):
    path = vdisk_create(tmp_path / "v.qcow2", 4 * MiB, **opts)
    data = guest_data(300000)
    with vdisk_open(path, writable=True) as img:
        img.write(12345, data)
        img.write_zeroes(2 * MiB, 64 * 1024)
        img.flush()
    raw = tmp_path / "expected.raw"
    helpers.make_raw(raw, 4 * MiB)
    with open(str(raw), "r+b") as f:
        f.seek(12345)
        f.write(data)
    assert qemu_compare_raw(path, raw)
    assert MARK not in open(path, "rb").read()
    check = qemu_check(path)
    assert check["rc"] == 0 and "corruptions" not in check and "leaks" not in check
    # the layout qemu-img gives: crypt_method 2, the LUKS header in the clusters after the L1 table
    crypt_method, pointer, cs = crypto_pointer(path)
    assert crypt_method == qhdr.CRYPT_LUKS
    qpath = qemu_create(tmp_path / "q.qcow2", 4 * MiB, **opts)
    assert crypto_pointer(qpath) == (crypt_method, pointer, cs)
    assert qemu_info(path)["format-specific"]["data"]["encrypt"]["payload-offset"] == pointer.encryption_header_length


def qemu_info(path):
    return helpers.qemu_info(path)


def test_info_json_and_text_match_qemu(tmp_path):
    for path in (qemu_create(tmp_path / "q.qcow2", 2 * MiB, **{"cipher-mode": "cbc", "ivgen-alg": "essiv"}),
                 vdisk_create(tmp_path / "v.qcow2", 2 * MiB)):
        q = qemu_info(path)
        v = json.loads(helpers.vdisk_cli("info", "--output=json", path, check=True).stdout)
        assert v == q and v["encrypted"] is True and v["format-specific"]["data"]["encrypt"]["format"] == "luks"
        qtext = helpers.qemu_img("info", path, check=True).stdout.decode()
        assert helpers.vdisk_cli("info", path, check=True).stdout == qtext
        with vdisk_open(path, secret=None) as img:
            assert img.encrypted


def test_map_matches_qemu(tmp_path):
    path = qemu_create(tmp_path / "q.qcow2", 4 * MiB)
    qemu_io(path, "write -P 1 0 100k", "write -z 1M 64k", "write -P 2 3M 4k")
    q = json.loads(helpers.qemu_img("map", "--output=json", *OBJECT, "--image-opts", image_opts(path),
                                    check=True).stdout)
    v = json.loads(helpers.vdisk_cli("map", "--output=json", path, check=True).stdout)
    assert v == q


# -- secrets ---------------------------------------------------------------------------------------
def test_wrong_or_missing_passphrase(tmp_path):
    path = qemu_create(tmp_path / "q.qcow2", 2 * MiB)
    qemu_io(path, "write -P 0x5a 0 64k")
    before = sha(path)
    proc = helpers.qemu_img("convert", *WRONG, "--image-opts", image_opts(path), "-O", "raw", tmp_path / "x.raw")
    assert b"Invalid password, cannot unlock any keyslot" in proc.stderr
    with pytest.raises(Exception) as exc:
        vdisk_open(path, writable=True, secret="not-it")
    assert "Invalid password, cannot unlock any keyslot" in str(exc.value)
    proc = helpers.vdisk_cli("convert", *WRONG, "--image-opts", image_opts(path), "-O", "raw", tmp_path / "v.raw")
    assert proc.returncode != 0 and "Invalid password, cannot unlock any keyslot" in proc.stderr
    # without a key: structures open, the first data access asks for it, as qemu-img
    with vdisk_open(path, secret=None) as img:
        with pytest.raises(Exception) as exc:
            img.read(0, 512)
    assert "Parameter 'encrypt.key-secret' is required for cipher" in str(exc.value)
    assert b"Parameter 'encrypt.key-secret' is required for cipher" in helpers.qemu_img(
        "convert", "-O", "raw", path, tmp_path / "y.raw").stderr
    assert sha(path) == before


def test_create_refusals_match_qemu(tmp_path):
    for opts, message in ((["-o", "encrypt.format=luks"], "Parameter 'encrypt.key-secret' is required for cipher"),
                          (OBJECT + ["-o", enc_opts(**{"cipher-alg": "foo"})],
                           "Parameter 'cipher-alg' does not accept value 'foo'"),
                          (["-o", "encrypt.format=bla"], "Parameter 'format' does not accept value 'bla'")):
        q = helpers.qemu_img("create", "-f", "qcow2", *opts, tmp_path / "q.qcow2", "1M")
        assert q.returncode != 0 and message in q.stderr.decode()
        v = helpers.vdisk_cli("create", "-f", "qcow2", *opts, tmp_path / "v.qcow2", "1M")
        assert v.returncode != 0 and message in v.stderr, v.stderr
    help_text = helpers.vdisk_cli("create", "-f", "qcow2", "-o", "help", check=True).stdout
    qhelp = helpers.qemu_img("create", "-f", "qcow2", "-o", "help").stdout.decode()
    for line in qhelp.splitlines():
        if line.strip().startswith("encrypt"):
            assert line in help_text.splitlines(), line


def test_compression_refused_as_qemu(tmp_path):
    src = tmp_path / "src.raw"
    helpers.make_raw(src, 2 * MiB, [(0, MiB)])
    args = ["convert", "-c", *OBJECT, "-O", "qcow2", "-o", enc_opts(), src]
    q = helpers.qemu_img(*args, tmp_path / "q.qcow2")
    v = helpers.vdisk_cli(*args, tmp_path / "v.qcow2")
    message = "Compression and encryption not supported at the same time"
    assert message in q.stderr.decode() and message in v.stderr and v.returncode != 0
    assert not (tmp_path / "v.qcow2").exists()


# -- convert both ways -----------------------------------------------------------------------------
def test_convert_plain_to_encrypted_and_back(tmp_path):
    src = tmp_path / "src.raw"
    with open(str(src), "wb") as f:
        f.truncate(5 * MiB)
        f.seek(4096)
        f.write(guest_data(MiB + 777 * 512))
        f.seek(4 * MiB + 512)
        f.write(guest_data(8192))
    enc = tmp_path / "enc.qcow2"
    helpers.vdisk_cli("convert", *OBJECT, "-O", "qcow2", "-o", enc_opts(), src, enc, check=True)
    assert MARK not in enc.read_bytes()
    assert qemu_compare_raw(enc, src)
    assert qemu_check(enc)["rc"] == 0
    back = tmp_path / "back.raw"
    helpers.vdisk_cli("convert", *OBJECT, "--image-opts", image_opts(enc), "-O", "raw", back, check=True)
    assert back.read_bytes() == src.read_bytes()
    plain = tmp_path / "plain.qcow2"
    helpers.vdisk_cli("convert", *OBJECT, "--image-opts", image_opts(enc), "-O", "qcow2", plain, check=True)
    assert helpers.qemu_compare(str(plain), str(src))
    # an encrypted qcow2 made by qemu-img converts to an encrypted one made by vdisk
    qenc = tmp_path / "qenc.qcow2"
    helpers.qemu_img_pbkdf2("convert", *OBJECT, "-O", "qcow2", "-o", enc_opts(), src, qenc)
    enc2 = tmp_path / "enc2.qcow2"
    helpers.vdisk_cli("convert", *OBJECT, "--image-opts", image_opts(qenc), "-O", "qcow2", "-o", enc_opts(),
                      enc2, check=True)
    assert qemu_compare_raw(enc2, src)


def test_backing_copy_on_write(tmp_path):
    base = tmp_path / "base.raw"
    helpers.make_raw(base, 2 * MiB, [(0, 2 * MiB)])
    top = tmp_path / "top.qcow2"
    DRIVER.create(str(top), 2 * MiB, {"encrypt.format": "luks", "encrypt.key-secret": SECRET.encode(),
                                      "encrypt.iter-time": 10, "backing_file": str(base), "backing_fmt": "raw"})
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import open_image, close_chain
    img = open_image(str(top), "qcow2", writable=True, policy=Policy(passphrase=SECRET.encode()))
    try:
        img.write(70000, b"\xee" * 1000)        # partial cluster over the backing file: copy-on-write
        img.flush()
    finally:
        close_chain(img)
    expected = bytearray(base.read_bytes())
    expected[70000:71000] = b"\xee" * 1000
    exp = tmp_path / "exp.raw"
    exp.write_bytes(bytes(expected))
    assert qemu_compare_raw(top, exp)
    assert qemu_check(top)["rc"] == 0


# -- check, measure, snapshots, resize ------------------------------------------------------------
def test_check_agrees(tmp_path):
    path = qemu_create(tmp_path / "q.qcow2", 4 * MiB)
    qemu_io(path, "write -P 1 0 200k", "write -P 2 3M 64k")
    q = qemu_check(path)
    v = json.loads(helpers.vdisk_cli("check", "--output=json", path).stdout)
    for key in ("allocated-clusters", "total-clusters", "image-end-offset", "check-errors"):
        assert v.get(key) == q.get(key), key


@pytest.mark.parametrize("size,extra", [("1G", ""), ("100G", ",cluster_size=4096"), ("3M", ",encrypt.cipher-alg=aes-128")])
def test_measure_matches_qemu(size, extra):
    proc = helpers.qemu_img_pbkdf2("measure", "--output=json", *OBJECT, "-O", "qcow2", "-o", enc_opts() + extra,
                                   "--size", size)
    q = json.loads(proc.stdout)
    options = {"encrypt.format": "luks", "encrypt.key-secret": SECRET.encode()}
    for item in extra.strip(",").split(",") if extra else ():
        k, val = item.split("=")
        options[k] = int(val) if k == "cluster_size" else val
    v = DRIVER.measure({"1G": 1 << 30, "100G": 100 << 30, "3M": 3 * MiB}[size], options, None)
    assert v == q


def test_snapshot_and_resize(tmp_path):
    path = vdisk_create(tmp_path / "v.qcow2", 2 * MiB)
    with vdisk_open(path, writable=True) as img:
        img.write(0, b"\x01" * 4096)
        img.create_snapshot("s1")
        img.write(0, b"\x02" * 4096)
        img.resize(3 * MiB)
        img.write(2 * MiB + 512, b"\x03" * 4096)
        img.flush()
    assert qemu_check(path)["rc"] == 0
    qemu_io(path, "read -P 0x02 0 4k", "read -P 0x03 2097664 4k")
    with vdisk_open(path, writable=True) as img:
        img.apply_snapshot("s1")
        img.flush()
    qemu_io(path, "read -P 0x01 0 4k")


def test_amend_key_slots_as_qemu_img(tmp_path):
    """vdisk amend -o encrypt.state=active,encrypt.new-secret=... adds a slot that qemu-io opens the image
    with; encrypt.state=inactive,encrypt.keyslot=0 erases the first, which qemu-img then refuses; the
    data stays readable with the remaining secret."""
    path = vdisk_create(tmp_path / "a.qcow2", MiB)
    qemu_io(path, "write -P 0x3c 4096 65536")
    second = ["--object", "secret,id=sec1,data=second-PASS"]
    opts1 = "driver=qcow2,encrypt.key-secret=sec1,file.filename=%s" % path
    proc = helpers.vdisk_cli("amend", *OBJECT, *second, "--image-opts", image_opts(path),
                             "-o", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10")
    assert proc.returncode == 0, proc.stderr
    io = helpers.run("qemu-io", *second, "--image-opts", opts1, "-c", "read -P 0x3c 4096 65536", check=False)
    assert io.returncode == 0, io.stderr
    assert b"Pattern verification failed" not in io.stdout
    with vdisk_open(path) as img:
        slots = img.info()["format-specific"]["data"]["encrypt"]["slots"]
    assert [s["active"] for s in slots[:2]] == [True, True]
    proc = helpers.vdisk_cli("amend", *OBJECT, "--image-opts", image_opts(path),
                             "-o", "encrypt.state=inactive,encrypt.keyslot=0")
    assert proc.returncode == 0, proc.stderr
    refused = helpers.qemu_img("info", *OBJECT, "--image-opts", image_opts(path))
    assert refused.returncode == 0                      # info needs no key
    refused = helpers.run("qemu-io", *OBJECT, "--image-opts", image_opts(path), "-c", "read 0 512", check=False)
    assert b"Invalid password, cannot unlock any keyslot" in refused.stderr
    io = helpers.run("qemu-io", *second, "--image-opts", opts1, "-c", "read -P 0x3c 4096 65536", check=False)
    assert io.returncode == 0, io.stderr
    assert b"Pattern verification failed" not in io.stdout
    check = helpers.qemu_img("check", *second, "--image-opts", opts1)
    assert check.returncode == 0, check.stdout + check.stderr


def test_amend_key_slots_of_a_plain_qcow2_refused(tmp_path):
    path = tmp_path / "p.qcow2"
    helpers.qemu_img("create", "-f", "qcow2", path, "1M", check=True)
    before = path.read_bytes()
    proc = helpers.vdisk_cli("amend", "-f", "qcow2", "-o", "encrypt.state=inactive,encrypt.keyslot=0", str(path))
    assert proc.returncode == 1
    assert "not encrypted" in proc.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize("target", [["-O", "luks", "-o", "key-secret=sec0"],
                                    ["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0"]])
def test_measure_cli_takes_the_secret_as_qemu_img(target):
    """vdisk measure --object secret,... -o ...key-secret=ID: the numbers of qemu-img measure."""
    args = ["measure", "--output=json", *OBJECT, *target, "--size", "1G"]
    theirs = helpers.qemu_img_pbkdf2(*args)
    mine = helpers.vdisk_cli(*args)
    assert mine.returncode == 0, mine.stderr
    assert json.loads(mine.stdout) == json.loads(theirs.stdout)


# -- with an external data file (-o data_file=...) --------------------------------------------------
@contextlib.contextmanager
def opened(path, writable=True):
    """The image through ops.chain (whose policy allows the data file beside it), unlocked."""
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import open_image, close_chain
    img = open_image(str(path), "qcow2", writable=writable, policy=Policy(passphrase=SECRET.encode()))
    try:
        yield img
    finally:
        close_chain(img)


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_external_data_file_both_ways(tmp_path, raw):
    """LUKS with the guest clusters in an external data file: vdisk's image opens in qemu-img (compare,
    check, info); qemu-img's, written by qemu-io, reads identically in vdisk, and what vdisk writes into
    it qemu-img reads back. The data file holds ciphertext only. With data_file_raw every cluster is
    mapped to the data file from the start (QEMU preallocates the metadata), whose zeros decrypt to noise:
    qemu-img reads that noise where nothing was written, and so does vdisk."""
    size = 3 * MiB
    # vdisk creates and writes, qemu-img reads
    vpath = tmp_path / "v.qcow2"
    vdata = tmp_path / "v.data"
    options = {"encrypt.format": "luks", "encrypt.key-secret": SECRET.encode(), "encrypt.iter-time": 10,
               "data_file": str(vdata), "data_file_raw": raw}
    DRIVER.create(str(vpath), size, options)
    content = bytearray(size)
    content[4096:4096 + 200000] = guest_data(200000)
    content[2 * MiB + 100:2 * MiB + 1100] = b"\x42" * 1000
    with opened(vpath) as img:
        img.write(4096, bytes(content[4096:4096 + 200000]))
        img.write(2 * MiB + 100, b"\x42" * 1000)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(bytes(content))
    assert MARK not in vdata.read_bytes() and MARK not in vpath.read_bytes()
    theirs = qemu_raw(vpath, tmp_path)
    with opened(vpath, writable=False) as img:
        assert img.read(0, size) == theirs
    assert theirs[4096:4096 + 200000] == content[4096:4096 + 200000]
    assert theirs[2 * MiB + 100:2 * MiB + 1100] == b"\x42" * 1000
    assert qemu_compare_raw(vpath, expected) is not raw
    assert qemu_check(vpath)["rc"] == 0
    q = qemu_info(vpath)
    v = json.loads(helpers.vdisk_cli("info", "--output=json", vpath, check=True).stdout)
    assert v == q and q["format-specific"]["data"]["data-file"] == str(vdata)
    assert helpers.vdisk_cli("info", vpath, check=True).stdout == helpers.qemu_img("info", vpath).stdout.decode()
    # qemu-img creates, qemu-io writes, vdisk reads; vdisk writes, qemu-img reads
    qpath = qemu_create(tmp_path / "q.qcow2", size, "-o", "data_file=%s" % (tmp_path / "q.data"), *(
        ["-o", "data_file_raw=on"] if raw else []))
    qemu_io(str(qpath), "write -P 0x5a 0 64k", "write -P 0xa5 1000 70000", "write -z 1M 128k",
            "write -P 0x22 2M 1024")
    with opened(qpath, writable=False) as img:
        assert img.read(0, size) == qemu_raw(qpath, tmp_path)
    with opened(qpath) as img:
        img.write(300, b"\x77" * 700)
        img.write(MiB + 4096, b"\x66" * 8192)
    qemu_io(str(qpath), "read -P 0x77 300 700", "read -P 0x66 1052672 8192", "read -P 0x22 2M 1024")
    assert qemu_check(qpath)["rc"] == 0
    with opened(qpath, writable=False) as img:
        assert img.read(0, size) == qemu_raw(qpath, tmp_path)


# -- amend -o help ------------------------------------------------------------------------------------
def test_amend_help_lists_qemu_img_options(tmp_path):
    """vdisk amend -f qcow2 -o help: qemu-img 7.2's list (its amendable options and the encrypt.* key-slot
    ones), without opening the image; with an image (no -f), the same list."""
    theirs = helpers.qemu_img("amend", "-f", "qcow2", "-o", "help", tmp_path / "none.qcow2")
    mine = helpers.vdisk_cli("amend", "-f", "qcow2", "-o", "help", tmp_path / "none.qcow2")
    assert mine.returncode == theirs.returncode == 0, mine.stderr
    assert mine.stdout == theirs.stdout.decode()
    assert "encrypt.new-secret=<str>" in mine.stdout and "encrypt.keyslot=<num>" in mine.stdout
    path = vdisk_create(tmp_path / "a.qcow2", MiB)
    mine = helpers.vdisk_cli("amend", "-o", "help", path)
    assert mine.returncode == 0 and mine.stdout == theirs.stdout.decode()
