"""Sector ciphers of LUKS volumes: AES in XTS or CBC mode, with QEMU's IV generators.

Every 512-byte sector is encrypted on its own, with an IV made from its number (the payload's first
sector is 0; a key slot's material also counts from 0):

* ``plain``: the sector number's low 32 bits, little-endian, zero-padded to the IV size;
* ``plain64``: the low 64 bits, likewise;
* ``essiv``: the plain64 IV encrypted (ECB) under the hash of the volume key, the cipher taking the
  digest's size as its key size (aes-128 with sha256 makes its IVs with AES-256), as QEMU and
  dm-crypt do.

References: QEMU 7.2 crypto/ivgen-*.c and crypto/block.c (one IV per 512-byte unit, the last unit
may be shorter: key material whose length is not a multiple of 512); IEEE 1619 for XTS.

The ciphers come from the ``cryptography`` package, imported on first use (:func:`backend`), so
that the engine and every unencrypted image work without it.

Speed: creating a cipher context costs more than encrypting 512 bytes, so the work per sector is
kept to one context (XTS, and CBC encryption, which is sequential within a sector); CBC decryption
takes one context for a whole run of sectors and then corrects the first block of each sector
(its chaining value is the sector's IV, not the previous ciphertext block); ESSIV IVs for a run are
made with one ECB call.
"""
import hashlib
import importlib
import sys
from array import array
from types import SimpleNamespace
from typing import Optional

from ...errors import MissingPackage

PACKAGE = "cryptography"
IV_SIZE = 16                    # the AES block
UNIT = 512                      # one IV per 512 bytes

_backend: Optional[SimpleNamespace] = None


def backend(path: Optional[str] = None) -> SimpleNamespace:
    """``Cipher``, ``algorithms`` and ``modes`` of the cryptography package (imported on first use);
    :class:`MissingPackage` in one line when it is not installed."""
    global _backend  # pylint: disable=global-statement
    if _backend is None:
        try:
            ciphers = importlib.import_module("cryptography.hazmat.primitives.ciphers")
        except ImportError:
            raise MissingPackage("LUKS encryption", PACKAGE, path=path, field="encryption") from None
        _backend = SimpleNamespace(Cipher=ciphers.Cipher, algorithms=ciphers.algorithms, modes=ciphers.modes)
    return _backend


def available() -> bool:
    """Whether LUKS images can be opened and created on this Python (imports the package)."""
    try:
        backend()
    except MissingPackage:
        return False
    return True


def _le64_ivs(first: int, count: int, mask: int) -> bytes:
    """*count* IVs of sector numbers from *first* (``& mask``): little-endian, zero-padded to 16 bytes."""
    words = array("Q", bytes(16 * count))
    if mask == 0xFFFFFFFFFFFFFFFF and first + count <= mask + 1:
        words[0::2] = array("Q", range(first, first + count))
    else:
        words[0::2] = array("Q", ((first + i) & mask for i in range(count)))
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()


class SectorCipher:
    """Encrypts and decrypts runs of 512-byte units numbered from a given sector, with one key."""

    def __init__(self, cipher_mode: str, ivgen_alg: str, ivgen_hash_alg: Optional[str], key: bytes,
                 path: Optional[str] = None):
        b = backend(path)
        self._b = b
        self.mode = cipher_mode
        self.ivgen = ivgen_alg
        self._alg = b.algorithms.AES(bytes(key))
        self._essiv = None
        if ivgen_alg == "essiv":
            essiv_key = hashlib.new(ivgen_hash_alg or "sha256", bytes(key)).digest()
            self._essiv = b.Cipher(b.algorithms.AES(essiv_key), b.modes.ECB())

    def __repr__(self) -> str:          # never the key
        return "<SectorCipher %s-%s>" % (self.mode, self.ivgen)

    def ivs(self, first: int, count: int) -> bytes:
        """The IVs of *count* units from sector *first*, 16 bytes each."""
        if self.ivgen == "plain":
            return _le64_ivs(first, count, 0xFFFFFFFF)
        plain64 = _le64_ivs(first, count, 0xFFFFFFFFFFFFFFFF)
        if self._essiv is None:
            return plain64
        return self._essiv.encryptor().update(plain64)

    def _units(self, length: int):
        return [(start, min(start + UNIT, length)) for start in range(0, length, UNIT)]

    def decrypt(self, first: int, data) -> bytearray:
        """The plaintext of *data*, units numbered from sector *first* (a multiple of 16 bytes)."""
        return self._run(first, data, decrypt=True)

    def encrypt(self, first: int, data) -> bytearray:
        """The ciphertext of *data*, units numbered from sector *first* (a multiple of 16 bytes)."""
        return self._run(first, data, decrypt=False)

    def _run(self, first: int, data, decrypt: bool) -> bytearray:
        view = memoryview(data).cast("B")
        length = len(view)
        if length % IV_SIZE:
            raise ValueError("encrypted data must be a multiple of %d bytes" % IV_SIZE)
        units = self._units(length)
        ivs = self.ivs(first, len(units))
        b = self._b
        if self.mode == "cbc" and decrypt:
            return self._cbc_decrypt(view, units, ivs)
        out = bytearray(length)
        out_view = memoryview(out)
        xts = self.mode == "xts"
        mode = b.modes.XTS if xts else b.modes.CBC
        cipher, alg = b.Cipher, self._alg
        for i, (start, end) in enumerate(units):
            c = cipher(alg, mode(ivs[16 * i:16 * i + 16]))
            ctx = c.decryptor() if decrypt else c.encryptor()
            if xts:     # straight into place (a block mode's update_into wants a block of room to spare)
                ctx.update_into(view[start:end], out_view[start:end])
            else:
                out[start:end] = ctx.update(view[start:end])
        return out

    def _cbc_decrypt(self, view: memoryview, units, ivs: bytes) -> bytearray:
        b = self._b
        out = bytearray(b.Cipher(self._alg, b.modes.CBC(ivs[:16])).decryptor().update(view))
        count = len(units) - 1
        if count:
            # each unit after the first was decrypted with the previous unit's last ciphertext block as
            # its chaining value instead of its IV: XOR both into its first block, 64-bit word by word,
            # with strided views (64 words a unit) so the whole run is corrected in a few C-level passes
            words_in, words_out, words_iv = view.cast("Q"), memoryview(out).cast("Q"), memoryview(ivs).cast("Q")
            for w in (0, 1):
                first = slice(64 + w, 64 * count + w + 1, 64)
                fix = (_as_int(words_out[first]) ^ _as_int(words_in[62 + w:64 * count - 1 + w:64])
                       ^ _as_int(words_iv[2 + w::2]))
                words_out[first] = memoryview(fix.to_bytes(8 * count, "little")).cast("Q")
        return out


def _as_int(words: memoryview) -> int:
    return int.from_bytes(words.tobytes(), "little")
