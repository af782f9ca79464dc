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
            "and m.count('.') == %d))" % (PKG, PKG, PKG.count(".") + 2))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=None).stdout
    assert out.strip() == "['qcow2']"
