"""LUKS1 key handling: the master key's digest, key slots made from a passphrase and unlocked with
one, and the PBKDF2 iteration counts calibrated to a time as QEMU calibrates them.

References: cryptsetup's "LUKS1 On-Disk Format Specification" (master key digest, key slot
material = the AF-split master key encrypted with the PBKDF2-derived slot key, the volume's cipher
and IV generator, units numbered from 0); QEMU 7.2 crypto/block-luks.c and crypto/pbkdf.c (the
counts: iterations per second measured on this CPU, scaled to iter-time, divided by 8 for the
master key digest, at least 1000; slots tried in order; its messages).

A passphrase is used as QEMU uses a secret: up to its first NUL byte. It is never put in an
error, a repr or a log line.
"""
import hashlib
import hmac
import os
import time
from typing import Callable, Dict, Optional, Tuple

from ...errors import ImageError, InvalidOption
from . import afsplit
from .cipher import SectorCipher
from .header import (DIGEST_LEN, MIN_MASTER_KEY_ITERS, MIN_SLOT_ITERS, NUM_SLOTS, SALT_LEN, SECTOR, SLOT_ACTIVE,
                     CipherSpec, Header)

UINT32_MAX = 0xFFFFFFFF
_RATES: Dict[Tuple[str, int, int], float] = {}
# measure PBKDF2 over at least this much CPU time (QEMU measures over 500 ms; the rate is linear in
# the count, a shorter measurement keeps creating an image quick)
CALIBRATION_SECONDS = 0.05


class InvalidPassword(ImageError):
    """No active key slot opens with the passphrase given."""


def passphrase_bytes(secret) -> bytes:
    """The bytes QEMU derives keys from: str as UTF-8, cut at the first NUL (QEMU uses C strings)."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    return bytes(secret).split(b"\0", 1)[0]


def pbkdf2(hash_alg: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    return hashlib.pbkdf2_hmac(hash_alg, secret, salt, iterations, length)


def iterations_per_second(hash_alg: str, secret_len: int, out_len: int) -> float:
    """PBKDF2 iterations this thread computes per CPU second (measured once per process and shape)."""
    shape = (hash_alg, secret_len, out_len)
    rate = _RATES.get(shape)
    if rate is None:
        secret, salt = bytes(secret_len or 1)[:secret_len], bytes(SALT_LEN)
        count = 1 << 10
        while True:
            start = time.thread_time()
            pbkdf2(hash_alg, secret, salt, count, out_len)
            spent = time.thread_time() - start
            if spent >= CALIBRATION_SECONDS:
                break
            count *= 4 if spent < CALIBRATION_SECONDS / 4 else 2
        rate = _RATES[shape] = count / spent
    return rate


def calibrated(hash_alg: str, secret_len: int, out_len: int, iter_time_ms: int, divide: int, floor: int) -> int:
    """QEMU's count: iterations per second scaled to *iter_time_ms*, divided, at least *floor*."""
    iters = int(iterations_per_second(hash_alg, secret_len, out_len)) * iter_time_ms // 1000 // divide
    if iters > UINT32_MAX:
        raise InvalidOption("PBKDF iterations %d larger than %d" % (iters, UINT32_MAX), field="iter-time")
    return max(iters, floor)


def master_key_digest(spec: CipherSpec, master_key: bytes, h: Header) -> bytes:
    return pbkdf2(spec.hash_alg, master_key, h.mk_digest_salt, h.mk_digest_iter, DIGEST_LEN)


def set_master_key(spec: CipherSpec, h: Header, master_key: bytes, iter_time_ms: int,
                   random: Callable[[int], bytes] = os.urandom) -> None:
    """Fill the header's master key digest fields for *master_key*."""
    h.mk_digest_salt = random(SALT_LEN)
    h.mk_digest_iter = calibrated(spec.hash_alg, len(master_key), DIGEST_LEN, iter_time_ms, 8, MIN_MASTER_KEY_ITERS)
    h.mk_digest = master_key_digest(spec, master_key, h)


def make_slot_material(spec: CipherSpec, h: Header, index: int, master_key: bytes, passphrase: bytes,
                       iter_time_ms: int, random: Callable[[int], bytes] = os.urandom) -> bytes:
    """Activate key slot *index* for *passphrase*: its salt and count set in *h*, and the encrypted
    key material returned (to be written at the slot's key material offset)."""
    slot = h.slots[index]
    slot.salt = random(SALT_LEN)
    slot.iterations = calibrated(spec.hash_alg, len(passphrase), spec.key_bytes, iter_time_ms, 1, MIN_SLOT_ITERS)
    slot_key = pbkdf2(spec.hash_alg, passphrase, slot.salt, slot.iterations, spec.key_bytes)
    material = afsplit.split(master_key, slot.stripes, spec.hash_alg, random)
    cipher = SectorCipher(spec.cipher_mode, spec.ivgen_alg, spec.ivgen_hash_alg, slot_key)
    slot.active = SLOT_ACTIVE
    return bytes(cipher.encrypt(0, material))


def unlock(spec: CipherSpec, h: Header, passphrase: bytes, read: Callable[[int, int], bytes],
           path: Optional[str] = None) -> bytes:
    """The master key from the first active slot that *passphrase* opens (in slot order, as QEMU);
    *read(length, offset)* reads the image file."""
    for index in range(NUM_SLOTS):
        candidate = open_slot(spec, h, index, passphrase, read, path)
        if candidate is not None:
            return candidate
    raise InvalidPassword("Invalid password, cannot unlock any keyslot", path=path, field="key-secret")


def open_slot(spec: CipherSpec, h: Header, index: int, passphrase: bytes, read: Callable[[int, int], bytes],
              path: Optional[str] = None) -> Optional[bytes]:
    """The master key from key slot *index* when it is active and *passphrase* opens it, else None
    (QEMU's ``qcrypto_block_luks_load_key``); *read(length, offset)* reads from the LUKS header's start."""
    slot = h.slots[index]
    if not slot.is_active:
        return None
    slot_key = pbkdf2(spec.hash_alg, passphrase, slot.salt, slot.iterations, spec.key_bytes)
    material = read(spec.key_bytes * slot.stripes, slot.key_material_offset * SECTOR)
    cipher = SectorCipher(spec.cipher_mode, spec.ivgen_alg, spec.ivgen_hash_alg, slot_key, path)
    candidate = afsplit.merge(bytes(cipher.decrypt(0, material)), spec.key_bytes, slot.stripes, spec.hash_alg)
    if hmac.compare_digest(master_key_digest(spec, candidate, h), h.mk_digest):
        return candidate
    return None
