"""The LUKS1 anti-forensic splitter: round trips, every stripe matters, the diffusion function."""
import hashlib
import os
import random

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks import afsplit


@pytest.mark.parametrize("hash_alg", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_bytes", [16, 32, 64])
def test_split_merge_round_trip(hash_alg, key_bytes):
    key = os.urandom(key_bytes)
    material = afsplit.split(key, 4000, hash_alg)
    assert len(material) == key_bytes * 4000
    assert afsplit.merge(material, key_bytes, 4000, hash_alg) == key


def test_every_stripe_matters():
    key = os.urandom(32)
    material = bytearray(afsplit.split(key, 50, "sha256"))
    for stripe in (0, 17, 49):
        damaged = bytearray(material)
        damaged[stripe * 32] ^= 1
        assert afsplit.merge(bytes(damaged), 32, 50, "sha256") != key


def test_deterministic_with_given_randomness():
    rng = random.Random(7)
    a = afsplit.split(b"k" * 32, 10, "sha256", lambda n: bytes(rng.getrandbits(8) for dummy in range(n)))
    rng = random.Random(7)
    b = afsplit.split(b"k" * 32, 10, "sha256", lambda n: bytes(rng.getrandbits(8) for dummy in range(n)))
    assert a == b


def test_diffuse_is_the_specs_h1():
    block = bytes(range(40))        # one whole sha256 digest and an 8-byte remainder
    expected = (hashlib.sha256(b"\0\0\0\0" + block[:32]).digest()
                + hashlib.sha256(b"\0\0\0\1" + block[32:]).digest()[:8])
    assert afsplit.diffuse(block, "sha256") == expected


def test_one_stripe_is_the_key():
    assert afsplit.split(b"abcd", 1, "sha1") == b"abcd"
