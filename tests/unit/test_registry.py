"""The format registry: names match drivers, and drivers are imported only when used."""
import subprocess
import sys

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import DRIVERS, get_driver

PKG = "ansible_collections.vdisk.images.plugins.module_utils.vdisk"


def test_every_name_maps_to_its_driver():
    assert len(DRIVERS) >= 6
    for name, driver in DRIVERS.items():
        assert driver.name == name
        assert get_driver(name) is driver


def test_naming_a_format_imports_only_that_driver():
    # start-up time of `vdisk check -f qcow2` is part of the check benchmark cell
    code = ("import sys; from %s.registry import get_driver; get_driver('qcow2'); "
            "print(sorted(m.split('.')[-1] for m in sys.modules if m.startswith('%s.formats.') "
            "and m.count('.') == %d and not m.endswith('signatures')))" % (PKG, PKG, PKG.count(".") + 2))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=None).stdout
    assert out.strip() == "['qcow2']"


def test_signatures_are_the_header_modules_constants():
    """formats/signatures.py restates each format's magic at its offset so that probing imports no
    driver; it must say what the header modules say."""
    import struct  # pylint: disable=import-outside-toplevel
    from importlib import import_module  # pylint: disable=import-outside-toplevel
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.signatures import SIGNATURES, TRAILERS

    def hdr(name):
        return import_module("%s.formats.%s.header" % (PKG, name))
    expected = {
        "qcow2": ((0, hdr("qcow2").MAGIC + struct.pack(">I", 2)), (0, hdr("qcow2").MAGIC + struct.pack(">I", 3))),
        "qcow": ((hdr("qcow").Header.offset("magic"), struct.pack(">II", hdr("qcow").MAGIC, hdr("qcow").VERSION)),),
        "qed": ((hdr("qed").Header.offset("magic"), struct.pack("<I", hdr("qed").MAGIC)),),
        "vdi": ((hdr("vdi").Header.offset("signature"), struct.pack("<I", hdr("vdi").SIGNATURE)),),
        "vhdx": ((0, hdr("vhdx").FILE_SIGNATURE),),
        "vpc": ((0, hdr("vpc").COOKIE),),
        "luks": ((0, hdr("luks").MAGIC),),
        "parallels": ((0, hdr("parallels").MAGIC_V1), (0, hdr("parallels").MAGIC_V2)),
        "bochs": ((0, hdr("bochs").MAGIC + b"\x00"),),            # a C string in a 32-byte field
        "cloop": ((0, hdr("cloop").MAGIC_V2.split(b"\n")[0] + b"\n" + hdr("cloop").MAGIC_V2.split(b"\n")[1] + b"\n"),),
        "iso": ((import_module(PKG + ".formats.iso").DESCRIPTOR_OFFSET + 1, import_module(PKG + ".formats.iso").IDENTIFIER),),
        "vmdk": ((hdr("vmdk").SparseHeader.offset("magic_number"), struct.pack("<I", hdr("vmdk").MAGIC)),
                 (hdr("vmdk").SparseHeader.offset("magic_number"), struct.pack("<I", hdr("vmdk").VMDK3_MAGIC))),
    }
    assert SIGNATURES == expected
    assert set(DRIVERS) - set(SIGNATURES) == {"raw", "dmg"}      # raw: always asked; dmg: its trailer
    dmg = hdr("dmg")
    assert TRAILERS == {"dmg": (TRAILERS["dmg"][0], dmg.KOLY_MAGIC)}
    for size in (1024, 5000, 1 << 30):
        assert size - dmg.tail_window(size) == TRAILERS["dmg"][0]


def test_detecting_a_format_imports_only_the_drivers_whose_signature_matches(tmp_path):
    qcow2 = tmp_path / "a.qcow2"
    get_driver("qcow2").create(str(qcow2), 1 << 20, {})
    plain = tmp_path / "a.raw"
    plain.write_bytes(bytes(1 << 16))
    for path, drivers in ((qcow2, "['qcow2', 'raw']"), (plain, "['raw']")):
        code = ("import sys; from %s.registry import probe_file; print(probe_file(%r), end=' '); "
                "print(sorted(m.split('.')[-1] for m in sys.modules if m.startswith('%s.formats.') "
                "and m.count('.') == %d and not m.endswith('signatures')))"
                % (PKG, str(path), PKG, PKG.count(".") + 2))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "%s %s" % (path.suffix[1:], drivers)


def test_a_vmdk3_sparse_file_is_detected_as_vmdk_and_refused(tmp_path):
    # QEMU's VMDK3_MAGIC is "COWD" as stored; vdisk reads no VMDK3 extents, and says so
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import probe_file  # pylint: disable=import-outside-toplevel
    path = tmp_path / "old.vmdk"
    path.write_bytes(b"COWD" + bytes(4092))
    assert probe_file(str(path)) == "vmdk"
    out = subprocess.run([sys.executable, "-m", PKG, "info", str(path)], capture_output=True, text=True)
    assert out.returncode == 1 and "VMDK3 (COWD) sparse extents are not supported" in out.stderr, out.stderr
