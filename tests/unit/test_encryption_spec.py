"""state.encryption: the declared encryption, its one mapping to the engine, and the planner's rules for it.

Plan cases are data, as tests/unit/test_state_plan.py has them: (spec fields, observed image) -> actions or
the error; the engine cases make real luks images (iter_time 10) and check that the passphrase never
shows in anything the state layer returns or raises.
"""
import json
import os

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError, InvalidOption
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state import encryption as enc
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import apply_image, plan_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import ObservedImage, observe
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.plan import plan, plan_convert, properties
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import image_spec

pytest.importorskip("cryptography")

SECRET = "Unit-Secret-Passphrase-42"
M = 1 << 20
LUKS_OBSERVED = {"format": "luks", "cipher_alg": "aes-256", "cipher_mode": "xts", "hash_alg": "sha256"}


def declared(**extra):
    return dict({"passphrase": SECRET, "iter_time": 10}, **extra)


# -- parsing -------------------------------------------------------------------------------------------

def test_parse_defaults_and_repr_hides_the_passphrase():
    e = enc.parse_encryption({"passphrase": SECRET}, "/x")
    assert e.format == "luks" and e.passphrase == SECRET.encode() and e.secret() == SECRET.encode()
    assert SECRET not in repr(e) and SECRET not in str(e)
    spec = image_spec({"path": "/x.luks", "format": "luks", "size": "1M", "encryption": declared()},
                      inline_secrets=True)
    assert SECRET not in repr(spec)
    assert enc.parse_encryption(None, "/x") is None


@pytest.mark.parametrize("value,field,words", [
    ({"passphrase": SECRET, "passphrase_file": "f"}, "encryption", "mutually exclusive"),
    ({}, "encryption", "required"),
    ({"format": "aes", "passphrase": SECRET}, "encryption.format", "luks"),
    ({"passphrase": SECRET, "cipher_alg": "rot13"}, "encryption.cipher_alg", "aes-256"),
    ({"passphrase": SECRET, "cipher_mode": "gcm"}, "encryption.cipher_mode", "xts"),
    ({"passphrase": SECRET, "hash_alg": "crc32"}, "encryption.hash_alg", "sha256"),
    ({"passphrase": SECRET, "iter_time": 0}, "encryption.iter_time", "positive"),
    ({"passphrase": SECRET, "iter_time": True}, "encryption.iter_time", "positive"),
    ({"passphrase": SECRET, "key": "x"}, "encryption.key", "unknown field"),
    ({"passphrase": ""}, "encryption.passphrase", "non-empty"),
    ("luks", "encryption", "mapping"),
])
def test_parse_errors_name_the_field(value, field, words):
    with pytest.raises(InvalidOption) as exc:
        enc.parse_encryption(value, "/img")
    assert exc.value.field == field and words in exc.value.message
    assert SECRET not in str(exc.value)


def test_manifest_takes_no_inline_passphrase(tmp_path):
    with pytest.raises(InvalidOption) as exc:
        image_spec({"path": "a.luks", "format": "luks", "size": "1M", "encryption": declared()},
                   base_dir=str(tmp_path))
    assert exc.value.field == "encryption.passphrase" and "passphrase_file" in exc.value.message
    assert SECRET not in str(exc.value)
    spec = image_spec({"path": "a.luks", "format": "luks", "size": "1M",
                       "encryption": {"passphrase_file": "keys/a.pass"}}, base_dir=str(tmp_path))
    assert spec.encryption.passphrase_file == str(tmp_path / "keys" / "a.pass")


def test_source_encryption_takes_no_cipher():
    with pytest.raises(InvalidOption) as exc:
        enc.parse_encryption({"passphrase": SECRET, "cipher_alg": "aes-256"}, "/s", name="source_encryption",
                             source=True)
    assert exc.value.field == "source_encryption.cipher_alg"


@pytest.mark.parametrize("fields,field", [
    ({"format": "raw", "encryption": {"passphrase": SECRET}}, "encryption"),
    ({"format": "vdi", "encryption": {"passphrase": SECRET}}, "encryption"),
    ({"format": "luks"}, "encryption"),
    ({"format": "luks", "encryption": {"passphrase": SECRET}, "options": {"key-secret": "x"}}, "key-secret"),
    ({"format": "luks", "encryption": {"passphrase": SECRET}, "options": {"cipher-alg": "aes-128"}}, "cipher-alg"),
    ({"format": "qcow2", "encryption": {"passphrase": SECRET}, "options": {"encrypt.format": "luks"}},
     "encrypt.format"),
    ({"format": "qcow2", "options": {"encrypt.key-secret": "sec0"}}, "encrypt.key-secret"),
])
def test_spec_refuses(fields, field):
    with pytest.raises(InvalidOption) as exc:
        image_spec(dict({"path": "/i", "size": "1M"}, **fields), inline_secrets=True)
    assert exc.value.field == field
    assert SECRET not in str(exc.value)


def test_absent_luks_needs_no_passphrase():
    assert image_spec({"path": "/i", "format": "luks", "state": "absent"}).state == "absent"


# -- the passphrase file ------------------------------------------------------------------------------

@pytest.mark.parametrize("content,secret", [
    (b"pw\n", b"pw"), (b"pw\r\n", b"pw"), (b"pw", b"pw"), (b"pw\n\n", b"pw\n"), (b" pw \n", b" pw "),
    (b"\xffbin\x00ary", b"\xffbin\x00ary"),
])
def test_passphrase_file_loses_one_trailing_newline(tmp_path, content, secret):
    path = tmp_path / "pass"
    path.write_bytes(content)
    assert enc.Encryption(passphrase_file=str(path)).secret() == secret


@pytest.mark.parametrize("content,words", [(b"", "no passphrase"), (b"\n", "no passphrase"),
                                           (None, "could not read"), (b"x" * (enc.MAX_PASSPHRASE_FILE + 1), "1 MiB")])
def test_passphrase_file_errors(tmp_path, content, words):
    path = tmp_path / "pass"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError) as exc:
        enc.Encryption(passphrase_file=str(path)).secret("/img")
    assert words in str(exc.value) and exc.value.field in ("encryption.passphrase_file",)


# -- the one mapping ------------------------------------------------------------------------------------

def test_create_options_luks_and_qcow2():
    e = enc.Encryption(passphrase=b"pw", cipher_alg="aes-128", cipher_mode="cbc", hash_alg="sha1", iter_time=10)
    assert enc.create_options("luks", e) == {"key-secret": b"pw", "cipher-alg": "aes-128", "cipher-mode": "cbc",
                                             "hash-alg": "sha1", "iter-time": 10}
    assert enc.create_options("qcow2", e) == {"encrypt.format": "luks", "encrypt.key-secret": b"pw",
                                              "encrypt.cipher-alg": "aes-128", "encrypt.cipher-mode": "cbc",
                                              "encrypt.hash-alg": "sha1", "encrypt.iter-time": 10}
    assert enc.create_options("qcow2", enc.Encryption(passphrase=b"pw")) == {"encrypt.format": "luks",
                                                                             "encrypt.key-secret": b"pw"}
    assert enc.create_options("luks", None) == {}
    with pytest.raises(InvalidOption):
        enc.create_options("vmdk", e)


def test_unlocking_policy_keeps_the_rest():
    base = Policy(allowed_dirs=("/a",), force_share=True)
    policy = enc.unlocking(base, enc.Encryption(passphrase=b"pw"))
    assert policy.passphrase == b"pw" and policy.allowed_dirs == ("/a",) and policy.force_share
    assert enc.unlocking(base, None) is base
    assert "pw" not in repr(policy)


def test_observed_encryption_from_info():
    luks = {"format": "luks", "encrypted": True, "format-specific": {"type": "luks", "data": {
        "cipher-alg": "aes-256", "cipher-mode": "xts", "hash-alg": "sha256", "ivgen-alg": "plain64"}}}
    assert enc.observed_encryption(luks) == LUKS_OBSERVED
    qcow2 = {"format": "qcow2", "encrypted": True, "format-specific": {"type": "qcow2", "data": {
        "compat": "1.1", "encrypt": {"format": "luks", "cipher-alg": "aes-128", "cipher-mode": "xts",
                                     "hash-alg": "sha256"}}}}
    assert enc.observed_encryption(qcow2) == dict(LUKS_OBSERVED, cipher_alg="aes-128")
    assert enc.observed_encryption({"format": "qcow2", "format-specific": {"type": "qcow2", "data": {}}}) is None
    assert enc.observed_encryption({"format": "qcow", "encrypted": True}) == {"format": "unknown"}


# -- planning as data -------------------------------------------------------------------------------------

def observed(fmt="luks", encryption=LUKS_OBSERVED, size=4 * M):
    return ObservedImage(path="/i", exists=True, format=fmt, virtual_size=size, options={},
                         encryption=dict(encryption) if encryption else None)


PLAN_CASES = [
    # (spec fields, observed, expected action kinds or the error's field and words)
    ({"format": "luks", "size": "4M", "encryption": declared()}, observed(), []),
    ({"format": "luks", "size": "8M", "encryption": declared()}, observed(), ["grow"]),
    ({"format": "luks", "size": "4M", "encryption": declared(cipher_alg="aes-256", iter_time=99)}, observed(), []),
    ({"format": "luks", "size": "4M", "encryption": declared(cipher_alg="aes-128")}, observed(),
     ("encryption", "cipher_alg is aes-256, not aes-128")),
    ({"format": "luks", "size": "4M", "encryption": declared(cipher_alg="aes-128"), "recreate": True}, observed(),
     ["replace"]),
    ({"format": "qcow2", "size": "4M", "encryption": declared()}, observed("qcow2", None),
     ("encryption", "not encrypted and encryption (luks) is declared")),
    ({"format": "qcow2", "size": "4M"}, observed("qcow2"), ("encryption", "is encrypted (luks) and no encryption")),
    ({"format": "qcow2", "size": "4M", "encryption": declared(), "recreate": True}, observed("qcow2", None),
     ["replace"]),
    ({"format": "luks", "size": "4M", "encryption": declared()}, observed("qcow2", None), ("format", "qcow2")),
    ({"format": "luks", "size": "4M", "encryption": declared()}, ObservedImage(path="/i"), ["create"]),
]


@pytest.mark.parametrize("fields,seen,expected", PLAN_CASES)
def test_plan(fields, seen, expected):
    spec = image_spec(dict({"path": "/i"}, **fields), inline_secrets=True)
    if isinstance(expected, tuple):
        with pytest.raises(InvalidOption) as exc:
            plan(spec, seen)
        assert exc.value.field == expected[0] and expected[1] in exc.value.message
        assert "recreate" in exc.value.message and SECRET not in str(exc.value)
        return
    actions = plan(spec, seen)
    assert [a.kind for a in actions] == expected
    for action in actions:
        assert action.params.get("encryption") is spec.encryption
        shown = json.dumps([a.to_dict() for a in actions]) + json.dumps(properties(seen), default=str)
        assert SECRET not in shown
        if action.kind in ("create", "replace"):
            assert action.after["encryption"] == {"format": "luks", **spec.encryption.declared()}


def test_plan_convert_encryption_rules():
    source = ObservedImage(path="/s", exists=True, format="luks", virtual_size=4 * M, encryption=LUKS_OBSERVED)
    dest = ObservedImage(path="/d")
    with pytest.raises(InvalidOption) as exc:
        plan_convert(source, dest, "qcow2", {})
    assert exc.value.field == "source_encryption"
    unlock = enc.Encryption(passphrase=b"pw")
    actions = plan_convert(source, dest, "luks", {}, encryption=unlock, source_encryption=unlock)
    assert actions[0].params["encryption"] is unlock and actions[0].after["encryption"] == {"format": "luks"}
    plain = ObservedImage(path="/d", exists=True, format="luks", virtual_size=4 * M, encryption=None)
    # an existing destination not encrypted as asked is rewritten, without comparing content
    asked = []
    assert plan_convert(source, plain, "luks", {}, same_content=lambda: asked.append(1) or True,
                        encryption=unlock, source_encryption=unlock)
    assert not asked
    with pytest.raises(InvalidOption):
        plan_convert(source, dest, "raw", {}, encryption=unlock, source_encryption=unlock)


# -- with the engine --------------------------------------------------------------------------------------------

def read_all(path, secret=SECRET, fmt="luks"):
    image = open_image(path, fmt, writable=False, policy=Policy(passphrase=secret.encode()))
    try:
        return image.read(0, image.virtual_size)
    finally:
        close_chain(image)


def test_create_idempotent_grow_and_wrong_passphrase(tmp_path):
    path = str(tmp_path / "a.luks")
    fields = {"path": path, "format": "luks", "size": "4M", "encryption": declared()}
    check = apply_image(image_spec(fields, inline_secrets=True), check_mode=True)
    assert [a.kind for a in check.actions] == ["create"] and not os.path.exists(path)
    result = apply_image(image_spec(fields, inline_secrets=True))
    assert result.changed and result.after["encryption"]["format"] == "luks"
    assert observe(path).info["encrypted"] is True
    assert len(read_all(path)) == 4 * M        # unwritten sectors decrypt to noise, as qemu-img's do
    image = open_image(path, "luks", writable=True, policy=Policy(passphrase=SECRET.encode()))
    image.write(M, b"\x42" * 4096)
    close_chain(image)
    assert not apply_image(image_spec(fields, inline_secrets=True)).changed
    grown = apply_image(image_spec(dict(fields, size="8M"), inline_secrets=True))
    assert [a.kind for a in grown.actions] == ["grow"] and observe(path).virtual_size == 8 * M
    data = read_all(path)
    assert data[M:M + 4096] == b"\x42" * 4096 and len(data) == 8 * M
    wrong = image_spec(dict(fields, size="16M", encryption=declared(passphrase="not-the-one")), inline_secrets=True)
    with pytest.raises(InvalidOption) as exc:
        plan_image(wrong)
    text = str(exc.value)
    assert "\n" not in text and "Invalid password" in text and text.startswith(path + ": encryption:")
    assert "not-the-one" not in text and observe(path).virtual_size == 8 * M
    everything = json.dumps([result.before, result.after, [a.to_dict() for a in result.actions + grown.actions],
                             grown.after, result.final.info], default=str)
    assert SECRET not in everything


def test_passphrase_file_read_when_needed(tmp_path):
    path = str(tmp_path / "f.luks")
    secret_file = tmp_path / "pass"
    fields = {"path": path, "format": "luks", "size": "1M", "encryption": {"passphrase_file": str(secret_file),
                                                                          "iter_time": 10}}
    spec = image_spec(fields)
    # planning a new image does not read it; applying does (and fails in one line without it)
    assert [a.kind for a in plan_image(spec).actions] == ["create"]
    with pytest.raises(ImageError) as exc:
        apply_image(spec)
    assert "could not read the passphrase file" in str(exc.value) and not os.path.exists(path)
    secret_file.write_text(SECRET + "\n")
    assert apply_image(spec).changed
    assert len(read_all(path)) == M          # opens: the newline is not part of the passphrase
    with pytest.raises(ImageError):
        read_all(path, SECRET + "\n")
    assert not apply_image(spec).changed


def test_plain_and_encrypted_are_not_swapped_in_place(tmp_path):
    path = str(tmp_path / "p.qcow2")
    apply_image(image_spec({"path": path, "size": "1M"}))
    with pytest.raises(InvalidOption) as exc:
        apply_image(image_spec({"path": path, "size": "1M", "encryption": declared()}, inline_secrets=True))
    assert "not encrypted" in str(exc.value) and observe(path).encryption is None
    luks = str(tmp_path / "e.luks")
    apply_image(image_spec({"path": luks, "format": "luks", "size": "1M", "encryption": declared()},
                           inline_secrets=True))
    with pytest.raises(InvalidOption) as exc:
        apply_image(image_spec({"path": luks, "format": "raw", "size": "1M"}))
    assert exc.value.field == "format"
    replaced = apply_image(image_spec({"path": luks, "format": "raw", "size": "1M", "recreate": True}))
    assert replaced.changed and observe(luks).format == "raw" and observe(luks).encryption is None


# -- manifests ---------------------------------------------------------------------------------------------

def test_manifest_validation_one_problem_per_mistake(tmp_path):
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_data, load_manifests
    manifest = tmp_path / "m.yml"
    manifest.write_text("""version: 1
defaults:
  format: luks
images:
  - path: a.luks
    size: 1M
    encryption: {passphrase: %s}
  - path: b.luks
    size: 1M
  - path: c.luks
    size: 1M
    encryption:
      passphrase_file: pass
      cipher_alg: rot13
  - path: d.raw
    format: raw
    size: 1M
    encryption: {passphrase_file: pass}
  - path: e.luks
    size: 1M
    encryption: {passphrase_file: pass}
    options: {key-secret: foo}
  - path: f.luks
    size: 1M
    encryption: {passphrase_file: keys/f.pass, iter_time: 10}
""" % SECRET)
    loaded = load_manifests([str(manifest)])
    found = [(p.index, p.field, p.line) for p in loaded.problems]
    assert found == [(0, "encryption.passphrase", 7), (1, "encryption", 8), (2, "encryption.cipher_alg", 14),
                     (3, "encryption", 18), (4, "key-secret", 22)]
    assert all(SECRET not in str(p) for p in loaded.problems)
    assert [e.name for e in loaded.entries] == ["f.luks"]
    assert loaded.entries[0].spec.encryption.passphrase_file == str(tmp_path / "keys" / "f.pass")
    # the module's data: the same checks without the schema
    data = load_data([{"path": "g.luks", "format": "luks", "size": "1M", "encryption": {"passphrase": SECRET}}],
                     base_dir=str(tmp_path))
    assert [p.field for p in data.problems] == ["encryption.passphrase"]
    assert SECRET not in str(data.problems[0])
