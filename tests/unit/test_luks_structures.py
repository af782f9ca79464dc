"""LUKS1 records and cipher specifications: the header round trip, qemu-img's layout, the checks
QEMU 7.2 makes at open (with its messages), the mode strings."""
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks import DRIVER
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks import header as hdr


def sample(**options):
    spec = DRIVER.spec(options)
    h = DRIVER.build_header(spec)
    h.mk_digest_iter = 1000
    h.mk_digest = bytes(range(20))
    h.mk_digest_salt = bytes(range(32, 64))
    h.slots[0].active, h.slots[0].iterations, h.slots[0].salt = hdr.SLOT_ACTIVE, 12345, b"s" * 32
    return spec, h


def test_sizes_are_the_specs():
    assert hdr.Header.SIZE == 208
    assert hdr.KeySlot.SIZE == 48
    assert hdr.HEADER_SIZE == 592
    assert hdr.Header.offset("payload_offset") == 104 and hdr.Header.offset("uuid") == 168
    assert hdr.slot_offset(0) == 208 and hdr.slot_offset(7) == 208 + 7 * 48


def test_header_round_trip():
    spec, h = sample()
    raw = h.pack_all()
    assert len(raw) == 592 and raw[:8] == b"LUKS\xba\xbe\x00\x01"
    back = hdr.parse_header(raw)
    assert back == h
    assert back.pack_all() == raw
    assert hdr.parse_spec(back) == spec


@pytest.mark.parametrize("options, key_bytes, offsets", [
    # what qemu-img info shows for aes-256-xts: 4096, 262144, 520192 ... and the payload at 2068480
    ({}, 64, [4096 + i * 258048 for i in range(9)]),
    ({"cipher-alg": "aes-128"}, 32, [4096 + i * 131072 for i in range(9)]),
    ({"cipher-mode": "cbc", "ivgen-alg": "essiv"}, 32, [4096 + i * 131072 for i in range(9)]),
    ({"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "plain64"}, 16, [4096 + i * 65536 for i in range(9)]),
])
def test_layout_as_qemu_img(options, key_bytes, offsets):
    spec, h = sample(**options)
    assert h.key_bytes == key_bytes
    assert [s.key_material_offset * 512 for s in h.slots] + [h.payload_bytes] == offsets
    assert offsets[-1] == 2068480 if key_bytes == 64 else True


@pytest.mark.parametrize("options, name, mode", [
    ({}, "aes", "xts-plain64"),
    ({"cipher-mode": "cbc", "ivgen-alg": "essiv"}, "aes", "cbc-essiv:sha256"),
    ({"cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "md5"}, "aes", "cbc-essiv:md5"),
    ({"cipher-alg": "aes-128", "ivgen-alg": "plain", "ivgen-hash-alg": "sha1"}, "aes", "xts-plain:sha1"),
])
def test_mode_strings(options, name, mode):
    spec, h = sample(**options)
    assert hdr.text(h.cipher_name) == name and hdr.text(h.cipher_mode) == mode


@pytest.mark.parametrize("options, field", [
    ({"cipher-alg": "twofish-256"}, "cipher-alg"),
    ({"cipher-alg": "aes-192"}, "cipher-alg"),
    ({"cipher-mode": "ecb"}, "cipher-mode"),
    ({"cipher-mode": "ctr"}, "cipher-mode"),
])
def test_unsupported_refused_in_one_line(options, field):
    with pytest.raises(errors.UnsupportedFeature) as exc:
        DRIVER.spec(options)
    assert exc.value.field == field and "\n" not in str(exc.value)


def test_unknown_values_and_bad_essiv_hash():
    with pytest.raises(errors.InvalidOption, match="Parameter 'cipher-alg' does not accept value 'foo'"):
        DRIVER.spec({"cipher-alg": "foo"})
    with pytest.raises(errors.InvalidOption, match="No AES cipher with key size 20 available"):
        DRIVER.spec({"cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha1"})


def corrupt(change):
    spec, h = sample()
    change(h)
    return h.pack_all()


@pytest.mark.parametrize("change, message", [
    (lambda h: setattr(h, "magic", b"LUKS\x00\x00"), "Volume is not in LUKS format"),
    (lambda h: setattr(h, "version", 2), "LUKS version 2 is not supported"),
    (lambda h: setattr(h, "cipher_name", b"a" * 32), "LUKS header cipher name is not NUL terminated"),
    (lambda h: setattr(h, "hash_spec", b"a" * 32), "LUKS header hash spec is not NUL terminated"),
    (lambda h: setattr(h, "payload_offset", 1), "LUKS payload is overlapping with the header"),
    (lambda h: setattr(h, "mk_digest_iter", 0), "LUKS key iteration count is zero"),
    (lambda h: setattr(h.slots[3], "stripes", 5), "Keyslot 3 is corrupted (stripes 5 != 4000)"),
    (lambda h: setattr(h.slots[2], "active", 1), "Keyslot 2 state (active/disable) is corrupted"),
    (lambda h: setattr(h.slots[0], "iterations", 0), "Keyslot 0 iteration count is zero"),
    (lambda h: setattr(h.slots[0], "key_material_offset", 1), "Keyslot 0 is overlapping with the LUKS header"),
    (lambda h: setattr(h.slots[7], "key_material_offset", 4000), "Keyslot 7 is overlapping with the encrypted payload"),
    (lambda h: setattr(h.slots[5], "key_material_offset", h.slots[4].key_material_offset),
     "Keyslots 4 and 5 are overlapping in the header"),
])
def test_header_checks_as_qemu(change, message):
    with pytest.raises(errors.ImageError) as exc:
        hdr.parse_header(corrupt(change), "x.luks")
    assert str(exc.value).startswith("x.luks: ") and message in str(exc.value)


@pytest.mark.parametrize("mode, message", [
    (b"xts", "Unexpected cipher mode string format 'xts'"),
    (b"foo-plain64", "Cipher mode 'foo' not supported"),
    (b"xts-foo", "IV generator 'foo' not supported"),
    (b"cbc-essiv", "Missing IV generator hash specification"),
    (b"cbc-essiv:sha2566", "Hash algorithm 'sha2566' not supported"),
])
def test_mode_string_checks(mode, message):
    spec, h = sample()
    h.cipher_mode = mode
    if mode.startswith(b"cbc"):
        h.key_bytes = 32
    with pytest.raises(errors.UnsupportedFeature, match=message.replace("(", r"\(")):
        hdr.parse_spec(h)


def test_cipher_name_with_key_size():
    spec, h = sample()
    h.cipher_name = b"foo"
    with pytest.raises(errors.UnsupportedFeature, match="Algorithm 'foo' with key size 32 bytes not supported"):
        hdr.parse_spec(h)
    h.cipher_name = b"twofish"
    assert hdr.parse_spec(h).cipher_alg == "twofish-256"     # known to QEMU: info shows it, data is refused


def test_probe():
    spec, h = sample()
    assert hdr.probe(h.pack_all()) and DRIVER.probe(h.pack_all(), "x") == 100
    assert not hdr.probe(b"LUKS\xba\xbe\x00\x02") and not hdr.probe(b"QFI\xfb")


def test_damaged_headers_fail_as_image_errors_only():
    import random
    spec, h = sample()
    good = h.pack_all()
    rng = random.Random(19)
    for dummy in range(400):
        buf = bytearray(good)
        for dummy2 in range(rng.randint(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        try:
            hdr.parse_spec(hdr.parse_header(bytes(buf), "m.luks"), "m.luks")
        except errors.ImageError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("m.luks: ")
    with pytest.raises(errors.FormatError):
        hdr.parse_header(b"", "m.luks")
