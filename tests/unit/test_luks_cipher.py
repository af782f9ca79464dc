"""LUKS sector ciphers and IV generators: batched runs equal sector-by-sector references, the IVs
of each generator, round trips; keys and passphrases; the cryptography package imported lazily."""
import hashlib
import os
import subprocess
import sys

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks import DRIVER, cipher, keys
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks.cipher import SectorCipher

ciphers = pytest.importorskip("cryptography.hazmat.primitives.ciphers")
PKG = "ansible_collections.vdisk.images.plugins.module_utils.vdisk"


@pytest.fixture(params=["words", "ints"])
def xts_path(request, monkeypatch):
    """XTS both ways: on numpy word arrays (the pip package's dependency) and on big integers (an
    Ansible target without numpy); both must give the package's XTS unit by unit."""
    if request.param == "words":
        pytest.importorskip("numpy")
        monkeypatch.setattr(cipher, "_numpy", None)     # looked for again
    else:
        monkeypatch.setattr(cipher, "_numpy", False)    # as if not installed
    yield request.param
    assert (cipher.numpy_module() is not None) == (request.param == "words")


def reference(mode, key, iv, data, decrypt):
    """One unit through the cryptography package directly."""
    m = ciphers.modes.XTS(iv) if mode == "xts" else ciphers.modes.CBC(iv)
    c = ciphers.Cipher(ciphers.algorithms.AES(key), m)
    ctx = c.decryptor() if decrypt else c.encryptor()
    return ctx.update(data) + ctx.finalize()


def le(n, size=16):
    return n.to_bytes(size, "little")


def test_plain64_plain_and_essiv_ivs():
    key = os.urandom(32)
    first = (1 << 32) - 2                       # plain wraps at 2**32, plain64 does not
    assert SectorCipher("cbc", "plain64", None, key).ivs(first, 3) == b"".join(le(first + i) for i in range(3))
    assert SectorCipher("cbc", "plain", None, key).ivs(first, 3) == le(first) + le(first + 1) + le(0)
    essiv = ciphers.Cipher(ciphers.algorithms.AES(hashlib.sha256(key).digest()), ciphers.modes.ECB()).encryptor()
    assert SectorCipher("cbc", "essiv", "sha256", key).ivs(5, 2) == essiv.update(le(5) + le(6))


def test_essiv_of_aes_128_uses_aes_256():
    # dm-crypt's quirk kept by QEMU: the ESSIV cipher takes the digest's size as its key size
    key = os.urandom(16)
    ecb = ciphers.Cipher(ciphers.algorithms.AES(hashlib.sha256(key).digest()), ciphers.modes.ECB()).encryptor()
    assert SectorCipher("cbc", "essiv", "sha256", key).ivs(0, 1) == ecb.update(le(0))
    md5 = ciphers.Cipher(ciphers.algorithms.AES(hashlib.md5(key).digest()), ciphers.modes.ECB()).encryptor()
    assert SectorCipher("cbc", "essiv", "md5", key).ivs(9, 1) == md5.update(le(9))


@pytest.mark.parametrize("mode, ivgen, key_bytes", [
    ("xts", "plain64", 64), ("xts", "plain64", 32), ("xts", "essiv", 64), ("cbc", "essiv", 32),
    ("cbc", "plain64", 16), ("cbc", "plain", 32),
])
def test_runs_equal_sector_by_sector(mode, ivgen, key_bytes, xts_path):
    key = os.urandom(key_bytes)
    sc = SectorCipher(mode, ivgen, "sha256" if ivgen == "essiv" else None, key)
    first, data = 1000, os.urandom(512 * 9 + 256)        # a short last unit, as key material can have
    units = [(s, min(s + 512, len(data))) for s in range(0, len(data), 512)]
    ivs = sc.ivs(first, len(units))
    for decrypt in (True, False):
        expected = b"".join(reference(mode, key, ivs[16 * i:16 * i + 16], data[a:b], decrypt)
                            for i, (a, b) in enumerate(units))
        got = sc.decrypt(first, data) if decrypt else sc.encrypt(first, data)
        assert bytes(got) == expected
    assert bytes(sc.decrypt(first, sc.encrypt(first, data))) == data


@pytest.mark.parametrize("length", [16, 512 * 7 + 496, 512 * 8, 512 * 300 + 32])
def test_xts_runs_at_either_side_of_the_batch_size(length, xts_path):
    """Runs shorter than XTS_BATCH units take a context a unit, longer ones the batched tweaks:
    both equal the package's XTS unit by unit (lanes wrapping the GF(2^128) reduction included)."""
    key = os.urandom(64)
    sc = SectorCipher("xts", "plain64", None, key)
    data = os.urandom(length)
    first = (1 << 40) + 3
    ivs = sc.ivs(first, -(-length // 512))
    expected = b"".join(reference("xts", key, ivs[16 * i:16 * i + 16], data[a:a + 512], False)
                        for i, a in enumerate(range(0, length, 512)))
    assert bytes(sc.encrypt(first, data)) == expected
    assert bytes(sc.decrypt(first, expected)) == data
    # any buffer: a bytearray, a memoryview starting at an odd address
    odd = memoryview(b"x" + expected)[1:]
    assert sc.decrypt(first, odd) == bytearray(data) and type(sc.encrypt(first, bytearray(data))) is bytearray


def test_sector_numbers_change_the_ciphertext():
    sc = SectorCipher("xts", "plain64", None, os.urandom(64))
    block = b"A" * 512
    assert sc.encrypt(0, block) != sc.encrypt(1, block)
    assert bytes(sc.encrypt(3, block * 2)[512:]) == bytes(sc.encrypt(4, block))


def test_key_slot_round_trip_and_wrong_passphrase():
    spec = DRIVER.spec({})
    h = DRIVER.build_header(spec)
    master = os.urandom(spec.key_bytes)
    keys.set_master_key(spec, h, master, 1)
    material = keys.make_slot_material(spec, h, 0, master, b"secret", 1)
    assert h.slots[0].is_active
    assert h.slots[0].iterations >= 1000
    assert h.mk_digest_iter >= 1000
    assert not any(s.is_active for s in h.slots[1:])
    stored = bytearray(h.payload_bytes)
    off = h.slots[0].key_material_offset * 512
    stored[off:off + len(material)] = material

    def read(length, offset):
        return bytes(stored[offset:offset + length])
    assert keys.unlock(spec, h, b"secret", read) == master
    assert keys.unlock(spec, h, keys.passphrase_bytes(b"secret\0ignored"), read) == master
    with pytest.raises(keys.InvalidPassword) as exc:
        keys.unlock(spec, h, b"wrong", read, "x.luks")
    assert str(exc.value) == "x.luks: key-secret: Invalid password, cannot unlock any keyslot"


def test_passphrase_as_qemu_uses_a_secret():
    assert keys.passphrase_bytes("pässword") == "pässword".encode("utf-8")
    assert keys.passphrase_bytes(b"abc\0def") == b"abc"


def test_secret_never_shown(tmp_path):
    path = str(tmp_path / "s.luks")
    DRIVER.create(path, 1 << 20, {"key-secret": b"hunter2-secret", "iter-time": 1})
    policy = Policy(passphrase=b"hunter2-secret")
    assert "hunter2" not in repr(policy)
    with DRIVER.open(path, False, policy) as img:
        assert "hunter2" not in repr(img) and "hunter2" not in repr(img._cipher)
        assert "hunter2" not in str(img.info())
    with pytest.raises(keys.InvalidPassword) as exc:
        DRIVER.open(path, False, Policy(passphrase=b"hunter3-secret"))
    assert "hunter3" not in str(exc.value) and "hunter3" not in repr(exc.value)


def test_missing_key_secret(tmp_path):
    path = str(tmp_path / "s.luks")
    with pytest.raises(errors.InvalidOption, match="Parameter 'key-secret' is required for cipher"):
        DRIVER.create(path, 1 << 20, {"iter-time": 1})
    assert not os.path.exists(path)
    DRIVER.create(path, 1 << 20, {"key-secret": "pw", "iter-time": 1})
    with DRIVER.open(path) as img:                 # info without the key, as qemu-img info
        assert img.info()["format-specific"]["data"]["slots"][0]["active"] is True
        assert img.encrypted and img.virtual_size == 1 << 20
        with pytest.raises(errors.InvalidOption, match="Parameter 'key-secret' is required for cipher"):
            img.read(0, 512)
        with pytest.raises(errors.InvalidOption, match="key-secret"):
            list(img.extents())
        img.unlock("pw")
        assert len(img.read(0, 512)) == 512


def test_engine_works_without_the_package(tmp_path):
    """Importing the engine, probing and every unencrypted operation never import cryptography;
    opening or creating a LUKS image without it is one line naming the package."""
    luks = str(tmp_path / "s.luks")
    DRIVER.create(luks, 1 << 20, {"key-secret": b"pw", "iter-time": 1})
    code = """
import sys
sys.modules['cryptography'] = None          # not installed
from {pkg}.registry import get_driver, probe_file, DRIVERS
from {pkg} import errors
from {pkg}.driver import Policy
raw = get_driver('raw'); raw.create({raw!r}, 4096, {{}})
with raw.open({raw!r}) as img: img.read(0, 4096)
assert probe_file({luks!r}) == 'luks'
d = get_driver('luks')
with d.open({luks!r}) as img: img.info()
assert not [m for m in sys.modules if m.startswith('cryptography.')]
try:
    d.open({luks!r}, False, Policy(passphrase=b'pw'))
except errors.MissingPackage as exc:
    print(exc)
try:
    d.create({new!r}, 4096, {{'key-secret': b'pw', 'iter-time': 1}})
except errors.MissingPackage as exc:
    print(exc)
""".format(pkg=PKG, raw=str(tmp_path / "r.img"), luks=luks, new=str(tmp_path / "n.luks"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 2 and all("needs the Python package cryptography" in line for line in lines)
    assert not os.path.exists(tmp_path / "n.luks")


def test_second_slot_and_slot_order():
    spec = DRIVER.spec({"cipher-mode": "cbc", "ivgen-alg": "essiv"})
    h = DRIVER.build_header(spec)
    master = os.urandom(spec.key_bytes)
    keys.set_master_key(spec, h, master, 1)
    stored = bytearray(h.payload_bytes)
    for index, secret in ((0, b"first"), (5, b"sixth")):
        material = keys.make_slot_material(spec, h, index, master, secret, 1)
        off = h.slots[index].key_material_offset * 512
        stored[off:off + len(material)] = material

    def read(length, offset):
        return bytes(stored[offset:offset + length])
    assert keys.unlock(spec, h, b"first", read) == master
    assert keys.unlock(spec, h, b"sixth", read) == master
    stored[h.slots[5].key_material_offset * 512 + 100] ^= 1         # one damaged stripe: that slot is lost
    with pytest.raises(keys.InvalidPassword):
        keys.unlock(spec, h, b"sixth", read)
    assert keys.unlock(spec, h, b"first", read) == master
