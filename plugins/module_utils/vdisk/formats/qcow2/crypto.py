"""LUKS encryption of qcow2 data clusters (crypt_method 2), as QEMU 7.2 does it.

References: QEMU docs/interop/qcow2.txt ("Full disk encryption header pointer"); block/qcow2.c
(qcow2_do_open: ``crypt_physical_offset`` is true for every method but the legacy AES one, so a
LUKS data cluster's 512-byte units are numbered by their HOST offset in the image file, not by the
guest offset); qcow2_crypto_hdr_*_func (the LUKS header lives in qcow2 clusters that the extension
points to; qemu-img 7.2 puts it at the cluster after the L1 table, the extension's length being the
LUKS header's payload offset in bytes, which QEMU writes into the embedded header as usual).

The LUKS records, key handling and sector ciphers are the luks format's (formats/luks).

The legacy AES method (crypt_method 1, :class:`LegacyAes`) is read only: QEMU 7.2's
crypto/block-qcow.c takes the secret (a C string: cut at its first NUL) zero-padded or truncated
to 16 bytes as the AES-128 key, no header, no key derivation; each 512-byte unit is AES-128-CBC
with the plain64 IV of its number, and qcow2_do_open sets ``crypt_physical_offset`` false for it,
so units are numbered by their GUEST offset (a unit's ciphertext depends on where the guest sees
it, not where it is stored). The method is insecure (a fixed, unsalted key, predictable IVs, the
password is the key): vdisk reads such images so their data can be converted out, and writes,
creates and amends none (:data:`AES_READ_ONLY`).
"""
from typing import Any, Dict, Optional

from ...errors import CorruptImage, InvalidOption, MissingPackage, UnsupportedFeature
from . import header as hdr

# the luks format's modules are imported on first use: naming the qcow2 format imports no other driver
# (the luks package imports the raw driver), and unencrypted images never need them
SECTOR = 512                    # LUKS header offsets and IV units both count 512 bytes


def _luks():
    """The luks format's header, keys and cipher modules (imported on first use)."""
    # pylint: disable=import-outside-toplevel
    from ..luks import cipher, keys
    from ..luks import header as luks_hdr
    return luks_hdr, keys, cipher


KEY_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher"
AES_KEY_BYTES = 16              # block-qcow.c: the secret zero-padded or truncated to an AES-128 key
AES_READ_ONLY = ("legacy AES-CBC encrypted %s images (encrypt.format=aes) are read-only in vdisk: the method is "
                 "insecure; convert the image to an unencrypted or LUKS-encrypted one")


class _SectorData:
    """Reads of guest data through a sector cipher, in 512-byte units numbered by the host offset
    (``physical``: LUKS) or by the guest offset (the legacy AES method)."""

    path: str
    physical = True
    _cipher = None

    def cipher(self):
        """The unlocked sector cipher; QEMU's message when the image was opened without a key."""
        if self._cipher is None:
            raise InvalidOption(KEY_REQUIRED, path=self.path, field="encrypt.key-secret")
        return self._cipher

    def pread(self, target, length: int, host: int, guest: Optional[int] = None) -> bytes:
        """*length* plaintext bytes stored at *host* of *target* (a HostFile) for the guest at *guest*,
        whole units read and decrypted (*host* and *guest* lie at the same place in a unit)."""
        cipher = self.cipher()
        base = host if self.physical or guest is None else guest
        first = host // SECTOR
        stop = -(-(host + length) // SECTOR)
        raw = target.pread((stop - first) * SECTOR, first * SECTOR)
        skip = host - first * SECTOR
        return bytes(cipher.decrypt(base // SECTOR, raw)[skip:skip + length])


class LegacyAes(_SectorData):
    """The legacy AES-CBC method of qcow and qcow2 (crypt_method 1): read only (see the module's
    docstring). *fmt* names the format in messages."""

    physical = False

    def __init__(self, path: str, fmt: str = "qcow2"):
        self.path = path
        self.fmt = fmt

    def __repr__(self) -> str:          # never the key
        return "<%s legacy AES %s>" % (self.fmt, "unlocked" if self._cipher else "locked")

    def unlock(self, passphrase) -> None:
        """The key: the secret's bytes up to its first NUL, zero-padded or cut to 16 (qcrypto_block_qcow_init)."""
        dummy, keys, cipher = _luks()
        key = keys.passphrase_bytes(passphrase)[:AES_KEY_BYTES].ljust(AES_KEY_BYTES, b"\0")
        try:
            self._cipher = cipher.SectorCipher("cbc", "plain64", None, key, self.path)
        except MissingPackage as exc:       # named for what needs it: not LUKS here
            raise MissingPackage("legacy AES encryption", exc.package, path=self.path, field="encryption") from None

    def refuse_writing(self) -> None:
        raise UnsupportedFeature(AES_READ_ONLY % self.fmt, path=self.path, field="crypt_method")

    def pwrite(self, target, data, host: int) -> None:  # pylint: disable=unused-argument
        self.refuse_writing()

    @staticmethod
    def info() -> Dict[str, Any]:
        """qemu-img info's ``encrypt`` block: the method has nothing else to show."""
        return {"format": "aes"}


class Encryption(_SectorData):
    """The LUKS header of an encrypted qcow2 image, and its sector cipher once unlocked."""

    def __init__(self, host, h: hdr.Header, path: str):
        self.path = path
        pointer = h.crypto_header()
        if pointer is None:
            raise CorruptImage("encryption header extension missing or too short", path=path,
                               field="crypto header extension")
        self.offset = pointer.encryption_header_offset
        self.length = pointer.encryption_header_length
        if self.offset % h.cluster_size or self.offset + self.length > host.size():
            raise CorruptImage("Invalid encryption header offset or length", path=path,
                               field="crypto header extension")
        self._host = host
        luks_hdr = _luks()[0]
        self.header = luks_hdr.parse_header(host.pread(luks_hdr.HEADER_SIZE, self.offset), path)
        self.spec = luks_hdr.parse_spec(self.header, path)
        self._cipher = None             # a luks SectorCipher once unlocked
        self._master_key = None         # kept to add key slots (amend); never shown

    def __repr__(self) -> str:          # never the key
        return "<qcow2 Encryption %s>" % ("unlocked" if self._cipher else "locked")

    def unlock(self, passphrase) -> None:
        """Unlock the master key; :class:`keys.InvalidPassword` when no slot opens with *passphrase*."""
        self.spec.check_supported(self.path)
        dummy, keys, cipher = _luks()

        def pread(length: int, offset: int) -> bytes:
            return self._host.pread(length, self.offset + offset)
        master = keys.unlock(self.spec, self.header, keys.passphrase_bytes(passphrase), pread, self.path)
        self._cipher = cipher.SectorCipher(self.spec.cipher_mode, self.spec.ivgen_alg, self.spec.ivgen_hash_alg,
                                           master, self.path)
        self._master_key = master

    def amend_keyslots(self, options: Dict[str, Any], force: bool) -> None:
        """``qemu-img amend -o encrypt.state=...``: the luks format's key-slot amend on the header
        inside the image (offsets relative to it); the image must be unlocked, as qemu-img opens it
        with its key-secret first."""
        self.cipher()
        from ..luks import keyslots  # pylint: disable=import-outside-toplevel

        def pread(length: int, offset: int) -> bytes:
            return self._host.pread(length, self.offset + offset)

        def pwrite(data, offset: int) -> None:
            self._host.pwrite(data, self.offset + offset)
        request = keyslots.request_from_options(options, prefix=ENCRYPT_PREFIX, force=force, path=self.path)
        keyslots.amend_keyslots(self.spec, self.header, request, pread, pwrite, self._master_key, self.path)
        self._host.flush()

    def info(self) -> Dict[str, Any]:
        """qemu-img info's ``encrypt`` block (no key needed), the luks format's fields with ``format``."""
        from ..luks.image import header_info  # pylint: disable=import-outside-toplevel
        return header_info(self.header, self.spec, "luks")

    # -- data: *host* is the offset in the image file, the IV sector base (crypt_physical_offset) --
    def pwrite(self, target, data, host: int) -> None:
        """Encrypt *data* for *host* and write it; partial units at the edges are read and patched."""
        cipher = self.cipher()
        data = memoryview(data).cast("B")
        first = host // SECTOR
        end = host + len(data)
        stop = -(-end // SECTOR)
        if host % SECTOR or end % SECTOR:
            buf = bytearray(self.pread(target, (stop - first) * SECTOR, first * SECTOR))
            buf[host - first * SECTOR:end - first * SECTOR] = data
            data = memoryview(buf)
        target.pwrite(cipher.encrypt(first, data), first * SECTOR)


# -- create ---------------------------------------------------------------------------------------
ENCRYPT_PREFIX = "encrypt."
LUKS_OPTIONS = ("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time", "key-secret")


def encrypt_format(options: Dict[str, Any]) -> Optional[str]:
    """The encryption format *options* ask for: ``encrypt.format``, or "aes" for the legacy ``encryption=on``."""
    fmt = options.get("encrypt.format")
    if fmt is None and options.get("encryption") not in (None, False, "off", "false"):
        fmt = "aes"
    return fmt


def wanted(options: Dict[str, Any]) -> bool:
    return encrypt_format(options) == "luks"


def luks_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The ``encrypt.*`` options under the luks format's names."""
    return {name: options.get(ENCRYPT_PREFIX + name) for name in LUKS_OPTIONS}


def check_create_options(options: Dict[str, Any], path: Optional[str] = None) -> None:
    """Refuse, as qemu-img 7.2 does, what cannot be created: an unknown format, the legacy AES
    method (qemu-img still makes it; vdisk does not), LUKS without a key or with a bad cipher."""
    fmt = encrypt_format(options)
    if fmt is None:
        return
    if fmt not in ("aes", "luks"):
        raise InvalidOption("Parameter 'format' does not accept value '%s'" % fmt, path=path, field="encrypt.format")
    if fmt == "aes":
        raise UnsupportedFeature("legacy AES-CBC encryption is not supported for new qcow2 images (encrypt.format=aes): "
                                 "the method is insecure (vdisk only reads such images); use encrypt.format=luks",
                                 path=path, field="encrypt.format")
    if options.get(ENCRYPT_PREFIX + "key-secret") is None:
        raise InvalidOption(KEY_REQUIRED, path=path, field="encrypt.key-secret")
    _luks_driver().spec(luks_options(options), path)


def _luks_driver():
    # imported on first use: naming qcow2 loads no other driver
    from ..luks import DRIVER  # pylint: disable=import-outside-toplevel
    return DRIVER


def set_up(driver, path: str, options: Dict[str, Any], policy) -> None:
    """Give the new, empty image at *path* its LUKS header as qemu-img create does
    (qcow2_set_up_encryption): clusters allocated after the L1 table, zeroed, the LUKS header and
    slot 0's key material written there, then crypt_method 2 and the pointer extension."""
    from .image import Qcow2Image  # pylint: disable=import-outside-toplevel  # image imports this module
    h, material = _luks_driver().new_header(luks_options(options), path, ENCRYPT_PREFIX)
    # the embedded header keeps the luks layout: payload offset = the header and key material's size,
    # which is also the length the extension records (QEMU's qcow2_crypto_hdr_init_func)
    length = h.payload_bytes
    image = Qcow2Image(driver, path, True, policy)
    try:
        cs = image.cs
        offset = image.refcounts.alloc(-(-length // cs))
        image.host.pwrite(bytes(-(-length // cs) * cs), offset)
        image.host.pwrite(h.pack_all(), offset)
        image.host.pwrite(material, offset + h.slots[0].key_material_offset * SECTOR)
        image.header.crypt_method = hdr.CRYPT_LUKS
        image.header.crypto_extension = hdr.CryptoHeaderPointer(offset, length).pack()
        image.write_header()
    finally:
        image.close()


def header_length(options: Dict[str, Any]) -> int:
    """Bytes of the LUKS header and key material a new image with *options* gets (checked as create)."""
    check_create_options(options)
    return _luks()[0].layout(_luks_driver().spec(luks_options(options)))[-1] * SECTOR
