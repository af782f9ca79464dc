"""luks: LUKS1 encrypted images as QEMU writes and reads them (qemu-img's ``luks`` format).

References: cryptsetup's "LUKS1 On-Disk Format Specification"; QEMU 7.2 crypto/block-luks.c and
block/crypto.c for qemu-img's options, defaults (aes-256, xts, plain64, sha256, iter-time 2000 ms,
key slot 0), layout and messages. The modules: ``header`` (the records and the cipher
specification), ``afsplit`` (the anti-forensic splitter), ``cipher`` (sector ciphers and IV
generators, on the ``cryptography`` package, imported on first use), ``keys`` (PBKDF2, key
slots), ``image`` (the open image).

vdisk encrypts and decrypts AES (128 and 256 bits) in XTS or CBC mode with the plain, plain64
or ESSIV IV generators; images qemu-img makes with other ciphers (twofish, serpent, cast5, des,
sm4) or modes (ecb, ctr) can be inspected (``info``) but are refused, in one line, for data.

The passphrase is the caller's: ``options["key-secret"]`` for create and ``Policy.passphrase``
for open, bytes or str (str is encoded as UTF-8); qemu-img's secret objects are resolved before.
"""
import os
import uuid
from typing import Any, Dict, Optional, Tuple

from ...driver import Driver, MeasureSource, OptionSpec, Policy
from ...errors import ImageError, InvalidOption
from ...io import AtomicOutput, HostFile
from ..raw import PREALLOCATION_MODES, preallocate
from . import header as hdr
from . import keys, keyslots
from .image import LuksImage

DEFAULTS = {"cipher-alg": "aes-256", "cipher-mode": "xts", "ivgen-alg": "plain64", "hash-alg": "sha256",
            "iter-time": 2000}


class LuksDriver(Driver):
    name = "luks"
    capabilities = frozenset({"create", "write", "resize", "shrink", "preallocation", "amend"})
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size"),
        OptionSpec("key-secret", "secret", None, "ID of the secret that provides the keyslot passphrase"),
        OptionSpec("cipher-alg", "enum", "aes-256", "Name of encryption cipher algorithm", hdr.CIPHER_ALGS),
        OptionSpec("cipher-mode", "enum", "xts", "Name of encryption cipher mode", hdr.CIPHER_MODES),
        OptionSpec("ivgen-alg", "enum", "plain64", "Name of IV generator algorithm", hdr.IVGEN_ALGS),
        OptionSpec("ivgen-hash-alg", "enum", None, "Name of IV generator hash algorithm", hdr.HASH_ALGS),
        OptionSpec("hash-alg", "enum", "sha256", "Name of encryption hash algorithm", hdr.HASH_ALGS),
        OptionSpec("iter-time", "int", 2000, "Time to spend in PBKDF in milliseconds"),
        # qemu-img 7.2 takes it for the file under the image (not in its -o help for luks)
        OptionSpec("preallocation", "enum", "off", "Preallocation mode (allowed values: off, falloc, full)",
                   PREALLOCATION_MODES),
    )

    # qemu-img 7.2's amend options for luks (block/crypto.c, qapi QCryptoBlockAmendOptionsLUKS): key
    # slots only, none of the create options; the same names with "encrypt." for qcow2
    amend_options = (
        OptionSpec("state", "enum", None, "Select new state of affected keyslots (active/inactive)",
                   keyslots.STATES, amendable=True),
        OptionSpec("keyslot", "int", None, "Select a single keyslot to modify explicitly", amendable=True),
        OptionSpec("old-secret", "secret", None, "Select all keyslots that match this password", amendable=True),
        OptionSpec("new-secret", "secret", None,
                   "New secret to set in the matching keyslots. Empty string to erase", amendable=True),
        OptionSpec("iter-time", "int", None, "Time to spend in PBKDF in milliseconds", amendable=True),
    )

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if hdr.probe(header) else 0

    def open(self, path: str, writable: bool = False, policy: Optional[Policy] = None) -> LuksImage:
        return LuksImage(self, path, writable, policy or Policy())

    def spec(self, options: Dict[str, Any], path: Optional[str] = None) -> hdr.CipherSpec:
        """The cipher specification *options* ask for, refused in one line when vdisk cannot do it."""

        def get(name):
            value = options.get(name)
            return DEFAULTS.get(name) if value is None else value
        for name in ("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg"):
            value = options.get(name)
            if value is not None and value not in self.option(name).choices:
                raise InvalidOption("Parameter '%s' does not accept value '%s'" % (name, value), path=path,
                                    field=name)
        try:
            spec = hdr.spec_from_options(get("cipher-alg"), get("cipher-mode"), get("ivgen-alg"),
                                         options.get("ivgen-hash-alg"), get("hash-alg"))
        except ImageError as exc:
            exc.path = path
            raise
        spec.check_supported(path)
        return spec

    def build_header(self, spec: hdr.CipherSpec) -> hdr.Header:
        """A header as qemu-img create lays it out, every slot inactive and no key yet."""
        offsets = hdr.layout(spec)

        def field(value: str, size: int) -> bytes:      # NUL-padded, as unpack gives it back
            return value.encode("ascii").ljust(size, b"\0")
        h = hdr.Header(cipher_name=field(spec.name_string(), 32), cipher_mode=field(spec.mode_string(), 32),
                       hash_spec=field(spec.hash_alg, 32), payload_offset=offsets[-1], key_bytes=spec.key_bytes,
                       uuid=field(str(uuid.uuid4()), 40))
        for slot, offset in zip(h.slots, offsets):
            slot.key_material_offset = offset
        return h

    def new_header(self, options: Dict[str, Any], path: Optional[str] = None,
                   prefix: str = "") -> Tuple[hdr.Header, bytes]:
        """A new LUKS header as qemu-img creates it for *options* (the luks format's names): the
        master key's digest set and slot 0 made from ``key-secret``; returned with slot 0's key
        material, nothing written. *prefix* names the options in messages (qcow2's ``encrypt.``)."""
        secret = options.get("key-secret")
        if secret is None:
            raise InvalidOption("Parameter '%skey-secret' is required for cipher" % prefix, path=path,
                                field=prefix + "key-secret")
        iter_time = options.get("iter-time")
        iter_time = DEFAULTS["iter-time"] if iter_time is None else int(iter_time)
        if iter_time < 0:
            raise InvalidOption("iter-time must not be negative (got %d)" % iter_time, path=path,
                                field=prefix + "iter-time")
        spec = self.spec(options, path)
        h = self.build_header(spec)
        master = os.urandom(spec.key_bytes)
        try:
            keys.set_master_key(spec, h, master, iter_time)
            material = keys.make_slot_material(spec, h, 0, master, keys.passphrase_bytes(secret), iter_time)
        except ImageError as exc:
            exc.path = path
            raise
        return h, material

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        mode = options.get("preallocation") or "off"
        if mode not in PREALLOCATION_MODES:
            raise InvalidOption("invalid parameter value: %s" % mode, path=path, field="preallocation")
        h, material = self.new_header(options, path)
        out = AtomicOutput(path)
        try:
            with HostFile(out.tmp_path, writable=True) as host:
                # the whole file is reserved as asked (QEMU truncates it to header + size first)
                preallocate(host, 0, h.payload_bytes + size, mode)
                host.pwrite(h.pack_all(), 0)
                host.pwrite(material, h.slots[0].key_material_offset * hdr.SECTOR)
            out.commit(sync)
        except BaseException:
            out.abort()
            raise

    def measure(self, size: Optional[int], options: Dict[str, Any],
                source: Optional[MeasureSource] = None) -> Dict[str, int]:
        """The header and key material areas, then the guest data, all of it (every sector is data)."""
        spec = self.spec(options)
        needed = hdr.layout(spec)[-1] * hdr.SECTOR
        guest = source.virtual_size if source is not None else -(-(size or 0) // hdr.SECTOR) * hdr.SECTOR
        return {"required": needed + guest, "fully-allocated": needed + guest}


DRIVER = LuksDriver()
