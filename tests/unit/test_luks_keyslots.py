"""formats/luks/keyslots.py on an in-memory LUKS file: QEMU's write order (material before the header
that activates it; the header that deactivates a slot before its material is overwritten), nothing
written on a refusal, the parsed request never showing a secret."""
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks import DRIVER, keys, keyslots
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.luks import header as hdr

pytest.importorskip("cryptography")


class Disk:
    """A LUKS file in memory that records its writes."""

    def __init__(self):
        spec = DRIVER.spec({})
        self.spec = spec
        self.h = DRIVER.build_header(spec)
        self.master = bytes(range(spec.key_bytes))
        keys.set_master_key(spec, self.h, self.master, 1)
        self.data = bytearray(self.h.payload_bytes)
        material = keys.make_slot_material(spec, self.h, 0, self.master, b"zero", 1)
        self.pwrite(material, self.h.slots[0].key_material_offset * hdr.SECTOR)
        self.pwrite(self.h.pack_all(), 0)
        self.writes = []

    def pread(self, length, offset):
        return bytes(self.data[offset:offset + length])

    def pwrite(self, data, offset):
        self.data[offset:offset + len(data)] = data
        if hasattr(self, "writes"):
            self.writes.append((offset, len(data)))

    def on_disk(self):
        return hdr.parse_header(bytes(self.data[:hdr.HEADER_SIZE]))

    def amend(self, **kw):
        force = kw.pop("force", False)
        request = keyslots.request_from_options(kw, force=force)
        return keyslots.amend_keyslots(self.spec, self.h, request, self.pread, self.pwrite, self.master)


def test_add_writes_material_then_header():
    disk = Disk()
    assert disk.amend(**{"state": "active", "new-secret": b"one", "iter-time": "1"}) == [1]
    offset = disk.h.slots[1].key_material_offset * hdr.SECTOR
    assert disk.writes == [(offset, disk.spec.key_bytes * hdr.STRIPES), (0, hdr.HEADER_SIZE)]
    assert disk.on_disk().slots[1].is_active and disk.h.slots[1].is_active
    assert keys.open_slot(disk.spec, disk.on_disk(), 1, b"one", disk.pread) == disk.master


def test_erase_writes_header_then_material():
    disk = Disk()
    disk.amend(**{"state": "active", "new-secret": b"one", "iter-time": "1", "keyslot": "3"})
    disk.writes.clear()
    assert disk.amend(**{"state": "inactive", "old-secret": b"zero"}) == [0]
    assert disk.writes[0] == (0, hdr.HEADER_SIZE)
    assert disk.writes[1:] == [(4096, disk.spec.key_bytes * hdr.STRIPES)] * keyslots.ERASE_PASSES
    slot = disk.on_disk().slots[0]
    assert not slot.is_active and slot.iterations == 0 and slot.salt == bytes(hdr.SALT_LEN)


@pytest.mark.parametrize("options, text", [
    ({"state": "inactive", "keyslot": "0"}, "Attempt to erase the only active keyslot 0"),
    ({"state": "active", "new-secret": b"x", "keyslot": "0"}, "Refusing to overwrite active keyslot 0"),
    ({"state": "inactive", "old-secret": b"nope"}, "No keyslots match given (old) password"),
    ({"state": "inactive", "keyslot": "012"}, "Invalid keyslot 10 specified"),
    ({"keyslot": "1"}, "Parameter 'state' is missing"),
])
def test_refusals_write_nothing(options, text):
    disk = Disk()
    before = bytes(disk.data)
    with pytest.raises(keyslots.InvalidOption) as info:
        disk.amend(**options)
    assert text in str(info.value)
    assert bytes(disk.data) == before and disk.writes == []


def test_request_repr_hides_secrets():
    request = keyslots.request_from_options({"state": "active", "new-secret": b"hush-1", "old-secret": "hush-2"})
    assert "hush" not in repr(request) and "hush" not in str(request)


def test_prefixed_options_for_qcow2():
    request = keyslots.request_from_options({"encrypt.state": "active", "encrypt.new-secret": b"n",
                                             "encrypt.keyslot": "0x3", "state": "ignored"}, prefix="encrypt.")
    assert (request.state, request.keyslot, request.new_secret) == ("active", 3, b"n")
    with pytest.raises(keyslots.InvalidOption, match="Parameter 'encrypt.state' is missing"):
        keyslots.request_from_options({}, prefix="encrypt.")
