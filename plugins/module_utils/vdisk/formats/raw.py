"""raw: the guest disk byte for byte in a host file; holes are zeros.

The host file may also be the block device the user named (``Policy.named_device``): it is read
and written in place and keeps its size, as QEMU's host_device driver keeps it.
"""
from typing import Any, Dict, Iterator, Optional

from ..driver import DATA, ZERO, Driver, Extent, Image, MeasureSource, OptionSpec, Policy
from ..errors import ImageError, InvalidOption, UnsupportedFeature
from ..io import AtomicOutput, HostFile

PREALLOCATION_MODES = ("off", "falloc", "full")


def preallocate(host: HostFile, offset: int, length: int, mode: str) -> None:
    """Extend *host* to ``offset+length`` reserving space as *mode* says (off leaves a hole)."""
    if mode == "falloc":
        host.fallocate(offset, length)
    elif mode == "full":
        host.write_zeroes_full(offset, length)
    elif mode != "off":
        raise InvalidOption("invalid preallocation mode %r" % mode, path=host.path, field="preallocation")
    if host.size() < offset + length:
        host.truncate(offset + length)


def preallocation_option(help_text: str = "Preallocation mode (allowed values: off, falloc, full)") -> OptionSpec:
    """qemu-img's ``preallocation`` of the file under an image: formats that do not preallocate
    themselves accept it as qemu-img 7.2 does (it reaches the protocol layer, which writes the
    file at size 0 before the image is written, so it changes nothing in the file)."""
    return OptionSpec("preallocation", "enum", "off", help_text, PREALLOCATION_MODES)


class RawImage(Image):
    def __init__(self, driver: "RawDriver", path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self._open_host(policy)

    def _open(self) -> None:
        self.virtual_size = self.host.size()

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > self.virtual_size:
            raise ImageError("read beyond the end of the image (offset %d, length %d)" % (offset, length),
                             path=self.path)
        return self.host.pread(length, offset)

    def host_range(self, offset: int, length: int):
        return (self.host, offset) if offset + length <= self.virtual_size else None

    def read_into(self, offset: int, view: memoryview) -> None:
        if offset + len(view) > self.virtual_size:
            raise ImageError("read beyond the end of the image (offset %d, length %d)" % (offset, len(view)),
                             path=self.path)
        self.host.pread_into(view, offset)

    def write(self, offset: int, data: bytes) -> None:
        self._check_writable()
        if offset + len(data) > self.virtual_size:
            raise ImageError("write beyond the end of the image (offset %d, length %d)" % (offset, len(data)),
                             path=self.path)
        self.host.pwrite(data, offset)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_writable()
        if unmap and self.host.punch_hole(offset, length):
            return
        if self.host.zero_device_range(offset, length):     # a block device: zeroed by the kernel
            return
        super().write_zeroes(offset, length, unmap)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self.host.punch_hole(offset, length)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self._extent_end(offset, length)
        if end <= offset:
            return
        for start, n, is_data in self.host.data_extents(offset, end - offset):
            yield Extent(start, n, DATA if is_data else ZERO, start)

    def info(self) -> Dict[str, Any]:
        return {}

    def resize(self, size: int, shrink: bool = False, preallocation: str = "off") -> None:
        self._check_writable()
        old = self.virtual_size
        if size < old and not shrink:
            raise ImageError("Use the --shrink option to perform a shrink operation", path=self.path)
        if self.host.is_block_device:
            if size != old:     # qemu-img: "Image resized." to the device's own size, this otherwise
                raise UnsupportedFeature("Cannot resize device files", path=self.path)
            return
        if size > old:
            preallocate(self.host, old, size - old, preallocation)
        else:
            self.host.truncate(size)
        self.virtual_size = size


class RawDriver(Driver):
    name = "raw"
    image_class = RawImage
    extensions = (".img", ".raw", ".iso")
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size"),
        preallocation_option(),
    )
    capabilities = frozenset({"create", "write", "resize", "shrink", "preallocation"})

    def probe(self, header: bytes, filename: str) -> int:
        return 1  # anything is raw; every other format outranks it

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        mode = options.get("preallocation") or "off"
        out = AtomicOutput(path)
        try:
            with HostFile(out.tmp_path, writable=True) as host:
                preallocate(host, 0, size, mode)
            out.commit(sync)
        except BaseException:
            out.abort()
            raise

    def measure(self, size: Optional[int], options: Dict[str, Any],
                source: Optional[MeasureSource] = None) -> Dict[str, int]:
        """Every guest byte is a file byte, holes or not (qemu-img ignores the options here)."""
        needed = source.virtual_size if source is not None else -(-(size or 0) // 512) * 512
        return {"required": needed, "fully-allocated": needed}


DRIVER = RawDriver()
