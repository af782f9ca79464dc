"""Every format refuses guest ranges outside the image with a typed error (never a NameError or
a traceback from deeper down)."""
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import DRIVERS

WRITABLE = sorted(name for name, d in DRIVERS.items() if "create" in d.capabilities)


@pytest.mark.parametrize("fmt", WRITABLE)
def test_reads_and_writes_past_the_end_are_image_errors(tmp_path, fmt):
    driver = DRIVERS[fmt]
    path = str(tmp_path / ("img." + fmt))
    driver.create(path, 1 << 20, driver.parse_options({}))
    img = driver.open(path, writable=True, policy=Policy())
    try:
        size = img.virtual_size
        for call in (lambda: img.read(size - 512, 1024), lambda: img.read(-512, 512),
                     lambda: img.write(size, b"x" * 512)):
            with pytest.raises(ImageError):
                call()
    finally:
        img.close()
