"""The qcow2 driver: create options, probing, create and open."""
import os
from typing import Any, Dict, List, Optional, Tuple

from ...driver import Driver, Image, MeasureSource, OptionSpec, Policy
from ...errors import InvalidOption
from ...io import AtomicOutput, HostFile
from . import header as hdr
from . import crypto
from . import measure as sizing
from .compress import zstd_module
from .image import Qcow2Image
from .preallocation import preallocate

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
COMPAT_VALUES = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
DEFAULT_CLUSTER_SIZE = 65536


class Qcow2Driver(Driver):
    name = "qcow2"
    image_class = Qcow2Image
    extensions = (".qcow2", ".qcow", ".img")
    names_other_files = True
    capabilities = frozenset({"create", "write", "backing", "compression", "preallocation", "check", "repair",
                              "snapshots", "resize", "shrink", "amend"})
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size"),
        OptionSpec("compat", "enum", "1.1", "Compatibility level (v2 [0.10] or v3 [1.1])",
                   tuple(COMPAT_VALUES), amendable=True, aliases=(("v2", "0.10"), ("v3", "1.1"))),
        OptionSpec("backing_file", "str", None, "File name of a base image", amendable=True),
        OptionSpec("backing_fmt", "str", None, "Image format of the base image", amendable=True),
        OptionSpec("cluster_size", "size", DEFAULT_CLUSTER_SIZE, "qcow2 cluster size"),
        OptionSpec("preallocation", "enum", "off",
                   "Preallocation mode (allowed values: off, metadata, falloc, full)", PREALLOCATION_MODES),
        OptionSpec("lazy_refcounts", "bool", False, "Postpone refcount updates", amendable=True, unshown=False),
        OptionSpec("refcount_bits", "int", 16, "Width of a reference count entry in bits", amendable=True),
        OptionSpec("extended_l2", "bool", False, "Extended L2 tables", unshown=False),
        OptionSpec("compression_type", "enum", "zlib",
                   "Compression method used for image cluster compression", ("zlib", "zstd")),
        OptionSpec("data_file", "str", None, "File name of an external data file"),
        OptionSpec("data_file_raw", "bool", False, "The external data file must stay valid as a raw image"),
        OptionSpec("encryption", "bool", False,
                   "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
        OptionSpec("encrypt.format", "str", None, "Encrypt the image, format choices: 'aes', 'luks'"),
        OptionSpec("encrypt.key-secret", "secret", None, "ID of secret providing qcow AES key or LUKS passphrase"),
        OptionSpec("encrypt.cipher-alg", "str", None, "Name of encryption cipher algorithm"),
        OptionSpec("encrypt.cipher-mode", "str", None, "Name of encryption cipher mode"),
        OptionSpec("encrypt.ivgen-alg", "str", None, "Name of IV generator algorithm"),
        OptionSpec("encrypt.ivgen-hash-alg", "str", None, "Name of IV generator hash algorithm"),
        OptionSpec("encrypt.hash-alg", "str", None, "Name of encryption hash algorithm"),
        OptionSpec("encrypt.iter-time", "int", None, "Time to spend in PBKDF in milliseconds"),
    )
    # qemu-img 7.2's amend options for qcow2 (qcow2_amend_opts: its create options that can change,
    # and the key slots of the LUKS header inside the image as the luks format's amend options with
    # "encrypt."; the secrets come from --object): `vdisk amend -f qcow2 -o help` lists them, and the
    # values reach Qcow2Image.amend as given (amend.py types them)
    amend_options = tuple(spec for spec in create_options
                          if spec.name in ("backing_file", "backing_fmt", "compat", "data_file", "data_file_raw",
                                           "lazy_refcounts", "refcount_bits", "size", "encrypt.iter-time")) + (
        OptionSpec("encrypt.state", "str", None, "Select new state of affected keyslots (active/inactive)",
                   amendable=True),
        OptionSpec("encrypt.keyslot", "int", None, "Select a single keyslot to modify explicitly", amendable=True),
        OptionSpec("encrypt.old-secret", "secret", None, "Select all keyslots that match this password",
                   amendable=True),
        OptionSpec("encrypt.new-secret", "secret", None, "New secret to set in the matching keyslots. "
                   "Empty string to erase", amendable=True),
    )

    def probe(self, header: bytes, filename: str) -> int:
        if len(header) >= 8 and header[:4] == hdr.MAGIC and int.from_bytes(header[4:8], "big") in (2, 3):
            return 100
        return 0

    def references(self, path: str, checked=None) -> List[Tuple[str, str]]:
        """The files the header of *path* names, as (kind, stored name), read without opening them:
        ``vdisk inspect`` lists them even when the image itself is refused (an external data file)."""
        with HostFile(path, lock=False, checked=checked) as host:
            size = host.size()
            first = host.pread(min(max(size, hdr.HEADER_V2_LENGTH), 1 << hdr.MAX_CLUSTER_BITS), 0)
        h = hdr.parse_header(first, path, size)
        out = [("backing file", h.backing_file)] if h.backing_file else []
        return out + ([("data file", h.data_file)] if h.data_file else [])

    # -- measure / block status (ops/measure.py, ops/compare.py) -------------------------
    def measure(self, size: Optional[int], options: Dict[str, Any],
                source: Optional[MeasureSource] = None) -> Dict[str, int]:
        return sizing.measure(size, options, source)

    def persistent_bitmaps(self, image: Image) -> Optional[List[Tuple[str, int]]]:
        return sizing.persistent_bitmaps(image)

    def status_span(self, image: Image) -> Optional[int]:
        # QEMU looks up one L2 table per block-status request
        return image.l2e * image.cs

    # -- create -----------------------------------------------------------------------
    def build_header(self, size: int, options: Dict[str, Any]) -> hdr.Header:
        """Validate create options the way qemu-img does and return the new image's header."""
        opts = {spec.name: spec.default for spec in self.create_options}
        opts.update({k: v for k, v in options.items() if v is not None})
        crypto.check_create_options(opts)
        version = COMPAT_VALUES[str(opts["compat"])]
        cluster_size = int(opts["cluster_size"])
        if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
            raise InvalidOption("Cluster size must be a power of two between 512 and 2048k", field="cluster_size")
        h = hdr.Header(version=version, cluster_bits=cluster_size.bit_length() - 1, size=size)
        refcount_bits = int(opts["refcount_bits"])
        if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
            raise InvalidOption("Refcount width must be a power of two and may not exceed 64 bits",
                                field="refcount_bits")
        if version < 3 and refcount_bits != 16:
            raise InvalidOption("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                                "(use compat=1.1 or greater)", field="refcount_bits")
        h.refcount_order = refcount_bits.bit_length() - 1
        if opts["lazy_refcounts"]:
            if version < 3:
                raise InvalidOption("Lazy refcounts only supported with compatibility level 1.1 and above (use "
                                    "compat=1.1 or greater)", field="lazy_refcounts")
            h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
        if opts["extended_l2"]:
            if version < 3:
                raise InvalidOption("Extended L2 entries are only supported with compatibility level 1.1 and "
                                    "above (use compat=1.1 or greater)", field="extended_l2")
            if cluster_size < 16384:
                raise InvalidOption("Extended L2 entries are only supported with cluster sizes of at least 16384 "
                                    "bytes", field="extended_l2")
            h.incompatible_features |= hdr.INCOMPAT_EXTL2
        if opts["compression_type"] == "zstd":
            if version < 3:
                raise InvalidOption("Non-zlib compression type is only supported with compatibility level 1.1 "
                                    "and above (use compat=1.1 or greater)", field="compression_type")
            zstd_module()   # refuse now (MissingPackage) rather than at the first compressed write
            h.compression_type = hdr.COMPRESSION_ZSTD
            h.incompatible_features |= hdr.INCOMPAT_COMPRESSION
        if version < 3:
            h.header_length = hdr.HEADER_V2_LENGTH
        if opts.get("backing_file"):
            h.backing_file = str(opts["backing_file"])
            h.backing_format = opts.get("backing_fmt") or None
            if opts["preallocation"] != "off" and not opts["extended_l2"]:
                raise InvalidOption("Backing file and preallocation can only be used at the same time if "
                                    "extended_l2 is on", field="preallocation")
        elif opts.get("backing_fmt"):
            raise InvalidOption("Backing format cannot be used without backing file", field="backing_fmt")
        _set_data_file(h, opts)
        cs = cluster_size
        clusters = -(-size // cs)
        h.l1_size = -(-clusters // h.l2_entries)
        if h.l1_size * 8 > hdr.MAX_L1_SIZE or size > (1 << 63) - 1:
            raise InvalidOption("The image size is too large for file format 'qcow2' (try using a larger cluster "
                                "size)", field="size")
        return h

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        """Write a new image beside *path* and rename it into place."""
        size = -(-size // 512) * 512
        h = self.build_header(size, options)
        prealloc = options.get("preallocation") or "off"
        policy = Policy(lock=False)
        out = AtomicOutput(path)
        try:
            if h.data_file:
                # the operator named the data file: made before the image that names it, and allowed
                data_path = data_file_path(path, h.data_file)
                create_data_file(data_path, size, sync)
                policy = Policy(lock=False, allowed_dirs=(os.path.dirname(os.path.realpath(data_path)),))
                if h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW and prealloc == "off":
                    prealloc = "metadata"       # a raw data file needs every cluster mapped (as qemu-img)
            with HostFile(out.tmp_path, writable=True) as host:
                write_empty_image(host, h)
            if crypto.wanted(options):
                crypto.set_up(self, out.tmp_path, options, policy)
                policy = policy.replace(passphrase=self.create_passphrase(options))
            if prealloc != "off":
                image = Qcow2Image(self, out.tmp_path, True, policy)
                try:
                    preallocate(image, 0, size, prealloc)
                finally:
                    image.close()
            out.commit(sync)
        except BaseException:
            out.abort()
            raise


def _set_data_file(h: hdr.Header, opts: Dict[str, Any]) -> None:
    """The external data file options (qcow2.txt incompatible bit 2, autoclear bit 1), checked as
    qemu-img checks them."""
    if opts.get("data_file_raw") and not opts.get("data_file"):
        raise InvalidOption("data-file-raw requires data-file", field="data_file_raw")
    if not opts.get("data_file"):
        return
    if h.version < 3:
        raise InvalidOption("External data files are only supported with compatibility level 1.1 and above (use "
                            "version=v3 or greater)", field="data_file")
    if opts.get("data_file_raw") and h.backing_file:
        raise InvalidOption("Backing file and data-file-raw cannot be used at the same time", field="data_file_raw")
    h.data_file = str(opts["data_file"])
    h.incompatible_features |= hdr.INCOMPAT_DATA_FILE
    if opts.get("data_file_raw"):
        h.autoclear_features |= hdr.AUTOCLEAR_DATA_FILE_RAW


def data_file_path(image_path: str, name: str) -> str:
    """Where the data file named *name* of the image at *image_path* lies: relative names are
    relative to the image's directory, as backing files are (qemu-img 7.2 takes them relative to
    its working directory; the two agree when it runs in the image's directory)."""
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(image_path), name)


def create_data_file(path: str, size: int, sync: bool) -> None:
    """A new, empty (sparse) data file of the disk's size at *path*, replacing one that is there
    (as qemu-img does), written beside it and renamed into place like every new file."""
    out = AtomicOutput(path)
    try:
        with HostFile(out.tmp_path, writable=True, lock=False) as host:
            host.truncate(size)
        out.commit(sync)
    except BaseException:
        out.abort()
        raise


def write_empty_image(host: HostFile, h: hdr.Header) -> None:
    """Lay out header, refcount table, refcount blocks and an empty L1 table (in that order, as QEMU)."""
    cs = h.cluster_size
    epb = cs * 8 // h.refcount_bits
    l1_clusters = -(-h.l1_size * 8 // cs)
    rt_clusters, blocks = 1, 1
    while True:
        total = 1 + rt_clusters + blocks + l1_clusters
        need_blocks = -(-total // epb)
        need_rt = -(-need_blocks * 8 // cs)
        if need_blocks <= blocks and need_rt <= rt_clusters:
            break
        blocks, rt_clusters = max(blocks, need_blocks), max(rt_clusters, need_rt)
    rt_start = 1
    blocks_start = rt_start + rt_clusters
    l1_start = blocks_start + blocks
    total = l1_start + l1_clusters
    h.refcount_table_offset = rt_start * cs
    h.refcount_table_clusters = rt_clusters
    h.l1_table_offset = l1_start * cs if h.l1_size else 0
    cluster0 = hdr.pack_header(h)
    # refcount blocks: every metadata cluster has refcount 1
    for b in range(blocks):
        block = bytearray(cs)
        for c in range(b * epb, min(total, (b + 1) * epb)):
            _set_refcount(block, c - b * epb, h.refcount_bits)
        host.pwrite(bytes(block), (blocks_start + b) * cs)
    table = bytearray(rt_clusters * cs)
    for b in range(blocks):
        table[b * 8:b * 8 + 8] = ((blocks_start + b) * cs).to_bytes(8, "big")
    host.pwrite(bytes(table), rt_start * cs)
    if h.l1_size:
        host.pwrite(bytes(h.l1_size * 8), h.l1_table_offset)
    host.pwrite(cluster0, 0)
    if host.size() < l1_start * cs:
        host.truncate(l1_start * cs)


def _set_refcount(block: bytearray, index: int, bits: int) -> None:
    if bits >= 8:
        n = bits // 8
        block[index * n:(index + 1) * n] = (1).to_bytes(n, "big")
    else:
        per_byte = 8 // bits
        block[index // per_byte] |= 1 << ((index % per_byte) * bits)


DRIVER = Qcow2Driver()
