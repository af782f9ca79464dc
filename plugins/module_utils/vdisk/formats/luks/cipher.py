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

Speed: creating a cipher context costs more than encrypting 512 bytes, so runs of sectors are done
with a few contexts, not one a sector. XTS (IEEE 1619: C = E_K1(P xor T) xor T, the tweak of block
j of a sector being E_K2(IV) times alpha^j in GF(2^128)) takes one ECB call for the sectors' first
tweaks, the other 31 tweaks of every sector computed at once on a big integer holding one 128-bit
lane per sector, and one ECB call for the data; the XORs are done on big integers too, or, where
``numpy`` is installed (a dependency of the pip package, not needed on Ansible targets), the tweaks
and XORs on 64-bit word arrays, about eight times faster (the ECB calls then dominate). CBC
encryption, sequential within a sector, takes one context a sector; CBC decryption takes one
context for a whole run and then corrects the first block of each sector (its chaining value is
the sector's IV, not the previous ciphertext block); ESSIV IVs for a run are made with one ECB call.
"""
import hashlib
import importlib
import sys
from array import array
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

from ...errors import MissingPackage

PACKAGE = "cryptography"
IV_SIZE = 16                    # the AES block
UNIT = 512                      # one IV per 512 bytes
XTS_BATCH = 8                   # units from which XTS is done a run at a time (below: a context a unit)

_backend: Optional[SimpleNamespace] = None
_numpy: Any = None              # the numpy module, False when it is not installed, None before the first look


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


def numpy_module() -> Any:
    """numpy when it can be imported (the fast XTS path), else None; looked for once."""
    global _numpy  # pylint: disable=global-statement
    if _numpy is None:
        try:
            _numpy = importlib.import_module("numpy")
        except ImportError:
            _numpy = False
    return _numpy or None


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


BLOCKS = UNIT // IV_SIZE        # AES blocks a unit
_LANE_MASKS: Dict[int, Tuple[int, int]] = {}


def _lane_masks(count: int) -> Tuple[int, int]:
    """For *count* 128-bit little-endian lanes in one integer: every bit but each lane's top bit,
    and each lane's bit 0 (kept for the last few counts: a convert asks for the same ones)."""
    masks = _LANE_MASKS.get(count)
    if masks is None:
        top = int.from_bytes((bytes(IV_SIZE - 1) + b"\x80") * count, "little")
        low = int.from_bytes((b"\x01" + bytes(IV_SIZE - 1)) * count, "little")
        masks = (((1 << (128 * count)) - 1) ^ top, low)
        if len(_LANE_MASKS) >= 8:
            _LANE_MASKS.clear()
        _LANE_MASKS[count] = masks
    return masks


def xts_tweaks(first_tweaks: bytes) -> bytearray:
    """The tweak of every block of every unit, in place order (unit by unit, block by block), from
    each unit's first tweak: block j's is the first times alpha^j in GF(2^128) (IEEE 1619: a
    128-bit little-endian value shifted left by one, 0x87 folded in when a bit falls off)."""
    count = len(first_tweaks) // IV_SIZE
    keep, low = _lane_masks(count)
    lanes = int.from_bytes(first_tweaks, "little")
    out = bytearray(count * UNIT)
    words = memoryview(out).cast("Q")
    for j in range(BLOCKS):
        block = memoryview(lanes.to_bytes(count * IV_SIZE, "little")).cast("Q")
        words[2 * j::2 * BLOCKS] = block[0::2]       # each lane's two words to block j of its unit
        words[2 * j + 1::2 * BLOCKS] = block[1::2]
        lanes = ((lanes & keep) << 1) ^ (((lanes >> 127) & low) * 0x87)
    return out


class SectorCipher:
    """Encrypts and decrypts runs of 512-byte units numbered from a given sector, with one key."""

    def __init__(self, cipher_mode: str, ivgen_alg: str, ivgen_hash_alg: Optional[str], key: bytes,
                 path: Optional[str] = None):
        b = backend(path)
        self._b = b
        self.mode = cipher_mode
        self.ivgen = ivgen_alg
        self._alg = b.algorithms.AES(bytes(key))
        if cipher_mode == "xts":
            # the halves of an XTS key: the data key K1, then the tweak key K2
            half = len(key) // 2
            self._xts_data = b.Cipher(b.algorithms.AES(bytes(key[:half])), b.modes.ECB())
            self._xts_tweak = b.Cipher(b.algorithms.AES(bytes(key[half:])), b.modes.ECB())
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
        if self.mode == "xts" and len(units) >= XTS_BATCH:
            return self._xts(view, ivs, decrypt)
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

    def _xts(self, view: memoryview, ivs: bytes, decrypt: bool) -> bytearray:
        np = numpy_module()
        if np is not None:
            return self._xts_words(np, view, ivs, decrypt)
        length = len(view)
        tweaks = int.from_bytes(memoryview(xts_tweaks(self._xts_tweak.encryptor().update(ivs)))[:length], "little")
        whitened = (int.from_bytes(view, "little") ^ tweaks).to_bytes(length, "little")
        ctx = self._xts_data.decryptor() if decrypt else self._xts_data.encryptor()
        return bytearray((int.from_bytes(ctx.update(whitened), "little") ^ tweaks).to_bytes(length, "little"))

    def _xts_words(self, np: Any, view: memoryview, ivs: bytes, decrypt: bool) -> bytearray:
        """XTS with numpy: the tweaks made on two arrays of 64-bit words (each unit's low and high
        halves, all units at once), the XORs in place on the output buffer."""
        length = len(view)
        first = np.frombuffer(self._xts_tweak.encryptor().update(ivs), dtype="<u8")
        low, high = first[0::2], first[1::2]
        tweaks = np.empty((len(low), BLOCKS, 2), dtype="<u8")
        for j in range(BLOCKS):
            tweaks[:, j, 0] = low
            tweaks[:, j, 1] = high
            carry = high >> 63             # alpha: shift the 128-bit value left, fold 0x87 into the low byte
            high = (high << 1) | (low >> 63)
            low = (low << 1) ^ (carry * 0x87)
        tweaks = tweaks.reshape(-1)[:length // 8]
        out = bytearray(length + IV_SIZE)         # update_into wants a block of room to spare
        words = np.frombuffer(out, dtype="<u8", count=length // 8)
        np.bitwise_xor(np.frombuffer(view, dtype="<u8"), tweaks, out=words)
        ctx = self._xts_data.decryptor() if decrypt else self._xts_data.encryptor()
        ctx.update_into(memoryview(out)[:length], out)      # in place (OpenSSL allows in == out)
        np.bitwise_xor(words, tweaks, out=words)
        del words
        del out[length:]
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
