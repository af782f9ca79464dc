"""qemu-img's secrets on the command line: ``--object secret,id=ID,data=...|file=PATH[,format=raw|base64]``
and the image options that name them (``--image-opts driver=luks,key-secret=ID,file.filename=PATH``,
``-o key-secret=ID``).

Only ``secret`` objects exist here (the ones qemu-img needs for encrypted images), with its
checks and messages.  A secret's bytes are kept out of every message: errors name the secret's
id, never its data.
"""
import base64
import binascii
from typing import Dict, Iterable, NamedTuple, Optional

from ..errors import ImageError, InvalidOption

SECRET_KEYS = ("qom-type", "id", "data", "file", "format", "keyid", "iv", "loaded")


class ImageOpts(NamedTuple):
    """An image named with ``--image-opts``: its file, its driver (format) and its secret's id."""
    filename: str
    driver: Optional[str] = None
    key_secret: Optional[str] = None


def _split(text: str) -> Dict[str, str]:
    """QEMU's key=value list (``,,`` is a literal comma); a first word without ``=`` is *implied*."""
    parts, current, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    out: Dict[str, str] = {}
    for index, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if not sep:
            if index == 0:
                out["qom-type"] = key
                continue
            raise InvalidOption("Expected '=' after parameter '%s'" % key, field="--object")
        if key in out:
            raise InvalidOption("Parameter '%s' is given twice" % key, field="--object")
        out[key] = value
    return out


def parse_objects(definitions: Optional[Iterable[str]]) -> Dict[str, bytes]:
    """The secrets the ``--object`` definitions make: ``{id: bytes}``, checked as qemu-img checks them."""
    secrets: Dict[str, bytes] = {}
    for text in definitions or ():
        fields = _split(text)
        kind = fields.get("qom-type")
        if kind is None:
            raise InvalidOption("Parameter 'qom-type' is missing", field="--object")
        if kind != "secret":
            raise InvalidOption("Parameter 'qom-type' does not accept value '%s' (vdisk has secret objects only)"
                                % kind, field="--object")
        unknown = [k for k in fields if k not in SECRET_KEYS]
        if unknown:
            raise InvalidOption("Property 'secret.%s' not found" % unknown[0], field="--object")
        ident = fields.get("id")
        if not ident:
            raise InvalidOption("Parameter 'id' is missing", field="--object")
        if ident in secrets:
            raise InvalidOption("attempt to add duplicate property '%s' to object (type 'container')" % ident,
                                field="--object")
        if "keyid" in fields or "iv" in fields:
            raise InvalidOption("secret '%s': secrets encrypted with another secret (keyid, iv) are not supported"
                                % ident, field="--object")
        secrets[ident] = _secret_bytes(fields)
    return secrets


def _secret_bytes(fields: Dict[str, str]) -> bytes:
    data, path = fields.get("data"), fields.get("file")
    if data is not None and path is not None:
        raise InvalidOption("'file' and 'data' are mutually exclusive", field="--object")
    if data is None and path is None:
        raise InvalidOption("Either 'file' or 'data' must be provided", field="--object")
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
        except OSError as exc:
            raise ImageError("Unable to read %s: %s" % (path, exc.strerror), field="--object") from None
    else:
        raw = data.encode("utf-8")
    fmt = fields.get("format", "raw")
    if fmt == "raw":
        return raw
    if fmt == "base64":
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidOption("Base64 data contains invalid characters", field="--object") from None
    raise InvalidOption("Parameter 'format' does not accept value '%s'" % fmt, field="--object")


def lookup(secrets: Dict[str, bytes], ident: str, path: Optional[str] = None, field: str = "key-secret") -> bytes:
    """The bytes of secret *ident* (qemu-img's "No secret with id" when there is none); *field* names
    the option that gave the id."""
    try:
        return secrets[ident]
    except KeyError:
        raise ImageError("No secret with id '%s'" % ident, path=path, field=field) from None


def parse_image_opts(text: str) -> ImageOpts:
    """``driver=FMT,key-secret=ID,file.filename=PATH`` (QEMU's names; ``encrypt.key-secret`` for a
    qcow2 image's encryption); other options are refused with one line naming them."""
    fields = _split(text)
    implied = fields.pop("qom-type", None)
    if implied is not None:
        raise InvalidOption("Expected '=' after parameter '%s'" % implied, field="--image-opts")
    filename = fields.pop("file.filename", None) or fields.pop("file", None)
    driver = fields.pop("driver", None)
    key_secret = fields.pop("key-secret", None) or fields.pop("encrypt.key-secret", None)
    if fields.get("file.driver") == "file":       # the protocol vdisk always uses
        del fields["file.driver"]
    if fields:
        raise InvalidOption("image option '%s' is not supported by vdisk (driver, file.filename, key-secret, "
                            "encrypt.key-secret are)" % sorted(fields)[0], field="--image-opts")
    if not filename:
        raise InvalidOption("A block device must be specified for \"file\"", field="--image-opts")
    return ImageOpts(filename, driver, key_secret)
