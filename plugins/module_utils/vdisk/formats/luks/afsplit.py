"""The LUKS1 anti-forensic splitter: a key spread over *stripes* blocks, all of which are needed to
recover it, so wiping any part of a key slot's material destroys the key.

Reference: cryptsetup's "LUKS1 On-Disk Format Specification", section "AF-Splitter" (H1 diffusion:
each digest-sized piece of the block is hashed with its big-endian 32-bit index in front).
Standard library only (hashlib).
"""
import hashlib
import os
from typing import Callable, Optional


def diffuse(block: bytes, hash_alg: str) -> bytes:
    """The spec's diffusion function H over one block."""
    size = hashlib.new(hash_alg).digest_size
    out = []
    for index, start in enumerate(range(0, len(block), size)):
        piece = block[start:start + size]
        digest = hashlib.new(hash_alg, index.to_bytes(4, "big") + piece).digest()
        out.append(digest[:len(piece)])
    return b"".join(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def split(key: bytes, stripes: int, hash_alg: str, random: Optional[Callable[[int], bytes]] = None) -> bytes:
    """*key* spread over *stripes* blocks of its length: random blocks, then the last one chosen so
    that :func:`merge` gives the key back. *random* is for tests (default ``os.urandom``)."""
    random = random or os.urandom
    n = len(key)
    acc = bytes(n)
    parts = []
    for dummy in range(stripes - 1):
        block = random(n)
        parts.append(block)
        acc = diffuse(_xor(acc, block), hash_alg)
    parts.append(_xor(acc, key))
    return b"".join(parts)


def merge(material: bytes, key_bytes: int, stripes: int, hash_alg: str) -> bytes:
    """The key that :func:`split` spread over *material* (``key_bytes * stripes`` bytes)."""
    if len(material) < key_bytes * stripes:
        raise ValueError("key material is shorter than %d stripes of %d bytes" % (stripes, key_bytes))
    acc = bytes(key_bytes)
    for i in range(stripes - 1):
        acc = diffuse(_xor(acc, material[i * key_bytes:(i + 1) * key_bytes]), hash_alg)
    last = stripes - 1
    return _xor(acc, material[last * key_bytes:(last + 1) * key_bytes])
