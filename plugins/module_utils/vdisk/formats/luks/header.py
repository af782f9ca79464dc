"""LUKS1 on-disk structures: the 592-byte partition header with its eight key slots, and the
cipher specification its strings spell.

References: cryptsetup's "LUKS1 On-Disk Format Specification" (version 1.2.x) for the layout;
QEMU 7.2 crypto/block-luks.c for what qemu-img writes (key material aligned to 4096 bytes, the
payload after the eighth slot), the checks it makes when it opens an image and their messages.
Everything is big-endian; offsets in the header count 512-byte sectors.

Parsing works on bytes; reading the file is the image's business.
"""
import hashlib
from dataclasses import dataclass
from typing import List, Optional

from ...errors import CorruptImage, FormatError, InvalidOption, UnsupportedFeature
from ...structure import Record, disk, extra, record

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
SECTOR = 512                     # header offsets and IV sectors both count 512 bytes
NUM_SLOTS = 8
STRIPES = 4000
SALT_LEN = 32
DIGEST_LEN = 20
KEY_SLOT_OFFSET = 4096           # the key material of slot 0 starts here; each area is aligned to it
HEADER_SECTORS = KEY_SLOT_OFFSET // SECTOR
SLOT_ACTIVE = 0x00AC71F3
SLOT_INACTIVE = 0x0000DEAD
MIN_SLOT_ITERS = 1000            # QEMU's floors for the calibrated PBKDF2 counts
MIN_MASTER_KEY_ITERS = 1000

# every value qemu-img's luks options accept (QAPI enums), and what vdisk implements
CIPHER_ALGS = ("aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128", "serpent-192",
               "serpent-256", "twofish-128", "twofish-192", "twofish-256", "sm4")
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
IVGEN_ALGS = ("plain", "plain64", "essiv")
HASH_ALGS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
# not aes-192: the cryptography package's XTS takes no 192-bit keys, and QEMU 7.2 cannot handle the
# 96000 bytes of aes-192-cbc key material (not a whole number of sectors: it aborts on an assertion)
SUPPORTED_CIPHER_ALGS = ("aes-128", "aes-256")
SUPPORTED_CIPHER_MODES = ("xts", "cbc")
DIGEST_SIZES = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64, "ripemd160": 20}


@record(">")
class KeySlot(Record):
    """One of the eight key slots (48 bytes)."""
    active: int = disk("I", SLOT_INACTIVE, shown="hex")
    iterations: int = disk("I")
    salt: bytes = disk("32s")
    key_material_offset: int = disk("I")         # in sectors
    stripes: int = disk("I", STRIPES)

    @property
    def is_active(self) -> bool:
        return self.active == SLOT_ACTIVE


@record(">")
class Header(Record):
    """The partition header proper (208 bytes); the key slots follow it (``slots``)."""
    magic: bytes = disk("6s", MAGIC)
    version: int = disk("H", VERSION)
    cipher_name: bytes = disk("32s", shown="text")
    cipher_mode: bytes = disk("32s", shown="text")
    hash_spec: bytes = disk("32s", shown="text")
    payload_offset: int = disk("I")              # in sectors
    key_bytes: int = disk("I")
    mk_digest: bytes = disk("20s")
    mk_digest_salt: bytes = disk("32s")
    mk_digest_iter: int = disk("I")
    uuid: bytes = disk("40s", shown="text")
    slots: List[KeySlot] = extra(default_factory=lambda: [KeySlot() for dummy in range(NUM_SLOTS)])

    def pack_all(self) -> bytes:
        """The header and its eight key slots, as stored (592 bytes)."""
        return self.pack() + b"".join(slot.pack() for slot in self.slots)

    @property
    def payload_bytes(self) -> int:
        return self.payload_offset * SECTOR


HEADER_SIZE = Header.SIZE + NUM_SLOTS * KeySlot.SIZE        # 592


def slot_offset(index: int) -> int:
    """Where key slot *index* is stored in the header."""
    return Header.SIZE + index * KeySlot.SIZE


def text(value: bytes) -> str:
    """A NUL-terminated header string."""
    return value.split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass(frozen=True)
class CipherSpec:
    """What the header's strings say: the volume cipher, its mode, the IV generator, the hashes."""
    cipher_alg: str              # aes-256 ...: the algorithm with the size of one key (not the XTS pair)
    cipher_mode: str             # xts, cbc, ...
    ivgen_alg: str               # plain, plain64, essiv
    ivgen_hash_alg: Optional[str]
    hash_alg: str                # PBKDF2 and the AF splitter
    key_bytes: int               # the master key (both halves for XTS)

    def mode_string(self) -> str:
        """The header's cipher_mode: ``xts-plain64``, ``cbc-essiv:sha256``."""
        spec = "%s-%s" % (self.cipher_mode, self.ivgen_alg)
        return spec + (":" + self.ivgen_hash_alg if self.ivgen_hash_alg else "")

    def name_string(self) -> str:
        """The header's cipher_name: the algorithm family (``aes``)."""
        return self.cipher_alg.split("-")[0]

    def check_supported(self, path: Optional[str] = None) -> None:
        """Refuse, in one line, what vdisk cannot encrypt or decrypt (what qemu-img may still make)."""
        if self.cipher_alg not in SUPPORTED_CIPHER_ALGS:
            raise UnsupportedFeature("cipher algorithm %s is not supported (vdisk supports %s)"
                                     % (self.cipher_alg, ", ".join(SUPPORTED_CIPHER_ALGS)), path=path,
                                     field="cipher-alg")
        if self.cipher_mode not in SUPPORTED_CIPHER_MODES:
            raise UnsupportedFeature("cipher mode %s is not supported (vdisk supports %s)"
                                     % (self.cipher_mode, ", ".join(SUPPORTED_CIPHER_MODES)), path=path,
                                     field="cipher-mode")
        for name, what in ((self.hash_alg, "hash-alg"), (self.ivgen_hash_alg, "ivgen-hash-alg")):
            if name is not None and name not in hashlib.algorithms_available:
                raise UnsupportedFeature("hash algorithm %s is not available in this Python's hashlib" % name,
                                         path=path, field=what)


def _key_size(alg: str) -> int:
    """Bytes of one key of a QEMU cipher algorithm name."""
    return {"des": 8, "3des": 24, "sm4": 16}.get(alg) or int(alg.rsplit("-", 1)[1]) // 8


def spec_from_options(cipher_alg: str, cipher_mode: str, ivgen_alg: str, ivgen_hash_alg: Optional[str],
                      hash_alg: str) -> CipherSpec:
    """The specification qemu-img create writes for these options: ESSIV hashes with sha256 unless
    told otherwise, and the key doubles for XTS."""
    if ivgen_alg == "essiv" and not ivgen_hash_alg:
        ivgen_hash_alg = "sha256"
    key_bytes = _key_size(cipher_alg) * (2 if cipher_mode == "xts" else 1)
    spec = CipherSpec(cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg, key_bytes)
    if ivgen_alg == "essiv":
        essiv_key_size(spec)
    return spec


def essiv_key_size(spec: CipherSpec, path: Optional[str] = None) -> int:
    """The ESSIV cipher's key size: the IV hash's digest, which must be an AES key size (QEMU's rule,
    after dm-crypt: aes-128 with sha256 uses AES-256 for the IVs)."""
    size = DIGEST_SIZES.get(spec.ivgen_hash_alg or "", 0)
    if size not in (16, 24, 32):
        raise InvalidOption("No AES cipher with key size %d available" % size, path=path, field="ivgen-hash-alg")
    return size


def probe(buf: bytes) -> bool:
    """QEMU's rule: the magic and version 1."""
    return len(buf) >= 8 and buf[:6] == MAGIC and buf[6:8] == b"\x00\x01"


def split_key_sectors(key_bytes: int, stripes: int = STRIPES) -> int:
    """Sectors of one slot's key material, rounded up to the 4096-byte alignment QEMU keeps."""
    sectors = -(-key_bytes * stripes // SECTOR)
    return -(-sectors // HEADER_SECTORS) * HEADER_SECTORS


def parse_header(buf: bytes, path: Optional[str] = None) -> Header:
    """The header and its slots from the first 592 bytes, checked in QEMU 7.2's order, with its messages."""
    buf = bytes(buf[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
    h = Header.unpack(buf)
    h.slots = [KeySlot.unpack(buf, slot_offset(i)) for i in range(NUM_SLOTS)]
    if h.magic != MAGIC:
        raise FormatError("Volume is not in LUKS format", path=path, field="magic")
    if h.version != VERSION:
        raise UnsupportedFeature("LUKS version %d is not supported" % h.version, path=path, field="version")
    for name, what in (("cipher_name", "cipher name"), ("cipher_mode", "cipher mode"), ("hash_spec", "hash spec")):
        if b"\0" not in getattr(h, name):
            raise CorruptImage("LUKS header %s is not NUL terminated" % what, path=path, field=name)
    if h.payload_offset < HEADER_SECTORS:
        raise CorruptImage("LUKS payload is overlapping with the header", path=path, field="payload_offset")
    if h.mk_digest_iter == 0:
        raise CorruptImage("LUKS key iteration count is zero", path=path, field="mk_digest_iter")
    for i, slot in enumerate(h.slots):
        where = "key slot %d" % i
        if slot.stripes != STRIPES:
            raise CorruptImage("Keyslot %d is corrupted (stripes %d != %d)" % (i, slot.stripes, STRIPES),
                               path=path, field=where)
        if slot.active not in (SLOT_ACTIVE, SLOT_INACTIVE):
            raise CorruptImage("Keyslot %d state (active/disable) is corrupted" % i, path=path, field=where)
        if slot.is_active and slot.iterations == 0:
            raise CorruptImage("Keyslot %d iteration count is zero" % i, path=path, field=where)
        if slot.key_material_offset < HEADER_SECTORS:
            raise CorruptImage("Keyslot %d is overlapping with the LUKS header" % i, path=path, field=where)
        length = split_key_sectors(h.key_bytes, slot.stripes)
        if slot.key_material_offset + length > h.payload_offset:
            raise CorruptImage("Keyslot %d is overlapping with the encrypted payload" % i, path=path, field=where)
        for j in range(i + 1, NUM_SLOTS):
            other = h.slots[j]
            olen = split_key_sectors(h.key_bytes, other.stripes)
            if (slot.key_material_offset < other.key_material_offset + olen
                    and other.key_material_offset < slot.key_material_offset + length):
                raise CorruptImage("Keyslots %d and %d are overlapping in the header" % (i, j), path=path,
                                   field=where)
    return h


def parse_spec(h: Header, path: Optional[str] = None) -> CipherSpec:
    """The cipher specification of a checked header (``<mode>-<ivgen>[:<ivhash>]``), with QEMU's messages."""
    mode_text = text(h.cipher_mode)
    mode, sep, ivgen = mode_text.partition("-")
    if not sep:
        raise UnsupportedFeature("Unexpected cipher mode string format '%s'" % mode_text, path=path,
                                 field="cipher_mode")
    ivgen, sep, ivhash = ivgen.partition(":")
    ivgen_hash: Optional[str] = None
    if sep:
        if ivhash not in HASH_ALGS:
            raise UnsupportedFeature("Hash algorithm '%s' not supported" % ivhash, path=path, field="cipher_mode")
        ivgen_hash = ivhash
    if mode not in CIPHER_MODES:
        raise UnsupportedFeature("Cipher mode '%s' not supported" % mode, path=path, field="cipher_mode")
    name = text(h.cipher_name)
    one_key = h.key_bytes // 2 if mode == "xts" else h.key_bytes
    alg = _cipher_alg(name, one_key)
    if alg is None:
        raise UnsupportedFeature("Algorithm '%s' with key size %d bytes not supported" % (name, one_key),
                                 path=path, field="cipher_name")
    hash_alg = text(h.hash_spec)
    if hash_alg not in HASH_ALGS:
        raise UnsupportedFeature("Hash algorithm '%s' not supported" % hash_alg, path=path, field="hash_spec")
    if ivgen not in IVGEN_ALGS:
        raise UnsupportedFeature("IV generator '%s' not supported" % ivgen, path=path, field="cipher_mode")
    spec = CipherSpec(alg, mode, ivgen, ivgen_hash, hash_alg, h.key_bytes)
    if ivgen == "essiv":
        if ivgen_hash is None:
            raise UnsupportedFeature("Missing IV generator hash specification", path=path, field="cipher_mode")
        essiv_key_size(spec, path)
    return spec


def _cipher_alg(name: str, key_size: int) -> Optional[str]:
    """QEMU's name for a header's cipher family and key size (``aes`` and 32 -> ``aes-256``)."""
    sizes = {"aes": (16, 24, 32), "serpent": (16, 24, 32), "twofish": (16, 24, 32), "cast5": (16,)}
    if key_size in sizes.get(name, ()):
        return "%s-%d" % (name, key_size * 8)
    return None


def layout(spec: CipherSpec) -> List[int]:
    """The key material offsets of the eight slots and the payload offset, in sectors, as qemu-img lays
    them out: slot areas aligned to 4096 bytes one after another from 4096, the payload after them."""
    area = split_key_sectors(spec.key_bytes)
    return [HEADER_SECTORS + i * area for i in range(NUM_SLOTS + 1)]
