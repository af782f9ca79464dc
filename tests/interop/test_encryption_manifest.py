"""Encrypted images through manifests (`vdisk validate|plan|apply`) against qemu-img 7.2.

A manifest's ``encryption`` makes a luks image that qemu-img opens with the same secret file
(``--object secret,id=s,file=PASSFILE``); a second apply changes nothing; growing keeps the data;
a plain image is never encrypted in place (nor the reverse); a wrong passphrase is one line; and no
output of any command ever holds the passphrase.  Key derivation is kept short (``iter_time: 10``;
qemu-img through ``helpers.qemu_img_pbkdf2``).
"""
import json
import os
import textwrap

import helpers
import pytest

pytest.importorskip("cryptography")

M = 1 << 20
SECRET = "Manifest-Passphrase-7f3a"


def write(directory, name, text):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    return path


def secret_file(directory, name="disk.pass", secret=SECRET, newline=False):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(secret + ("\n" if newline else ""))
    os.chmod(path, 0o600)
    return path


class Outputs:
    """Every stdout and stderr of the vdisk commands run, to search for the passphrase."""

    def __init__(self):
        self.seen = []

    def vdisk(self, *args):
        proc = helpers.vdisk_cli(*args)
        self.seen.append(proc.stdout + proc.stderr)
        return proc

    def never_show(self, *secrets):
        for text in self.seen:
            for secret in secrets:
                assert secret not in text, text


def source_and_secret(tmp_path):
    """The raw source the encrypted images are made from (data at 0 and at 3 MiB of 4 MiB) and the
    secret file holding SECRET."""
    data = helpers.make_raw(str(tmp_path / "data.raw"), 4 * M, [(0, M), (3 * M, 512 * 1024)])
    return data, secret_file(tmp_path)


def opts(path, secret_id="s"):
    return "driver=luks,key-secret=%s,file.filename=%s" % (secret_id, path)


def qemu_convert_raw(image, passfile, out):
    """The guest content of a luks image as qemu-img reads it with the secret in *passfile*."""
    proc = helpers.qemu_img("convert", "--object", "secret,id=s,file=%s" % passfile, "--image-opts", opts(image),
                            "-O", "raw", str(out))
    return proc


def test_manifest_apply_makes_a_luks_image_qemu_opens(tmp_path):
    run = Outputs()
    data, passfile = source_and_secret(tmp_path)
    manifest = write(tmp_path, "m.yml", """
        version: 1
        images:
          - path: secret.luks
            format: luks
            source: data.raw
            source_format: raw
            encryption: {format: luks, passphrase_file: disk.pass, iter_time: 10}
            mode: "0600"
          - path: empty.luks
            format: luks
            size: 2M
            encryption: {passphrase_file: disk.pass, cipher_alg: aes-128, cipher_mode: cbc, hash_alg: sha1,
                         iter_time: 10}
        """)
    assert run.vdisk("validate", manifest).returncode == 0
    plan = run.vdisk("plan", manifest)
    assert plan.returncode == 2 and "encrypted (format=luks)" in plan.stdout
    assert run.vdisk("plan", "--output=json", manifest).returncode == 2
    saved = str(tmp_path / "saved.plan")
    assert run.vdisk("plan", "--out", saved, manifest).returncode == 2
    applied = run.vdisk("apply", saved)       # a saved plan names the passphrase file, never the passphrase
    assert applied.returncode == 0, applied.stderr
    image = str(tmp_path / "secret.luks")
    # qemu-img opens it with the same secret file and reads the source's content
    compare = helpers.qemu_img("compare", "--object", "secret,id=s,file=%s" % passfile, "--image-opts",
                               opts(image), "driver=raw,file.filename=%s" % data)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    info = json.loads(helpers.qemu_img("info", "--output=json", image, check=True).stdout)
    assert info["format"] == "luks" and info["encrypted"] is True and info["virtual-size"] == 4 * M
    assert oct(os.stat(image).st_mode & 0o777) == "0o600"
    empty = helpers.qemu_info(str(tmp_path / "empty.luks"))["format-specific"]["data"]
    assert (empty["cipher-alg"], empty["cipher-mode"], empty["hash-alg"]) == ("aes-128", "cbc", "sha1")
    assert qemu_convert_raw(str(tmp_path / "empty.luks"), passfile, tmp_path / "e.raw").returncode == 0
    # idempotent: nothing to do, in plan and apply
    again = run.vdisk("plan", manifest)
    assert again.returncode == 0 and "No changes" in again.stdout
    applied = run.vdisk("apply", "--output=json", manifest)
    report = json.loads(applied.stdout)
    assert applied.returncode == 0 and report["ok"] and report["done"] == []
    run.never_show(SECRET)
    for name in os.listdir(str(tmp_path)):          # nor in any file vdisk wrote (plans, images' headers)
        if name != "disk.pass":
            with open(str(tmp_path / name), "rb") as f:
                assert SECRET.encode() not in f.read(), name


def test_grow_keeps_the_data_and_qemu_reads_it(tmp_path):
    run = Outputs()
    passfile = secret_file(tmp_path)
    image = str(tmp_path / "g.luks")
    helpers.qemu_img_pbkdf2("create", "-q", "-f", "luks", "--object", "secret,id=s,file=%s" % passfile,
                            "-o", "key-secret=s,iter-time=10", image, "4M")
    helpers.run("qemu-io", "--object", "secret,id=s,file=%s" % passfile, "--image-opts", opts(image),
                "-c", "write -P 0x5c 1M 64k")
    text = """
        version: 1
        images:
          - path: g.luks
            format: luks
            size: %s
            encryption: {passphrase_file: disk.pass}
        """
    manifest = write(tmp_path, "m.yml", text % "4M")
    assert run.vdisk("plan", manifest).returncode == 0          # qemu-img's image, as declared
    manifest = write(tmp_path, "m.yml", text % "8M")
    plan = run.vdisk("plan", manifest)
    assert plan.returncode == 2 and "grow: virtual-size 4 MiB -> 8 MiB" in plan.stdout
    assert run.vdisk("apply", manifest).returncode == 0
    assert run.vdisk("plan", manifest).returncode == 0
    out = tmp_path / "g.raw"
    assert qemu_convert_raw(image, passfile, out).returncode == 0
    content = out.read_bytes()
    assert len(content) == 8 * M and content[M:M + 65536] == b"\x5c" * 65536
    run.never_show(SECRET)


def test_passphrase_file_newline_vdisk_strips_qemu_does_not(tmp_path):
    """vdisk removes one trailing newline of a passphrase_file; qemu-img's secret file= keeps it."""
    run = Outputs()
    with_newline = secret_file(tmp_path, "nl.pass", newline=True)
    without = secret_file(tmp_path, "raw.pass")
    manifest = write(tmp_path, "m.yml", """
        version: 1
        images:
          - {path: n.luks, format: luks, size: 1M, encryption: {passphrase_file: nl.pass, iter_time: 10}}
        """)
    assert run.vdisk("apply", manifest).returncode == 0
    image = str(tmp_path / "n.luks")
    assert qemu_convert_raw(image, without, tmp_path / "ok.raw").returncode == 0
    refused = qemu_convert_raw(image, with_newline, tmp_path / "no.raw")
    assert refused.returncode == 1 and b"Invalid password" in refused.stderr
    run.never_show(SECRET)


def test_plain_and_encrypted_mismatch_is_reported_not_changed(tmp_path):
    run = Outputs()
    secret_file(tmp_path)
    helpers.qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "plain.qcow2"), "4M", check=True)
    before = os.stat(str(tmp_path / "plain.qcow2"))
    manifest = write(tmp_path, "m.yml", """
        version: 1
        images:
          - {path: plain.qcow2, size: 4M, encryption: {passphrase_file: disk.pass, iter_time: 10}}
        """)
    for command in ("plan", "apply"):
        proc = run.vdisk(command, manifest)
        assert proc.returncode == 1
        assert "images[0] (plain.qcow2): encryption: the image is not encrypted and encryption (luks) is declared" \
            in proc.stdout + proc.stderr
        assert "recreate" in proc.stderr and "Traceback" not in proc.stderr
    assert os.stat(str(tmp_path / "plain.qcow2")).st_mtime_ns == before.st_mtime_ns
    # the reverse: an encrypted image declared plain
    image = str(tmp_path / "e.luks")
    helpers.qemu_img_pbkdf2("create", "-q", "-f", "luks", "--object", "secret,id=s,data=%s" % SECRET,
                            "-o", "key-secret=s,iter-time=10", image, "1M")
    manifest = write(tmp_path, "r.yml", """
        version: 1
        images:
          - {path: e.luks, format: raw, size: 1M}
        """)
    proc = run.vdisk("plan", manifest)
    assert proc.returncode == 1 and "the image is luks, not raw" in proc.stderr and "recreate" in proc.stderr
    # recreate replaces the plain image with an encrypted one
    manifest = write(tmp_path, "m.yml", """
        version: 1
        images:
          - {path: plain.qcow2, format: luks, size: 4M, recreate: true,
             encryption: {passphrase_file: disk.pass, iter_time: 10}}
        """)
    plan = run.vdisk("plan", manifest)
    assert plan.returncode == 2 and "replace" in plan.stdout
    assert run.vdisk("apply", manifest).returncode == 0
    assert helpers.qemu_info(str(tmp_path / "plain.qcow2"))["format"] == "luks"
    assert run.vdisk("plan", manifest).returncode == 0
    run.never_show(SECRET)


def test_wrong_passphrase_is_one_line(tmp_path):
    run = Outputs()
    image = str(tmp_path / "w.luks")
    helpers.qemu_img_pbkdf2("create", "-q", "-f", "luks", "--object", "secret,id=s,data=%s" % SECRET,
                            "-o", "key-secret=s,iter-time=10", image, "1M")
    secret_file(tmp_path, "wrong.pass", "Not-The-Passphrase")
    manifest = write(tmp_path, "m.yml", """
        version: 1
        images:
          - {path: w.luks, format: luks, size: 2M, encryption: {passphrase_file: wrong.pass}}
        """)
    for command in ("plan", "apply"):
        proc = run.vdisk(command, manifest)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(errors) == 1, proc.stderr
        assert errors[0].startswith("vdisk: %s: " % command)
        assert "encryption: the passphrase does not open the image: Invalid password, cannot unlock any keyslot" \
            in errors[0]
        assert "Traceback" not in proc.stdout + proc.stderr
    assert helpers.qemu_info(image)["virtual-size"] == M        # not grown
    run.never_show(SECRET, "Not-The-Passphrase")
    # a missing passphrase file: one line too
    manifest = write(tmp_path, "m.yml", """
        version: 1
        images:
          - {path: w.luks, format: luks, size: 2M, encryption: {passphrase_file: missing.pass}}
        """)
    proc = run.vdisk("plan", manifest)
    assert proc.returncode == 1 and "could not read the passphrase file" in proc.stderr


def test_validate_refuses_an_inline_passphrase(tmp_path):
    run = Outputs()
    manifest = write(tmp_path, "m.yml", """
        version: 1
        images:
          - {path: i.luks, format: luks, size: 1M, encryption: {passphrase: %s}}
        """ % SECRET)
    proc = run.vdisk("validate", manifest)
    assert proc.returncode == 1 and "encryption" in proc.stderr and "passphrase" in proc.stderr
    run.never_show(SECRET)
    assert not os.path.exists(str(tmp_path / "i.luks"))


def test_manifest_apply_makes_an_encrypted_qcow2_qemu_opens(tmp_path):
    """format qcow2 with encryption: a qcow2 with LUKS inside (encrypt.format=luks), its data from a raw
    source; qemu-img compares it with the source using the same secret file; a second apply does nothing."""
    run = Outputs()
    data, passfile = source_and_secret(tmp_path)
    manifest = write(tmp_path, "m.yml", """
        version: 1
        images:
          - path: secret.qcow2
            format: qcow2
            source: data.raw
            source_format: raw
            encryption: {passphrase_file: disk.pass, iter_time: 10}
        """)
    applied = run.vdisk("apply", manifest)
    assert applied.returncode == 0, applied.stderr
    image = str(tmp_path / "secret.qcow2")
    compare = helpers.qemu_img("compare", "--object", "secret,id=s,file=%s" % passfile, "--image-opts",
                               "driver=qcow2,encrypt.key-secret=s,file.filename=%s" % image,
                               "driver=raw,file.filename=%s" % data)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    info = helpers.qemu_info(image)
    assert info["encrypted"] is True
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    again = run.vdisk("plan", manifest)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "No changes" in again.stdout
    run.never_show(SECRET)
    with open(image, "rb") as f:
        assert SECRET.encode() not in f.read()
