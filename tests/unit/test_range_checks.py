"""Every format refuses guest ranges outside the image with a typed error (never a NameError or
a traceback from deeper down)."""
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import DRIVERS

WRITABLE = sorted(name for name, d in DRIVERS.items() if "create" in d.capabilities)
# what an encrypted format needs to be created and opened: a secret, and few PBKDF2 iterations
ENCRYPTED = {"luks": ({"key-secret": "x", "iter-time": "1"}, b"x")}


@pytest.mark.parametrize("fmt", WRITABLE)
def test_reads_and_writes_past_the_end_are_image_errors(tmp_path, fmt):
    driver = DRIVERS[fmt]
    path = str(tmp_path / ("img." + fmt))
    options, passphrase = ENCRYPTED.get(fmt, ({}, None))
    driver.create(path, 1 << 20, driver.parse_options(options))
    img = driver.open(path, writable=True, policy=Policy(passphrase=passphrase))
    try:
        size = img.virtual_size
        for call in (lambda: img.read(size - 512, 1024), lambda: img.read(-512, 512),
                     lambda: img.write(size, b"x" * 512)):
            with pytest.raises(ImageError):
                call()
    finally:
        img.close()
