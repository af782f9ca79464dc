"""Declared encryption of an image: the one mapping to the engine's create options and open policy.

The ``image`` and ``image_convert`` modules (``encryption``, ``source_encryption``) and the
manifest's image entries (``encryption``) declare encryption the same way::

    encryption: {format: luks, passphrase_file: secrets/web.pass, cipher_alg: aes-256, iter_time: 2000}

:func:`parse_encryption` checks that mapping into an :class:`Encryption`; :func:`create_options`
turns it into the create options of a ``luks`` image (``key-secret``, ``cipher-alg`` ...) or of a
``qcow2`` image with LUKS encryption (``encrypt.format``, ``encrypt.key-secret`` ...), and
:func:`unlocking` into the :class:`Policy` that opens the image with its passphrase.  Nothing else
in the state layer knows the engine's names.

The passphrase is read when an action needs it (:meth:`Encryption.secret`), never while a manifest
is validated; it is kept out of every ``repr``, diff, plan, result and message.  A
``passphrase_file`` loses one trailing newline (``\\n`` or ``\\r\\n``), so that ``echo secret >
file`` works; QEMU's ``--object secret,file=`` takes the file's bytes as they are (docs/security.md).
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from ..driver import Policy
from ..errors import ImageError, InvalidOption
from ..registry import get_driver

FORMATS = ("luks",)
# the formats that can be encrypted, and the prefix of their encryption create options
ENCRYPTED_FORMATS = {"luks": "", "qcow2": "encrypt."}
# suboption -> the engine's option name (after the format's prefix)
ENGINE_NAMES = {"cipher_alg": "cipher-alg", "cipher_mode": "cipher-mode", "hash_alg": "hash-alg",
                "iter_time": "iter-time"}
KEYS = ("format", "passphrase", "passphrase_file") + tuple(ENGINE_NAMES)
# the fields of the engine's errors about the passphrase (a wrong one; none given)
KEY_FIELDS = ("key-secret", "encrypt.key-secret")
MAX_PASSPHRASE_FILE = 1 << 20          # as qemu-img's secret objects: a passphrase, not a data file


@dataclass(frozen=True)
class Encryption:
    """How an image is encrypted (or, for a source, unlocked): the passphrase never shows in ``repr``."""
    format: str = "luks"
    passphrase: Optional[bytes] = field(default=None, repr=False, compare=False)
    passphrase_file: Optional[str] = None
    cipher_alg: Optional[str] = None
    cipher_mode: Optional[str] = None
    hash_alg: Optional[str] = None
    iter_time: Optional[int] = None

    def secret(self, path: Optional[str] = None) -> bytes:
        """The passphrase: given, or read from ``passphrase_file`` now (one trailing newline removed)."""
        if self.passphrase is not None:
            return self.passphrase
        if self.passphrase_file is None:
            raise InvalidOption("a passphrase or passphrase_file is required", path=path, field="encryption")
        try:
            with open(self.passphrase_file, "rb") as f:
                data = f.read(MAX_PASSPHRASE_FILE + 1)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ImageError("could not read the passphrase file %s: %s" % (self.passphrase_file, reason),
                             path=path, field="encryption.passphrase_file") from None
        if len(data) > MAX_PASSPHRASE_FILE:
            raise InvalidOption("the passphrase file %s is larger than 1 MiB" % self.passphrase_file, path=path,
                                field="encryption.passphrase_file")
        if data.endswith(b"\n"):
            data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
        if not data:
            raise InvalidOption("the passphrase file %s holds no passphrase" % self.passphrase_file, path=path,
                                field="encryption.passphrase_file")
        return data

    def declared(self) -> Dict[str, Any]:
        """The cipher parameters asked for, by suboption name (what diffs may show: no secret)."""
        return {k: getattr(self, k) for k in ("cipher_alg", "cipher_mode", "hash_alg") if getattr(self, k) is not None}


def parse_encryption(value: Any, path: Optional[str], name: str = "encryption", base_dir: Optional[str] = None,
                     inline: bool = True, source: bool = False) -> Optional[Encryption]:
    """The :class:`Encryption` a mapping declares (None for None); :class:`InvalidOption` naming
    ``name.key`` for any mistake.  *inline*: ``passphrase`` may be given in the mapping (the modules,
    whose option is ``no_log``); a manifest takes ``passphrase_file`` only.  A relative
    ``passphrase_file`` is relative to *base_dir*.  *source*: it only unlocks an existing image
    (``source_encryption``), so the cipher suboptions are refused."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidOption("expected a mapping (format, passphrase_file ...)", path=path, field=name)
    given = {str(k): v for k, v in value.items() if v is not None}
    allowed = ("format", "passphrase", "passphrase_file") if source else KEYS
    for key in given:
        if key not in allowed or (key == "passphrase" and not inline):
            known = [k for k in allowed if inline or k != "passphrase"]
            hint = " (a manifest takes passphrase_file: secrets are not written in it)" if key == "passphrase" else ""
            raise InvalidOption("unknown field '%s'%s (known: %s)" % (key, hint, ", ".join(known)), path=path,
                                field="%s.%s" % (name, key))
    fmt = given.get("format", "luks")
    if fmt not in FORMATS:
        raise InvalidOption("invalid value %r: expected one of %s" % (fmt, ", ".join(FORMATS)), path=path,
                            field="%s.format" % name)
    passphrase, passphrase_file = given.get("passphrase"), given.get("passphrase_file")
    if passphrase is not None and passphrase_file is not None:
        raise InvalidOption("passphrase and passphrase_file are mutually exclusive", path=path, field=name)
    if passphrase is None and passphrase_file is None:
        raise InvalidOption("%s is required" % ("passphrase or passphrase_file" if inline else "passphrase_file"),
                            path=path, field=name)
    secret = None
    if passphrase is not None:
        if not isinstance(passphrase, (str, bytes)) or not passphrase:
            # the value is not shown: it is (meant to be) a secret
            raise InvalidOption("expected a non-empty string", path=path, field="%s.passphrase" % name)
        secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if passphrase_file is not None:
        if not isinstance(passphrase_file, str) or not passphrase_file or "\0" in passphrase_file:
            raise InvalidOption("expected a file name", path=path, field="%s.passphrase_file" % name)
        passphrase_file = os.path.expanduser(passphrase_file)
        if base_dir and not os.path.isabs(passphrase_file):
            passphrase_file = os.path.join(base_dir, passphrase_file)
        passphrase_file = os.path.normpath(passphrase_file)
    cipher: Dict[str, Any] = {}
    for key in ("cipher_alg", "cipher_mode", "hash_alg"):
        if key in given:
            choices = get_driver(fmt).option(ENGINE_NAMES[key]).choices     # the luks driver's, as qemu-img's
            if given[key] not in choices:
                raise InvalidOption("invalid value %r: expected one of %s" % (given[key], ", ".join(choices)),
                                    path=path, field="%s.%s" % (name, key))
            cipher[key] = given[key]
    if "iter_time" in given:
        iter_time = given["iter_time"]
        if isinstance(iter_time, str) and iter_time.strip().isdigit():
            iter_time = int(iter_time)
        if isinstance(iter_time, bool) or not isinstance(iter_time, int) or iter_time < 1:
            raise InvalidOption("expected a positive number of milliseconds, got %r" % (iter_time,), path=path,
                                field="%s.iter_time" % name)
        cipher["iter_time"] = iter_time
    return Encryption(format=fmt, passphrase=secret, passphrase_file=passphrase_file, **cipher)


def engine_prefix(image_format: str, path: Optional[str] = None, name: str = "encryption") -> str:
    """The prefix of the encryption create options of *image_format*; refused for a format without encryption."""
    if image_format not in ENCRYPTED_FORMATS:
        raise InvalidOption("format %s cannot be encrypted (luks and qcow2 can)" % image_format, path=path,
                            field=name)
    return ENCRYPTED_FORMATS[image_format]


def reserved_options(image_format: str) -> Dict[str, str]:
    """Create options of *image_format* that ``encryption`` sets: option name -> the field to use instead."""
    if image_format not in ENCRYPTED_FORMATS:
        return {}
    prefix = ENCRYPTED_FORMATS[image_format]
    out = {prefix + "key-secret": "encryption"}
    if prefix:
        out[prefix + "format"] = "encryption.format"
    out.update({prefix + engine: "encryption.%s" % key for key, engine in ENGINE_NAMES.items()})
    return out


def create_options(image_format: str, encryption: Optional[Encryption], path: Optional[str] = None) -> Dict[str, Any]:
    """The engine's create options that make a new *image_format* image encrypted as declared, the
    passphrase read now: ``{"key-secret": ...}`` for luks, ``{"encrypt.format": "luks",
    "encrypt.key-secret": ...}`` for qcow2.  Empty when *encryption* is None."""
    if encryption is None:
        return {}
    prefix = engine_prefix(image_format, path)
    options: Dict[str, Any] = {}
    if prefix:
        options[prefix + "format"] = encryption.format
    for key, engine in ENGINE_NAMES.items():
        value = getattr(encryption, key)
        if value is not None:
            options[prefix + engine] = value
    options[prefix + "key-secret"] = encryption.secret(path)
    return options


def unlocking(policy: Optional[Policy], encryption: Optional[Encryption], path: Optional[str] = None) -> Policy:
    """*policy* (default: the engine's) with the passphrase that opens an image encrypted as declared."""
    policy = policy or Policy()
    if encryption is None:
        return policy
    return policy.replace(passphrase=encryption.secret(path))


def observed_encryption(info: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """How an image is encrypted, from its info (read without the key): ``{"format": "luks",
    "cipher_alg": ..., "cipher_mode": ..., "hash_alg": ...}`` (what the header records), or None."""
    specific = info.get("format-specific") or {}
    data = specific.get("data") or {}
    if specific.get("type") == "luks":
        details = data
        fmt = "luks"
    elif isinstance(data.get("encrypt"), Mapping):
        details = data["encrypt"]
        fmt = details.get("format") or "aes"
    elif info.get("encrypted"):
        return {"format": "unknown"}
    else:
        return None
    out: Dict[str, Any] = {"format": fmt}
    for key, engine in ENGINE_NAMES.items():
        if engine in details and key != "iter_time":
            out[key] = details[engine]
    return out


def mismatch(encryption: Optional[Encryption], observed: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Why an existing image (encrypted as *observed*) cannot be the declared *encryption* in place, or None.

    Encryption is fixed when an image is made: a plain image is not encrypted in place, nor an
    encrypted one decrypted; the cipher parameters declared must be the image's (``iter_time``
    is not recorded and not compared)."""
    if encryption is None and observed is None:
        return None
    if encryption is None:
        return "the image is encrypted (%s) and no encryption is declared" % observed["format"]
    if observed is None:
        return "the image is not encrypted and encryption (%s) is declared" % encryption.format
    if observed["format"] != encryption.format:
        return "the image is encrypted with %s, not %s" % (observed["format"], encryption.format)
    for key, wanted in sorted(encryption.declared().items()):
        have = observed.get(key)
        if have is not None and have != wanted:
            return "encryption.%s is %s, not %s, and is fixed when an image is made" % (key, have, wanted)
    return None


def summary(encryption: Optional[Encryption]) -> Optional[Dict[str, Any]]:
    """The declared encryption as diffs show it (no secret, no file name)."""
    if encryption is None:
        return None
    out: Dict[str, Any] = {"format": encryption.format}
    out.update(encryption.declared())
    return out


def shown(observed: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """An observed encryption as diffs show it."""
    return dict(observed) if observed is not None else None


def check_passphrase(path: str, fmt: Optional[str], encryption: Encryption, policy: Optional[Policy] = None) -> None:
    """Open the existing encrypted image at *path* with the declared passphrase, read-only, and close it:
    a wrong passphrase is one :class:`InvalidOption` (field ``encryption``) before anything is planned."""
    from ..ops.chain import close_chain, open_image
    try:
        image = open_image(path, fmt, writable=False, policy=unlocking(policy, encryption, path), backing=False)
    except ImageError as exc:
        if exc.field not in KEY_FIELDS:
            raise
        raise InvalidOption("the passphrase does not open the image: %s" % exc.message, path=path,
                            field="encryption") from None
    close_chain(image)
