"""qcow: QEMU's original copy-on-write format (version 1): two-level tables, backing files,
compressed clusters.

References: QEMU 7.2 block/qcow.c for the layout qemu-img create writes, its options, limits and
messages.  Legacy AES encryption (crypt_method 1) is read only (formats/qcow2/crypto.py, ``LegacyAes``):
images qemu-img made that way are read with their secret so their data can be converted out; creating
them, and writing into them, is refused (the method is insecure).
"""
from typing import Any, Dict

from ...driver import Driver, OptionSpec
from ...errors import ImageError, InvalidOption, UnsupportedFeature
from ...io import AtomicOutput, HostFile
from ..raw import preallocation_option
from . import header as hdr
from .image import QcowImage


class QcowDriver(Driver):
    name = "qcow"
    image_class = QcowImage
    extensions = (".qcow",)
    names_other_files = True
    capabilities = frozenset({"create", "write", "backing", "compression", "preallocation"})
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size"),
        OptionSpec("backing_file", "str", None, "File name of a base image"),
        OptionSpec("backing_fmt", "str", None, "Format of the backing image"),
        OptionSpec("encryption", "bool", False, "Encrypt the image with format 'aes'. (Deprecated in favor of "
                   "encrypt.format=aes)"),
        OptionSpec("encrypt.format", "str", None, "Encrypt the image, format choices: 'aes'"),
        OptionSpec("encrypt.key-secret", "str", None, "ID of the secret that provides the AES encryption key"),
        preallocation_option(),
    )

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if hdr.probe(header) else 0

    def build_header(self, size: int, options: Dict[str, Any]) -> hdr.Header:
        if options.get("encryption") or options.get("encrypt.format") or options.get("encrypt.key-secret"):
            raise UnsupportedFeature("legacy AES-CBC encryption is not supported for new qcow images (encrypt.format=aes): "
                                     "the method is insecure (vdisk only reads such images); use an unencrypted image "
                                     "or LUKS", field="encryption")
        if size == 0:
            raise InvalidOption("Image size is too small, cannot be zero length", field="size")
        backing = options.get("backing_file") or None
        if backing and len(backing.encode("utf-8", "surrogateescape")) > hdr.MAX_BACKING_NAME:
            raise InvalidOption("Backing file name too long", field="backing_file")
        h = hdr.new_header(size, backing)
        if size > hdr.U64 - (1 << (h.cluster_bits + h.l2_bits)) or h.l1_size > hdr.MAX_L1_ENTRIES:
            raise InvalidOption("Image too large (qemu could not open it)", field="size")
        return h

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        size = -(-size // 512) * 512          # qemu-img rounds up silently
        try:
            h = self.build_header(size, options)
        except ImageError as exc:
            exc.path = path
            raise
        out = AtomicOutput(path)
        try:
            with HostFile(out.tmp_path, writable=True) as host:
                head = h.pack()
                if h.backing_file:
                    head += h.backing_file.encode("utf-8", "surrogateescape")
                host.pwrite(head, 0)
                # the empty L1 table, written out in whole sectors as qemu-img does
                l1_bytes = -(-8 * h.l1_size // 512) * 512
                host.write_zeroes_full(h.l1_table_offset, l1_bytes)
            out.commit(sync)
        except BaseException:
            out.abort()
            raise


DRIVER = QcowDriver()
