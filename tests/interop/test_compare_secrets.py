"""``vdisk compare`` of encrypted images as ``qemu-img compare --object ... --image-opts A B``: each
image unlocked with its own key-secret, the same verdicts, exit statuses and messages as qemu-img."""
import pytest

import helpers

pytest.importorskip("cryptography")

SECRETS = ["--object", "secret,id=s0,data=first-Secret", "--object", "secret,id=s1,data=second-Secret"]
LUKS_A = "driver=luks,key-secret=s0,file.filename=%s"
QCOW2_B = "driver=qcow2,encrypt.key-secret=s1,file.filename=%s"


@pytest.fixture(name="images")
def fixture_images(tmp_path):
    """The same guest data as raw, as LUKS under secret s0 and as qcow2+LUKS under s1 (by qemu-img)."""
    plain = tmp_path / "plain.raw"
    helpers.qemu_img("create", "-f", "raw", plain, "4M", check=True)
    helpers.qemu_io("raw", plain, "write -P 0x61 0 1M", "write -P 0x62 3M 4k")
    luks, qcow2 = tmp_path / "a.luks", tmp_path / "b.qcow2"
    helpers.qemu_img_pbkdf2("convert", *SECRETS, "-f", "raw", "-O", "luks", "-o", "key-secret=s0,iter-time=10",
                            plain, luks)
    helpers.qemu_img_pbkdf2("convert", *SECRETS, "-f", "raw", "-O", "qcow2", "-o",
                            "encrypt.format=luks,encrypt.key-secret=s1,encrypt.iter-time=10", plain, qcow2)
    return plain, luks, qcow2


def both(*args):
    """(vdisk, qemu-img) of ``compare ARGS``: exit status, stdout, stderr without the program's prefix."""
    ours = helpers.vdisk_cli("compare", *args)
    theirs = helpers.qemu_img("compare", *args)
    return ((ours.returncode, ours.stdout, ours.stderr.replace("vdisk: compare: ", "")),
            (theirs.returncode, helpers._txt(theirs.stdout), helpers._txt(theirs.stderr).replace("qemu-img: ", "")))


def test_each_image_unlocked_with_its_own_secret(images):
    dummy, luks, qcow2 = images
    ours, theirs = both(*SECRETS, "--image-opts", LUKS_A % luks, QCOW2_B % qcow2)
    assert ours == theirs == (0, "Images are identical.\n", "")


def test_a_difference_is_found_inside_the_encrypted_data(images, tmp_path):
    plain, luks, dummy = images
    other = tmp_path / "other.raw"
    helpers.run("cp", plain, other)
    helpers.qemu_io("raw", other, "write -P 0x63 3M 512")
    ours, theirs = both(*SECRETS, "--image-opts", LUKS_A % luks, "driver=raw,file.filename=%s" % other)
    assert ours[:2] == theirs[:2] == (1, "Content mismatch at offset 3145728!\n")


def test_without_the_secret_qemu_img_s_message(images):
    plain, luks, qcow2 = images
    ours, theirs = both(*SECRETS, "--image-opts", LUKS_A % luks, "driver=qcow2,file.filename=%s" % qcow2)
    assert ours[0] == theirs[0] == 2
    assert "Parameter 'encrypt.key-secret' is required for cipher" in ours[2]
    assert "Parameter 'encrypt.key-secret' is required for cipher" in theirs[2]
    ours, theirs = both(plain, luks)
    assert ours[0] == theirs[0] == 2 and "Parameter 'key-secret' is required for cipher" in ours[2]


def test_wrong_secret_and_format_with_image_opts(images):
    plain, luks, dummy = images
    wrong = ["--object", "secret,id=s0,data=nope"]
    ours, theirs = both(*wrong, "--image-opts", LUKS_A % luks, "driver=raw,file.filename=%s" % plain)
    assert ours[0] == theirs[0] == 2
    assert "Invalid password, cannot unlock any keyslot" in ours[2] and ours[2].count("\n") == 1
    ours, theirs = both("-f", "raw", "--image-opts", "x", "y")
    assert ours == (2, "", "--image-opts and --format are mutually exclusive\n")
    assert theirs[0] == 2 and theirs[2] == ours[2]
