"""Adding and erasing LUKS1 key slots: ``qemu-img amend -o state=active|inactive,...``.

References: QEMU 7.2 crypto/block-luks.c (``qcrypto_block_luks_amend_options``, ``_amend_add_keyslot``,
``_amend_erase_keyslots``, ``_find_free_keyslot``, ``_store_key``, ``_erase_key``), qapi/crypto.json
(``QCryptoBlockAmendOptionsLUKS``: state, keyslot, old-secret, new-secret, iter-time) and block/crypto.c
(the amend options of the luks driver; the image is opened, so unlocked with its key-secret, before).
The rules and messages are QEMU's, checked in QEMU's order:

- ``state=active`` needs ``new-secret`` and refuses ``old-secret``; ``keyslot`` (0..7) or else the
  first inactive slot; an active slot is overwritten only with ``--force``. The new slot holds the
  master key the image was unlocked with (QEMU unlocks it again with the image's key-secret).
- ``state=inactive`` refuses ``new-secret`` and ``iter-time``; erases ``keyslot`` (which must hold
  ``old-secret`` when both are given) or every slot ``old-secret`` opens; without ``--force`` it
  refuses an inactive slot and erasing the last active one(s).

Crash ordering, as QEMU: adding writes the key material first, then the header with the slot active
(a crash in between leaves the slot inactive); erasing writes the header with the slot inactive
(salt zeroed, count 0) first, then overwrites the material with random bytes ``ERASE_PASSES``
times (QEMU's ``QCRYPTO_BLOCK_LUKS_ERASE_ITERATIONS``), so no crash leaves an active slot whose
material is gone.

Everything works on a :class:`~.header.Header` and ``pread(length, offset)`` / ``pwrite(data, offset)``
callables whose offsets count from the LUKS header's start, so that a LUKS header inside another
file (qcow2's encryption header) is amended by the same code. No passphrase is ever put in an error,
a repr or a log line.
"""
import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional

from ...errors import ImageError, InvalidOption
from . import keys
from .header import NUM_SLOTS, SALT_LEN, SECTOR, SLOT_INACTIVE, CipherSpec, Header

STATES = ("active", "inactive")
OPTION_NAMES = ("state", "keyslot", "old-secret", "new-secret", "iter-time")
DEFAULT_ITER_TIME = 2000         # ms, QCRYPTO_BLOCK_LUKS_DEFAULT_ITER_TIME_MS
ERASE_PASSES = 40                # QCRYPTO_BLOCK_LUKS_ERASE_ITERATIONS
KEY_REQUIRED = "Parameter 'key-secret' is required for cipher"


class KeyslotRefused(InvalidOption):
    """QEMU refuses the key slot change asked for (nothing was written)."""


@dataclass(repr=False)
class KeyslotRequest:
    """What ``-o state=...,keyslot=...,old-secret=...,new-secret=...,iter-time=...`` asks, the secrets
    resolved to their bytes, and whether ``--force`` was given."""
    state: str
    keyslot: Optional[int] = None
    old_secret: Optional[bytes] = None
    new_secret: Optional[bytes] = None
    iter_time: Optional[int] = None
    force: bool = False

    def __repr__(self) -> str:          # never the secrets
        return "<KeyslotRequest state=%s keyslot=%s old-secret=%s new-secret=%s iter-time=%s force=%s>" % (
            self.state, self.keyslot, "set" if self.old_secret is not None else "unset",
            "set" if self.new_secret is not None else "unset", self.iter_time, self.force)


def request_from_options(options: Mapping[str, Any], prefix: str = "", force: bool = False,
                         path: Optional[str] = None) -> KeyslotRequest:
    """The request in *options* (names ``prefix + OPTION_NAMES``: ``""`` for a luks image, ``"encrypt."``
    for qcow2), other names ignored. Values are typed already (ints, secret bytes) or strings;
    QEMU's messages for a missing or bad ``state``."""
    def get(name: str) -> Any:
        return options.get(prefix + name)
    state = get("state")
    if state is None:
        raise InvalidOption("Parameter '%sstate' is missing" % prefix, path=path, field=prefix + "state")
    if state not in STATES:
        raise InvalidOption("Parameter '%sstate' does not accept value '%s'" % (prefix, state), path=path,
                            field=prefix + "state")
    numbers = {}
    for name in ("keyslot", "iter-time"):
        value = get(name)
        if value is not None and not isinstance(value, int):
            try:
                value = _c_integer(str(value))
            except ValueError:
                raise InvalidOption("Parameter '%s%s' expects a number" % (prefix, name), path=path,
                                    field=prefix + name) from None
        numbers[name] = value
    secrets = {}
    for name in ("old-secret", "new-secret"):
        value = get(name)
        secrets[name] = None if value is None else keys.passphrase_bytes(value)
    return KeyslotRequest(state, numbers["keyslot"], secrets["old-secret"], secrets["new-secret"],
                          numbers["iter-time"], force)


def _c_integer(text: str) -> int:
    """A number as QEMU's option visitor reads it (strtoll with base 0): decimal, 0x hex, 0 octal."""
    body = text.strip()
    sign = -1 if body.startswith("-") else 1
    body = body[1:] if body[:1] in "+-" else body
    base, digits, allowed = 10, body, "0123456789"
    if body[:2].lower() == "0x":
        base, digits, allowed = 16, body[2:], "0123456789abcdefABCDEF"
    elif len(body) > 1 and body.startswith("0"):
        base, digits, allowed = 8, body[1:], "01234567"
    if not digits or any(ch not in allowed for ch in digits):
        raise ValueError("not a number")
    return sign * int(digits, base)


def find_free_keyslot(h: Header) -> int:
    """The first inactive slot, -1 when all are active (``qcrypto_block_luks_find_free_keyslot``)."""
    for index in range(NUM_SLOTS):
        if not h.slots[index].is_active:
            return index
    return -1


def count_active(h: Header) -> int:
    return sum(1 for slot in h.slots[:NUM_SLOTS] if slot.is_active)


def amend_keyslots(spec: CipherSpec, h: Header, request: KeyslotRequest, pread: Callable[[int, int], bytes],
                   pwrite: Callable[[bytes, int], Any], master_key: Optional[bytes] = None,
                   path: Optional[str] = None, random: Callable[[int], bytes] = os.urandom) -> List[int]:
    """Apply *request* to the LUKS header *h* (updated in place once written) and its key material;
    returns the slots changed. *master_key* (the image unlocked) is needed to add a slot.
    Refusals (:class:`KeyslotRefused`, :class:`~...errors.InvalidOption`) write nothing."""
    if request.state == "active":
        return [_add_keyslot(spec, h, request, pwrite, master_key, path, random)]
    if request.state == "inactive":
        return _erase_keyslots(spec, h, request, pread, pwrite, path, random)
    raise InvalidOption("Parameter 'state' does not accept value '%s'" % request.state, path=path, field="state")


def _refuse(message: str, path: Optional[str], field: str = "keyslot") -> KeyslotRefused:
    return KeyslotRefused(message, path=path, field=field)


def _add_keyslot(spec: CipherSpec, h: Header, request: KeyslotRequest, pwrite: Callable[[bytes, int], Any],
                 master_key: Optional[bytes], path: Optional[str], random: Callable[[int], bytes]) -> int:
    if request.new_secret is None:
        raise _refuse("'new-secret' is required to activate a keyslot", path, "new-secret")
    if request.old_secret is not None:
        raise _refuse("'old-secret' must not be given when activating keyslots", path, "old-secret")
    if request.keyslot is not None:
        index = request.keyslot
        if not 0 <= index < NUM_SLOTS:
            # QEMU prints the index with %u here (with %i when erasing)
            raise _refuse("Invalid keyslot %d specified, must be between 0 and %d"
                          % (index & 0xFFFFFFFF, NUM_SLOTS - 1), path)
    else:
        index = find_free_keyslot(h)
        if index == -1:
            raise _refuse("Can't add a keyslot - all keyslots are in use", path)
    if not request.force and h.slots[index].is_active:
        raise _refuse("Refusing to overwrite active keyslot %d - please erase it first" % index, path)
    if master_key is None:
        raise InvalidOption(KEY_REQUIRED, path=path, field="key-secret")
    iter_time = DEFAULT_ITER_TIME if request.iter_time is None else request.iter_time
    if iter_time < 0:
        raise InvalidOption("iter-time must not be negative (got %d)" % iter_time, path=path, field="iter-time")
    work = copy.deepcopy(h)          # the caller's header changes only once the new one is written
    try:
        material = keys.make_slot_material(spec, work, index, master_key, request.new_secret, iter_time, random)
    except ImageError as exc:
        exc.path = path
        raise
    slot = work.slots[index]
    pwrite(material, slot.key_material_offset * SECTOR)      # first the material ...
    pwrite(work.pack_all(), 0)                               # ... then the header that makes it live
    h.slots[index] = slot
    return index


def _erase_keyslots(spec: CipherSpec, h: Header, request: KeyslotRequest, pread: Callable[[int, int], bytes],
                    pwrite: Callable[[bytes, int], Any], path: Optional[str],
                    random: Callable[[int], bytes]) -> List[int]:
    if request.new_secret is not None:
        raise _refuse("'new-secret' must not be given when erasing keyslots", path, "new-secret")
    if request.iter_time is not None:
        raise _refuse("'iter-time' must not be given when erasing keyslots", path, "iter-time")
    old = request.old_secret
    if request.keyslot is not None:
        index = request.keyslot
        if not 0 <= index < NUM_SLOTS:
            raise _refuse("Invalid keyslot %d specified, must be between 0 and %d" % (index, NUM_SLOTS - 1), path)
        if old is not None and keys.open_slot(spec, h, index, old, pread, path) is None:
            raise _refuse("Given keyslot %d doesn't contain the given old password for erase operation" % index,
                          path)
        if not request.force and not h.slots[index].is_active:
            # QEMU's message ends with a space, which one-line errors drop
            raise _refuse("Given keyslot %d is already erased (inactive) " % index, path)
        if not request.force and count_active(h) == 1:
            raise _refuse("Attempt to erase the only active keyslot %d which will erase all the data in the image "
                          "irreversibly - refusing operation" % index, path)
        chosen = [index]
    elif old is not None:
        chosen = [i for i in range(NUM_SLOTS) if keys.open_slot(spec, h, i, old, pread, path) is not None]
        if not chosen:
            raise _refuse("No keyslots match given (old) password for erase operation", path, "old-secret")
        if not request.force and len(chosen) == count_active(h):
            raise _refuse("All the active keyslots match the (old) password that was given and erasing them will "
                          "erase all the data in the image irreversibly - refusing operation", path, "old-secret")
    else:
        raise _refuse("To erase keyslot(s), either explicit keyslot index or the password currently contained in "
                      "them must be given", path)
    for index in chosen:
        _erase_key(spec, h, index, pwrite, random)
    return chosen


def _erase_key(spec: CipherSpec, h: Header, index: int, pwrite: Callable[[bytes, int], Any],
               random: Callable[[int], bytes]) -> None:
    """``qcrypto_block_luks_erase_key``: the header with the slot inactive first, then the material
    overwritten with random bytes."""
    work = copy.deepcopy(h)
    slot = work.slots[index]
    slot.salt = bytes(SALT_LEN)
    slot.iterations = 0
    slot.active = SLOT_INACTIVE
    pwrite(work.pack_all(), 0)
    h.slots[index] = slot
    length = spec.key_bytes * slot.stripes
    for dummy in range(ERASE_PASSES):
        pwrite(random(length), slot.key_material_offset * SECTOR)
