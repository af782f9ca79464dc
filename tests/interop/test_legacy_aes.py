"""Legacy AES-CBC encrypted qcow and qcow2 images (crypt_method 1) against qemu-img 7.2: read only.

qemu-img still creates them (``-o encrypt.format=aes,encrypt.key-secret=ID``) and qemu-io writes into
them; vdisk reads them with the same ``--object secret`` / ``--image-opts ...,encrypt.key-secret=ID``
as LUKS images and gives qemu-img's answers: the guest data byte for byte (convert, compare), info's
``encrypt: format: aes`` block, map, check, and QEMU's message without a secret. Writing into them,
creating them and amending them are refused in one line and leave the file as it was.

QEMU facts pinned here (crypto/block-qcow.c, block/qcow.c, block/qcow2.c): the key is the secret's
bytes zero-padded or cut to 16; AES-128-CBC with the plain64 IV of each 512-byte unit's number;
units numbered by GUEST offset (crypt_physical_offset is false), in qcow as in qcow2; compressed qcow
clusters are stored in clear; a wrong secret is not detected (the data decrypts to noise).
"""
import json
import struct

import cryptography  # noqa: F401  (required: no skip when it is missing)
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import helpers
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow import DRIVER as QCOW
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2.driver import DRIVER as QCOW2
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.compare import compare_images

SECRET = "PASS-w0rd"
OBJECT = ["--object", "secret,id=sec0,data=%s" % SECRET]
KEY_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher"
READ_ONLY = "are read-only in vdisk: the method is insecure"
DRIVERS = {"qcow": QCOW, "qcow2": QCOW2}
FORMATS = ["qcow", "qcow2"]

# qemu-io writes: partial sectors, several clusters, out of guest order (host order differs), zeros
WRITES = ["write -P 0x33 3M 4k", "write -P 0x5a 0 64k", "write -P 0xa5 1000 70000", "write -P 0x11 2M 513",
          "write -z 1M 128k", "write -P 0x22 1536k 1024"]


def image_opts(path, fmt):
    return "driver=%s,encrypt.key-secret=sec0,file.filename=%s" % (fmt, path)


def qemu_create(path, fmt, size, *options, secret_object=None):
    opts = ",".join(["encrypt.format=aes", "encrypt.key-secret=sec0"] + list(options))
    helpers.qemu_img("create", "-q", "-f", fmt, *(secret_object or OBJECT), "-o", opts, path, size, check=True)
    return str(path)


def qemu_io(path, fmt, *cmds, secret_object=None):
    args = ["qemu-io", *(secret_object or OBJECT), "--image-opts", image_opts(path, fmt)]
    for c in cmds:
        args += ["-c", c]
    out = helpers.run(*args).stdout.decode()
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    return out


def qemu_raw(path, fmt, tmp_path, secret_object=None):
    out = tmp_path / "qemu.raw"
    helpers.qemu_img("convert", *(secret_object or OBJECT), "--image-opts", image_opts(path, fmt), "-O", "raw",
                     out, check=True)
    return out.read_bytes()


def vdisk_open(path, fmt, writable=False, secret=SECRET):
    return DRIVERS[fmt].open(str(path), writable, Policy(passphrase=None if secret is None else secret.encode()))


def vdisk_read_all(path, fmt, secret=SECRET):
    img = open_image(str(path), fmt, policy=Policy(passphrase=None if secret is None else secret.encode()))
    try:
        return img.read(0, img.virtual_size)
    finally:
        close_chain(img)


def written(tmp_path, fmt, *options, size=4 * MiB):
    path = qemu_create(tmp_path / ("a." + fmt), fmt, size, *options)
    qemu_io(path, fmt, *WRITES)
    return path


# -- qemu-img creates, qemu-io writes, vdisk reads ---------------------------------------------------
@pytest.mark.parametrize("fmt,options", [("qcow", ()), ("qcow2", ()), ("qcow2", ("cluster_size=4096",)),
                                         ("qcow2", ("cluster_size=512", "compat=0.10")),
                                         ("qcow2", ("extended_l2=on", "cluster_size=64k"))],
                         ids=["qcow", "qcow2", "qcow2-4k", "qcow2-512-v2", "qcow2-extl2"])
def test_qemu_images_read_identically(tmp_path, fmt, options):
    path = written(tmp_path, fmt, *options)
    expected = qemu_raw(path, fmt, tmp_path)
    assert vdisk_read_all(path, fmt) == expected
    # read_into and unaligned reads take the same path
    with vdisk_open(path, fmt) as img:
        assert img.read(1001, 70001) == expected[1001:71002]
        view = memoryview(bytearray(3 * 512 + 7))
        img.read_into(2 * MiB + 3, view)
        assert bytes(view) == expected[2 * MiB + 3:2 * MiB + 3 + len(view)]
        assert img.encrypted
    # the CLI: convert to raw and to qcow2 with the secret, as qemu-img
    out = tmp_path / "v.raw"
    helpers.vdisk_cli("convert", *OBJECT, "--image-opts", image_opts(path, fmt), "-O", "raw", out, check=True)
    assert out.read_bytes() == expected
    plain = tmp_path / "plain.qcow2"
    helpers.vdisk_cli("convert", *OBJECT, "--image-opts", image_opts(path, fmt), "-O", "qcow2", plain, check=True)
    assert helpers.qemu_compare(str(plain), str(out))
    stored = open(path, "rb").read()
    assert b"\x5a" * 512 not in stored and b"\xa5" * 512 not in stored        # no guest sector in clear
    # compare (the engine's, with the secret in the policy): identical to the raw copy, and a change is seen
    assert compare_images(path, str(out), fmt, "raw", policy=Policy(passphrase=SECRET.encode()),
                          say=lambda line: None).exit_code == 0
    changed = bytearray(expected)
    changed[3 * MiB + 100] ^= 1
    out.write_bytes(bytes(changed))
    assert compare_images(path, str(out), fmt, "raw", policy=Policy(passphrase=SECRET.encode()),
                          say=lambda line: None).exit_code == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_to_luks_with_two_secrets(tmp_path, fmt):
    """The way out: the AES image's secret for the source, a new one for a LUKS qcow2; qemu-img agrees."""
    path = written(tmp_path, fmt)
    new = tmp_path / "new.qcow2"
    secrets = [*OBJECT, "--object", "secret,id=sec1,data=new-PASS"]
    helpers.vdisk_cli("convert", *secrets, "--image-opts", image_opts(path, fmt), "-O", "qcow2", "-o",
                      "encrypt.format=luks,encrypt.key-secret=sec1,encrypt.iter-time=10", new, check=True)
    proc = helpers.qemu_img("compare", *secrets, "--image-opts", image_opts(path, fmt),
                            "driver=qcow2,encrypt.key-secret=sec1,file.filename=%s" % new)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_qcow2_with_external_data_file(tmp_path):
    path = qemu_create(tmp_path / "d.qcow2", "qcow2", 4 * MiB, "data_file=%s" % (tmp_path / "d.data"),
                       "cluster_size=4096")
    qemu_io(path, "qcow2", *WRITES)
    assert vdisk_read_all(path, "qcow2") == qemu_raw(path, "qcow2", tmp_path)


def test_qcow_backing_file_and_compressed_cluster(tmp_path):
    """A qcow overlay (512-byte clusters over a raw base) and a compressed cluster, stored in clear."""
    base = tmp_path / "base.raw"
    helpers.make_raw(base, 2 * MiB, [(0, 2 * MiB)])
    path = qemu_create(tmp_path / "top.qcow", "qcow", 2 * MiB, "backing_file=%s" % base, "backing_fmt=raw")
    qemu_io(path, "qcow", "write -P 0x5a 700 3000", "write -P 0x66 1M 512")
    assert vdisk_read_all(path, "qcow") == qemu_raw(path, "qcow", tmp_path)
    plain = qemu_create(tmp_path / "c.qcow", "qcow", 2 * MiB)
    qemu_io(plain, "qcow", "write -c -P 0x44 8k 4k", "write -P 0x45 16k 4k")
    assert b"\x44" * 4096 not in open(plain, "rb").read()       # deflated, though not encrypted
    assert vdisk_read_all(plain, "qcow") == qemu_raw(plain, "qcow", tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_units_numbered_by_guest_offset_with_the_padded_key(tmp_path, fmt):
    """Computed independently: the unit at guest offset G is AES-128-CBC under the secret zero-padded
    to 16 bytes (or cut to 16), IV = G / 512 as 64-bit little-endian; the image holds exactly that."""
    for secret in ("short", "0123456789abcdefTAIL-DROPPED"):
        obj = ["--object", "secret,id=sec0,data=%s" % secret]
        path = qemu_create(tmp_path / ("k%d.%s" % (len(secret), fmt)), fmt, 4 * MiB, secret_object=obj)
        guest = 3 * MiB + 5 * 512                 # its cluster is the first allocated: host != guest
        qemu_io(path, fmt, "write -P 0x77 %d 512" % guest, "write -P 0x78 0 512", secret_object=obj)
        key = secret.encode()[:16].ljust(16, b"\0")
        enc = Cipher(algorithms.AES(key), modes.CBC(struct.pack("<QQ", guest // 512, 0))).encryptor()
        assert enc.update(b"\x77" * 512) + enc.finalize() in open(path, "rb").read()
        expected = qemu_raw(path, fmt, tmp_path, secret_object=obj)
        assert vdisk_read_all(path, fmt, secret=secret) == expected
        assert expected[guest:guest + 512] == b"\x77" * 512


# -- info, map, check ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_info_matches_qemu(tmp_path, fmt):
    path = written(tmp_path, fmt)
    q = helpers.qemu_info(path)
    v = json.loads(helpers.vdisk_cli("info", "--output=json", path, check=True).stdout)
    assert v == q and v["encrypted"] is True
    if fmt == "qcow2":
        assert v["format-specific"]["data"]["encrypt"] == {"format": "aes"}
    q_text = helpers.qemu_img("info", path, check=True)
    v_text = helpers.vdisk_cli("info", path, check=True)
    assert v_text.stdout == q_text.stdout.decode()
    assert v_text.stderr == q_text.stderr.decode() == ""          # qemu-img warns about nothing


@pytest.mark.parametrize("fmt", FORMATS)
def test_map_matches_qemu(tmp_path, fmt):
    path = written(tmp_path, fmt)
    args = ["map", "--output=json", *OBJECT, "--image-opts", image_opts(path, fmt)]
    q = helpers.qemu_img(*args)
    v = helpers.vdisk_cli(*args)
    assert v.returncode == q.returncode == 0, v.stderr
    assert json.loads(v.stdout) == json.loads(q.stdout)
    # encrypted data has no host offset: present and data, never "offset"
    assert all("offset" not in e for e in json.loads(v.stdout))


def test_check_matches_qemu(tmp_path):
    path = written(tmp_path, "qcow2")
    args = ["check", "--output=json", *OBJECT, "--image-opts", image_opts(path, "qcow2")]
    q = helpers.qemu_img(*args)
    v = helpers.vdisk_cli(*args)
    assert v.returncode == q.returncode == 0, v.stderr
    mine, theirs = json.loads(v.stdout), json.loads(q.stdout)
    assert theirs.pop("filename").endswith(mine.pop("filename"))     # qemu-img names the --image-opts string
    assert mine == theirs
    # qcow has no check, in both
    path = written(tmp_path, "qcow")
    args = ["check", *OBJECT, "--image-opts", image_opts(path, "qcow")]
    q = helpers.qemu_img(*args)
    v = helpers.vdisk_cli(*args)
    assert v.returncode == q.returncode == 63
    assert "This image format does not support checks" in v.stderr


# -- secrets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_or_wrong_secret(tmp_path, fmt):
    path = written(tmp_path, fmt)
    before = open(path, "rb").read()
    q = helpers.qemu_img("convert", "-O", "raw", path, tmp_path / "q.raw")
    v = helpers.vdisk_cli("convert", "-O", "raw", path, tmp_path / "v.raw")
    assert KEY_REQUIRED in q.stderr.decode() and KEY_REQUIRED in v.stderr and v.returncode == 1
    assert len(v.stderr.strip().splitlines()) == 1
    with vdisk_open(path, fmt, secret=None) as img:
        with pytest.raises(ImageError) as exc:
            img.read(0, 512)
    assert KEY_REQUIRED in str(exc.value)
    # a wrong secret is not detected (the method has no check value): noise, the same noise as QEMU's
    wrong = ["--object", "secret,id=sec0,data=not-it"]
    noise = qemu_raw(path, fmt, tmp_path, secret_object=wrong)
    assert noise[:512] != b"\x5a" * 512
    assert vdisk_read_all(path, fmt, secret="not-it") == noise
    assert open(path, "rb").read() == before


# -- refusals: write, create, amend ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_writing_refused_in_one_line(tmp_path, fmt):
    path = written(tmp_path, fmt)
    before = open(path, "rb").read()
    with pytest.raises(ImageError) as exc:
        vdisk_open(path, fmt, writable=True)
    assert READ_ONLY in str(exc.value) and "\n" not in str(exc.value)
    raw = tmp_path / "x.raw"
    helpers.make_raw(raw, 4 * MiB)
    commands = [["resize", *OBJECT, "--image-opts", image_opts(path, fmt), "8M"],
                ["snapshot", "-c", "s1", path],
                ["convert", "-n", "-O", fmt, raw, path]]
    if fmt == "qcow2":
        commands += [["amend", *OBJECT, "--image-opts", image_opts(path, fmt), "-o", "lazy_refcounts=on"],
                     ["amend", "-f", fmt, "-o", "encrypt.format=luks", path],
                     ["check", "-r", "all", path]]
    for args in commands:
        proc = helpers.vdisk_cli(*args)
        assert proc.returncode != 0 and READ_ONLY in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["encrypt.format=aes,encrypt.key-secret=sec0", "encryption=on,encrypt.key-secret=sec0"])
def test_creating_refused(tmp_path, fmt, how):
    """qemu-img still makes them; vdisk does not (create, convert -O)."""
    q = helpers.qemu_img("create", "-f", fmt, *OBJECT, "-o", how, tmp_path / "q.img", "1M")
    assert q.returncode == 0, q.stderr
    src = tmp_path / "src.raw"
    helpers.make_raw(src, MiB, [(0, 4096)])
    for args in (["create", "-f", fmt, *OBJECT, "-o", how, tmp_path / "v.img", "1M"],
                 ["convert", *OBJECT, "-O", fmt, "-o", how, src, tmp_path / "v.img"]):
        proc = helpers.vdisk_cli(*args)
        assert proc.returncode == 1 and "legacy AES-CBC" in proc.stderr and "insecure" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "v.img").exists()


# -- hostile headers -------------------------------------------------------------------------------
def test_crypto_extension_with_aes_refused_as_qemu(tmp_path):
    """A crypto header extension belongs to LUKS only (qcow2_read_extensions)."""
    path = tmp_path / "l.qcow2"
    helpers.qemu_img_pbkdf2("create", "-q", "-f", "qcow2", *OBJECT, "-o",
                            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", path, "1M")
    data = bytearray(path.read_bytes())
    data[32:36] = struct.pack(">I", 1)                     # crypt_method: AES
    path.write_bytes(bytes(data))
    message = "CRYPTO header extension only expected with LUKS encryption method"
    assert message in helpers.qemu_img("info", path).stderr.decode()
    proc = helpers.vdisk_cli("info", path)
    assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unknown_qcow_crypt_method_refused_as_qemu(tmp_path):
    path = tmp_path / "u.qcow"
    helpers.qemu_img("create", "-q", "-f", "qcow", path, "1M", check=True)
    data = bytearray(path.read_bytes())
    data[36:40] = struct.pack(">I", 2)                     # crypt_method
    path.write_bytes(bytes(data))
    message = "invalid encryption method in qcow header"
    assert message in helpers.qemu_img("info", path).stderr.decode()
    proc = helpers.vdisk_cli("info", path)
    assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
