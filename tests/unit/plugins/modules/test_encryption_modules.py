"""The modules' encryption options: image, image_convert (encryption, source_encryption) and manifest.

Check mode, diff, idempotence, the mismatch and wrong-passphrase errors, and the passphrase never in a
result: each result is searched for it as JSON; one run goes through a real module process, whose
``invocation`` Ansible builds with the no_log values masked.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("ansible.module_utils.basic")
pytest.importorskip("cryptography")

from ansible_collections.vdisk.images.plugins.modules import image, image_convert, manifest  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image  # noqa: E402
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe  # noqa: E402

M = 1 << 20
SECRET = "Module-Secret-Passphrase-9c1e"


def enc(**extra):
    return dict({"passphrase": SECRET, "iter_time": 10}, **extra)


def no_secret(result, *secrets):
    text = json.dumps(result, default=str)
    for secret in secrets or (SECRET,):
        assert secret not in text


def read(path, secret=SECRET, fmt="luks"):
    img = open_image(path, fmt, writable=False, policy=Policy(passphrase=secret.encode()))
    try:
        return img.read(0, img.virtual_size)
    finally:
        close_chain(img)


def test_image_luks_check_mode_diff_idempotent(tmp_path, run_module):
    disk = str(tmp_path / "d.luks")
    args = {"path": disk, "format": "luks", "size": "4M", "encryption": enc(), "mode": "0600"}
    failed, r = run_module(image, args, check_mode=True, diff=True)
    assert not failed and r["changed"] and not os.path.exists(disk)
    assert r["diff"]["after"]["encryption"] == {"format": "luks"} and r["actions"][0]["action"] == "create"
    no_secret(r)
    failed, r = run_module(image, args, diff=True)
    assert not failed and r["changed"], r
    assert r["image"]["format"] == "luks" and r["image"]["encrypted"] is True
    assert r["diff"]["after"]["encryption"]["cipher_alg"] == "aes-256"
    assert len(read(disk)) == 4 * M
    no_secret(r)
    for check_mode in (True, False):
        failed, r = run_module(image, args, check_mode=check_mode, diff=True)
        assert not failed and not r["changed"] and r["actions"] == []
        no_secret(r)
    # grow needs (and gets) the passphrase; check mode first
    failed, r = run_module(image, dict(args, size="8M"), check_mode=True)
    assert r["changed"] and observe(disk).virtual_size == 4 * M
    failed, r = run_module(image, dict(args, size="8M"), diff=True)
    assert not failed and r["changed"] and r["diff"]["after"]["virtual-size"] == 8 * M
    assert observe(disk).virtual_size == 8 * M
    no_secret(r)


def test_image_passphrase_file_and_mismatch(tmp_path, run_module):
    secret_file = tmp_path / "pass"
    secret_file.write_text(SECRET + "\n")
    disk = str(tmp_path / "f.luks")
    args = {"path": disk, "format": "luks", "size": "1M",
            "encryption": {"passphrase_file": str(secret_file), "iter_time": 10, "cipher_alg": "aes-128"}}
    failed, r = run_module(image, args)
    assert not failed and r["changed"]
    assert observe(disk).encryption["cipher_alg"] == "aes-128" and len(read(disk)) == M
    assert not run_module(image, args)[1]["changed"]
    failed, r = run_module(image, dict(args, encryption=enc(cipher_alg="aes-256")))
    assert failed and "cipher_alg is aes-128, not aes-256" in r["msg"] and "recreate" in r["msg"]
    no_secret(r)
    plain = str(tmp_path / "p.qcow2")
    run_module(image, {"path": plain, "size": "1M"})
    failed, r = run_module(image, {"path": plain, "size": "1M", "encryption": enc()}, check_mode=True)
    assert failed and "not encrypted" in r["msg"] and observe(plain).encryption is None
    no_secret(r)


def test_image_wrong_passphrase_one_line(tmp_path, run_module):
    disk = str(tmp_path / "w.luks")
    run_module(image, {"path": disk, "format": "luks", "size": "1M", "encryption": enc()})
    for check_mode in (True, False):
        failed, r = run_module(image, {"path": disk, "format": "luks", "size": "2M",
                                       "encryption": enc(passphrase="Wrong-One")}, check_mode=check_mode)
        assert failed and "\n" not in r["msg"] and "Traceback" not in r["msg"]
        assert r["msg"] == "%s: encryption: the passphrase does not open the image: Invalid password, cannot " \
                           "unlock any keyslot" % disk
        no_secret(r, SECRET, "Wrong-One")
    assert observe(disk).virtual_size == M


@pytest.mark.parametrize("args,words", [
    ({"format": "luks"}, "format luks needs encryption"),
    ({"format": "raw", "encryption": {"passphrase": SECRET}}, "cannot be encrypted"),
    ({"encryption": {"passphrase": SECRET, "passphrase_file": "/x"}}, "mutually exclusive"),
    ({"encryption": {"format": "luks"}}, "one of the following is required"),
    ({"format": "luks", "encryption": {"passphrase": SECRET}, "options": {"key-secret": "s"}}, "key-secret"),
])
def test_image_errors(tmp_path, run_module, args, words):
    failed, r = run_module(image, dict({"path": str(tmp_path / "e.img"), "size": "1M"}, **args))
    assert failed and words in r["msg"]
    no_secret(r)
    assert os.listdir(str(tmp_path)) == []


def test_image_convert_into_and_out_of_luks(tmp_path, run_module):
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.truncate(4 * M)
        f.write(b"\x6b" * 65536)
    dest = str(tmp_path / "d.luks")
    args = {"src": src, "src_format": "raw", "dest": dest, "format": "luks", "encryption": enc()}
    failed, r = run_module(image_convert, args, check_mode=True, diff=True)
    assert not failed and r["changed"] and not os.path.exists(dest)
    assert r["diff"]["after"]["encryption"] == {"format": "luks"}
    failed, r = run_module(image_convert, args, diff=True)
    assert not failed and r["changed"] and r["image"]["encrypted"] is True
    with open(src, "rb") as f:
        assert read(dest) == f.read()
    no_secret(r)
    for check_mode in (True, False):       # compared with the passphrase: unchanged
        failed, r = run_module(image_convert, args, check_mode=check_mode)
        assert not failed and not r["changed"]
    failed, r = run_module(image_convert, dict(args, encryption=enc(passphrase="Wrong-One")))
    assert failed and "Invalid password" in r["msg"]
    no_secret(r, SECRET, "Wrong-One")
    # out of luks: the source needs its passphrase
    plain = str(tmp_path / "back.qcow2")
    failed, r = run_module(image_convert, {"src": dest, "dest": plain})
    assert failed and "source_encryption" in r["msg"] and not os.path.exists(plain)
    back = {"src": dest, "dest": plain, "source_encryption": {"passphrase": SECRET}}
    failed, r = run_module(image_convert, back, diff=True)
    assert not failed and r["changed"] and "encryption" not in r["diff"]["after"]
    assert read(plain, fmt="qcow2") == read(dest)
    assert not run_module(image_convert, back)[1]["changed"]
    no_secret(r)
    failed, r = run_module(image_convert, {"src": src, "dest": plain, "format": "qcow2"})
    assert not failed and not r["changed"]          # the same content, plain as asked
    # a destination not encrypted as asked (another cipher) is rewritten (on_exists=compare)
    failed, r = run_module(image_convert, dict(args, encryption=enc(cipher_alg="aes-128")), check_mode=True)
    assert not failed and r["changed"] and observe(dest).encryption["cipher_alg"] == "aes-256"
    failed, r = run_module(image_convert, dict(args, encryption=enc(cipher_alg="aes-128")))
    assert not failed and r["changed"] and observe(dest).encryption["cipher_alg"] == "aes-128"
    failed, r = run_module(image_convert, {"src": src, "dest": plain, "format": "qcow2",
                                           "options": {"encrypt.key-secret": "x"}})
    assert failed and "encryption" in r["msg"]


def test_manifest_module_passphrase_file_and_masked_inline(tmp_path, run_module):
    (tmp_path / "disk.pass").write_text(SECRET)
    images = [{"path": "m.luks", "format": "luks", "size": "1M",
               "encryption": {"passphrase_file": "disk.pass", "iter_time": 10}}]
    failed, r = run_module(manifest, {"images": images, "dir": str(tmp_path)}, check_mode=True, diff=True)
    assert not failed and r["changed"] and not os.path.exists(str(tmp_path / "m.luks"))
    failed, r = run_module(manifest, {"images": images, "dir": str(tmp_path)})
    assert not failed and r["changed"] and len(read(str(tmp_path / "m.luks"))) == M
    failed, r = run_module(manifest, {"images": images, "dir": str(tmp_path)})
    assert not failed and not r["changed"]
    no_secret(r)
    inline = [{"path": "i.luks", "format": "luks", "size": "1M", "encryption": {"passphrase": SECRET}}]
    failed, r = run_module(manifest, {"images": inline, "dir": str(tmp_path)})
    assert failed and "passphrase_file" in r["msg"]
    no_secret(r)


def run_process(module_name, args, tmp_path):
    """The module as Ansible runs it: its own process, arguments from a file, the JSON result on stdout."""
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    # the child finds the collection and ansible where this process does (ansible-test puts them on sys.path,
    # not in the environment)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(entry for entry in sys.path if entry))
    proc = subprocess.run([sys.executable, "-m", "ansible_collections.vdisk.images.plugins.modules." + module_name,
                           str(path)], capture_output=True, text=True, env=env, cwd=str(tmp_path), check=False)
    assert SECRET not in proc.stderr
    assert proc.stdout, proc.stderr[-2000:]
    return json.loads(proc.stdout), proc.stdout


@pytest.mark.parametrize("module_name", ["image", "manifest"])
def test_invocation_masks_the_passphrase(tmp_path, module_name):
    disk = str(tmp_path / "n.luks")
    if module_name == "image":
        args = {"path": disk, "format": "luks", "size": "1M", "encryption": enc()}
    else:
        args = {"images": [{"path": "n.luks", "format": "luks", "size": "1M", "encryption": enc()}],
                "dir": str(tmp_path)}
    result, text = run_process(module_name, args, tmp_path)
    assert SECRET not in text and "invocation" in result
    invocation = json.dumps(result["invocation"])
    assert "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in invocation or "********" in invocation
    assert result.get("failed") is (None if module_name == "image" else True)
    if module_name == "image":
        assert result["changed"] and observe(disk).encryption is not None
