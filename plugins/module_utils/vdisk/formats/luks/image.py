"""An open LUKS1 image: the header read and checked at open, the master key unlocked with the
policy's passphrase, guest data decrypted and encrypted per 512-byte sector.

References: QEMU 7.2 block/crypto.c for behaviour: the guest disk is the file from the payload
offset on (its size: the file's size rounded up to a sector, less the payload offset); guest
sector *n* (512 bytes) is encrypted with IV sector number *n*; requests are done in whole sectors
(a partial one is read, decrypted, patched and encrypted again); the image reports every range
as data without a host offset; resize moves the end of the file.

Unlocking: with a passphrase in the policy, open unlocks (a wrong one fails the open with QEMU's
message and nothing is written). Without one, open only reads and checks the header, as qemu-img
info opens an image (its ``BDRV_O_NO_IO``): ``info()`` and ``structures()`` work, and the first
read, write, resize or ``extents()`` (qemu-img map needs the key too) fails with QEMU's message
that the key secret is required. Callers that want qemu-img's behaviour for ``info`` open without
the passphrase (qemu-img info never checks it).
"""
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...driver import Extent, Image, Policy
from ...errors import CorruptImage, ImageError, InvalidOption
from ..raw import preallocate
from . import header as hdr
from . import keys, keyslots
from .cipher import SectorCipher
from .header import SECTOR

CHUNK = 8 * 1024 * 1024          # bytes decrypted or encrypted at a time: bounds the memory of large requests
KEY_REQUIRED = "Parameter 'key-secret' is required for cipher"


class LuksImage(Image):
    zero_init = False           # unwritten payload decrypts to noise: zeros must be written
    identity_mapped = False     # QEMU's crypto driver has no block status: all data, no host offset

    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self.encrypted = True
        self._cipher: Optional[SectorCipher] = None
        self._master_key: Optional[bytes] = None        # kept to add key slots (amend); never shown
        self._open_host(policy)
        if policy.passphrase is not None:
            try:
                self.unlock(policy.passphrase)
            except BaseException:
                self.host.close()
                raise

    def __repr__(self) -> str:          # never the key
        return "<LuksImage %r %s>" % (self.path, "unlocked" if self._cipher else "locked")

    def _open(self) -> None:
        self.header = hdr.parse_header(self.host.pread(hdr.HEADER_SIZE, 0), self.path)
        self.spec = hdr.parse_spec(self.header, self.path)
        self.payload = self.header.payload_bytes
        file_size = -(-self.host.size() // SECTOR) * SECTOR
        if file_size < self.payload:
            raise CorruptImage("Could not refresh total sector count: the file (%d bytes) ends before the "
                               "encrypted payload (offset %d)" % (self.host.size(), self.payload), path=self.path,
                               field="payload_offset")
        self.virtual_size = file_size - self.payload

    # -- keys ----------------------------------------------------------------------------
    @property
    def unlocked(self) -> bool:
        return self._cipher is not None

    def unlock(self, passphrase) -> None:
        """Unlock the master key with *passphrase* (bytes or str); :class:`keys.InvalidPassword` when no
        active slot opens with it."""
        self.spec.check_supported(self.path)
        master = keys.unlock(self.spec, self.header, keys.passphrase_bytes(passphrase), self.host.pread, self.path)
        self._master_key = master
        self._cipher = SectorCipher(self.spec.cipher_mode, self.spec.ivgen_alg, self.spec.ivgen_hash_alg, master,
                                    self.path)

    def _key(self) -> SectorCipher:
        if self._cipher is None:
            raise InvalidOption(KEY_REQUIRED, path=self.path, field="key-secret")
        return self._cipher

    # -- data path -------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        cipher = self._key()
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            first = pos // SECTOR
            stop = min(end, first * SECTOR + CHUNK)
            last = -(-stop // SECTOR)
            raw = self.host.pread((last - first) * SECTOR, self.payload + first * SECTOR)
            plain = cipher.decrypt(first, raw)
            parts.append(bytes(plain[pos - first * SECTOR:stop - first * SECTOR]))
            pos = stop
        return b"".join(parts)

    def write(self, offset: int, data) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        cipher = self._key()
        pos, end = offset, offset + len(view)
        while pos < end:
            first = pos // SECTOR
            stop = min(end, first * SECTOR + CHUNK)
            last = -(-stop // SECTOR)
            piece = view[pos - offset:stop - offset]
            if pos % SECTOR or stop % SECTOR:
                # whole sectors only: the partial ones at either end are read and patched
                buf = bytearray((last - first) * SECTOR)
                head, tail = first * SECTOR, (last - 1) * SECTOR
                if pos % SECTOR:
                    buf[:SECTOR] = cipher.decrypt(first, self.host.pread(SECTOR, self.payload + head))
                if stop % SECTOR and (tail != head or not pos % SECTOR):
                    buf[-SECTOR:] = cipher.decrypt(last - 1, self.host.pread(SECTOR, self.payload + tail))
                buf[pos - head:stop - head] = piece
                piece = memoryview(buf)
            self.host.pwrite(cipher.encrypt(first, piece), self.payload + first * SECTOR)
            pos = stop

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        """Everything is data, with no host offset; qemu-img map needs the key for it too."""
        self._key()
        yield from super().extents(offset, length)

    def resize(self, size: int, shrink: bool = False, preallocation: str = "off") -> None:
        """The file ends at payload offset + *size* (not rounded, as qemu-img leaves it)."""
        self._check_writable()
        self._key()
        if size < self.virtual_size and not shrink:
            raise ImageError("Use the --shrink option to perform a shrink operation", path=self.path)
        old = self.host.size()
        new = self.payload + size
        if new > old:
            preallocate(self.host, old, new - old, preallocation)
        else:
            self.host.truncate(new)
        self.virtual_size = -(-new // SECTOR) * SECTOR - self.payload

    # -- key slots -----------------------------------------------------------------------------
    def amend(self, options: Dict[str, Any], force: bool = False) -> None:
        """Add or erase key slots as ``qemu-img amend -o state=...`` does (:mod:`.keyslots`). The image
        must be unlocked, even to erase: qemu-img opens it with its key-secret first."""
        self._check_writable()
        if not self.unlocked:
            raise InvalidOption(KEY_REQUIRED, path=self.path, field="key-secret")
        for name in options:
            if name not in keyslots.OPTION_NAMES:
                raise InvalidOption("Invalid parameter '%s'" % name, path=self.path, field=name)
        request = keyslots.request_from_options(options, force=force, path=self.path)
        keyslots.amend_keyslots(self.spec, self.header, request, self.host.pread, self.host.pwrite,
                                self._master_key, self.path)
        self.host.flush()

    # -- metadata -----------------------------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        """qemu-img info's ``format-specific`` block for luks (no key needed)."""
        return {"format-specific": {"type": "luks", "data": header_info(self.header, self.spec)}}

    def structures(self) -> List[Tuple[str, int, Any]]:
        out: List[Tuple[str, int, Any]] = [("header", 0, self.header)]
        for i, slot in enumerate(self.header.slots):
            out.append(("key slot %d" % i, hdr.slot_offset(i), slot))
        return out

    def close(self) -> None:
        self._cipher = None
        self._master_key = None
        super().close()


def header_info(h: hdr.Header, spec: hdr.CipherSpec, fmt: Optional[str] = None) -> Dict[str, Any]:
    """qemu-img info's LUKS block (QAPI QCryptoBlockInfoLUKS, in its order) from a header, no key
    needed: the luks format's ``data``, and with *fmt* ("luks") the ``encrypt`` block of qcow2."""
    slots: List[Dict[str, Any]] = []
    for slot in h.slots:
        entry: Dict[str, Any] = {"active": slot.is_active}
        if slot.is_active:
            entry["iters"] = slot.iterations
        entry["key-offset"] = slot.key_material_offset * SECTOR
        if slot.is_active:
            entry["stripes"] = slot.stripes
        slots.append(entry)
    data: Dict[str, Any] = {"ivgen-alg": spec.ivgen_alg, "hash-alg": spec.hash_alg, "cipher-alg": spec.cipher_alg,
                            "uuid": hdr.text(h.uuid)}
    if spec.ivgen_alg == "essiv":
        data["ivgen-hash-alg"] = spec.ivgen_hash_alg
    if fmt is not None:
        data["format"] = fmt
    data.update({"cipher-mode": spec.cipher_mode, "slots": slots, "payload-offset": h.payload_bytes,
                 "master-key-iters": h.mk_digest_iter})
    return data
