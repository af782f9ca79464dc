"""``--object secret,...`` and ``--image-opts`` parsed as qemu-img parses them (cli/secrets.py); the
messages are qemu-img 7.2's, and a secret's data never appears in one."""
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli import secrets
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError


def test_secrets_from_data_file_and_base64(tmp_path):
    path = tmp_path / "pw"
    path.write_bytes(b"from-file\n")
    table = secrets.parse_objects(["secret,id=a,data=pw,,with,,commas", "secret,id=b,file=%s" % path,
                                   "secret,id=c,data=cHc=,format=base64"])
    assert table == {"a": b"pw,with,commas", "b": b"from-file\n", "c": b"pw"}
    assert secrets.lookup(table, "c") == b"pw"


@pytest.mark.parametrize("definition, message", [
    ("secret,id=s", "Either 'file' or 'data' must be provided"),
    ("secret,id=s,data=x,file=/etc/hostname", "'file' and 'data' are mutually exclusive"),
    ("secret,id=s,data=!!,format=base64", "Base64 data contains invalid characters"),
    ("foo,id=s", "Parameter 'qom-type' does not accept value 'foo'"),
    ("secret,data=x", "Parameter 'id' is missing"),
    ("secret,id=s,file=/nonexistent/pw", "Unable to read /nonexistent/pw: No such file or directory"),
    ("secret,id=s,data=x,colour=red", "Property 'secret.colour' not found"),
    ("secret,id=s,data=x,keyid=k,iv=abc", "not supported"),
])
def test_bad_objects_as_qemu_img(definition, message):
    with pytest.raises(ImageError) as exc:
        secrets.parse_objects([definition])
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_duplicate_ids_and_missing_secrets_name_the_id_never_the_data():
    with pytest.raises(ImageError, match="attempt to add duplicate property 's' to object"):
        secrets.parse_objects(["secret,id=s,data=hunter2", "secret,id=s,data=hunter3"])
    with pytest.raises(ImageError) as exc:
        secrets.lookup({"s": b"hunter2"}, "nope", path="x.luks")
    assert str(exc.value) == "x.luks: key-secret: No secret with id 'nope'"
    for bad in ("secret,id=s,data=hunter2,format=hex", "secret,id=s,data=hunter2,colour=1"):
        with pytest.raises(ImageError) as exc:
            secrets.parse_objects([bad])
        assert "hunter2" not in str(exc.value)


def test_image_opts():
    opts = secrets.parse_image_opts("driver=luks,key-secret=sec0,file.filename=a,,b.luks")
    assert opts == secrets.ImageOpts("a,b.luks", "luks", "sec0")
    assert secrets.parse_image_opts("driver=qcow2,encrypt.key-secret=k,file.driver=file,file.filename=x").key_secret \
        == "k"
    assert secrets.parse_image_opts("file.filename=x") == secrets.ImageOpts("x")
    with pytest.raises(ImageError, match="image option 'cache.direct' is not supported"):
        secrets.parse_image_opts("driver=raw,file.filename=x,cache.direct=on")
    with pytest.raises(ImageError, match="A block device must be specified"):
        secrets.parse_image_opts("driver=raw")
