"""vhdx: Hyper-V VHDX images, dynamic and fixed.

References: Microsoft's "VHDX Format Specification" v1.00 (MS-VHDX); QEMU 7.2 block/vhdx.c for
qemu-img's options (``subformat``, ``block_size``, ``log_size``, ``block_state_zero``), its
layout (headers, two region tables, log at 1 MiB, BAT, 1 MiB metadata region, data 5 MiB after the
BAT), its default block sizes and its messages.
"""
import struct
import uuid
from typing import Any, Dict, List, Optional, Tuple

from ...driver import Driver, OptionSpec
from ...errors import CorruptImage, InvalidOption
from ...io import AtomicOutput, HostFile
from . import header as hdr
from .image import VhdxImage

MiB = hdr.MiB
GiB = 1024 * MiB
SUBFORMATS = ("dynamic", "fixed")
CREATOR = "vdisk"


def default_block_size(size: int) -> int:
    """QEMU's choice for block_size=0: bigger blocks for bigger disks, to keep the BAT small."""
    if size > 32 * hdr.TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > 1 * GiB:
        return 16 * MiB
    return 8 * MiB


class VhdxDriver(Driver):
    name = "vhdx"
    image_class = VhdxImage
    extensions = (".vhdx",)
    capabilities = frozenset({"create", "write", "check", "repair"})
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size; max of 64TB."),
        OptionSpec("log_size", "size", hdr.DEFAULT_LOG_SIZE, "Log size; min 1MB."),
        OptionSpec("block_size", "size", 0, "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on "
                   "image size."),
        OptionSpec("subformat", "enum", "dynamic", "VHDX format type, can be either 'dynamic' or 'fixed'. "
                   "Default is 'dynamic'.", SUBFORMATS),
        OptionSpec("block_state_zero", "bool", True, "Force use of payload blocks of type 'ZERO'. Non-standard, "
                   "but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic."),
    )

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if header.startswith(hdr.FILE_SIGNATURE) else 0

    def references(self, path: str, checked=None) -> List[Tuple[str, str]]:
        """The paths of a differencing image's parent locator, as (kind, stored path), read without
        opening the image (which refuses a parent): ``vdisk inspect`` lists them; nothing opens them."""
        with HostFile(path, lock=False, checked=checked) as host:
            size = host.size()
            if hdr.FileIdentifier.unpack(host.pread(hdr.FileIdentifier.SIZE, 0)).signature != hdr.FILE_SIGNATURE:
                return []
            dummy, meta = hdr.parse_region_table(host.pread(hdr.REGION_TABLE_SIZE, hdr.REGION1_OFFSET), path)
            items = hdr.parse_metadata_table(host.pread(hdr.METADATA_TABLE_SIZE, meta.file_offset), meta.length, path)
            if hdr.PARENT_LOCATOR_GUID not in items:
                return []
            offset, length = items[hdr.PARENT_LOCATOR_GUID]
            if meta.file_offset + offset + length > size:
                raise CorruptImage("the parent locator lies past the end of the file", path=path,
                                   field="parent locator")
            pairs = hdr.parse_parent_locator(host.pread(length, meta.file_offset + offset), path)
        return [("parent locator", value) for key, value in pairs if key in hdr.LOCATOR_PATH_KEYS and value]

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        layout = plan(size, options, path)
        out = AtomicOutput(path)
        try:
            with HostFile(out.tmp_path, writable=True) as host:
                write_new(host, layout)
            out.commit(sync)
        except BaseException:
            out.abort()
            raise


def plan(size: int, options: Dict[str, Any], path: Optional[str] = None) -> Dict[str, Any]:
    """Sizes and offsets of a new image, with qemu-img 7.2's rounding and messages."""
    size = -(-size // 512) * 512
    if size > hdr.MAX_IMAGE_SIZE:
        raise InvalidOption("Image size too large; max of 64TB", path=path, field="size")
    log_size = options.get("log_size")
    log_size = hdr.DEFAULT_LOG_SIZE if log_size is None else -(-log_size // MiB) * MiB
    if log_size > 0xFFFFFFFF:
        raise InvalidOption("Log size must be smaller than 4 GB", path=path, field="log_size")
    if log_size < MiB:
        raise InvalidOption("Log size must be a multiple of 1 MB", path=path, field="log_size")
    block_size = -(-(options.get("block_size") or 0) // MiB) * MiB
    block_size = min(block_size, hdr.BLOCK_SIZE_MAX) or default_block_size(size)
    if block_size & (block_size - 1):
        raise InvalidOption("Block size must be a power of two", path=path, field="block_size")
    zero = options.get("block_state_zero")
    fixed = (options.get("subformat") or "dynamic") == "fixed"
    ratio = hdr.chunk_ratio(block_size, 512)
    entries = hdr.bat_entries(size, block_size, ratio)
    bat_offset = -(-(hdr.HEADER_SECTION_END + log_size) // MiB) * MiB
    bat_length = -(-(entries * 8) // MiB) * MiB
    meta_offset = -(-(bat_offset + bat_length) // MiB) * MiB
    return {"size": size, "log_size": log_size, "block_size": block_size, "fixed": fixed,
            "zero": True if zero is None else bool(zero), "ratio": ratio, "bat_offset": bat_offset,
            "bat_length": bat_length, "meta_offset": meta_offset, "data_offset": bat_offset + bat_length + 5 * MiB}


def write_new(host: HostFile, p: Dict[str, Any]) -> None:
    """Lay out a new image as qemu-img 7.2 does (random sequence number and GUIDs)."""
    size, bs = p["size"], p["block_size"]
    creator = CREATOR.encode("utf-16-le")
    host.pwrite(hdr.FileIdentifier(creator=creator).pack(), 0)
    h = hdr.Header(sequence_number=int.from_bytes(uuid.uuid4().bytes[:4], "little"),
                   file_write_guid=uuid.uuid4().bytes, data_write_guid=uuid.uuid4().bytes,
                   log_length=p["log_size"], log_offset=hdr.HEADER_SECTION_END)
    host.pwrite(h.pack(), hdr.HEADER1_OFFSET)
    h.sequence_number += 1
    host.pwrite(h.pack(), hdr.HEADER2_OFFSET)
    # region tables: BAT and metadata (QEMU leaves their "required" bits clear)
    table = hdr.pack_region_table([hdr.RegionTableEntry(hdr.BAT_GUID, p["bat_offset"], p["bat_length"]),
                                   hdr.RegionTableEntry(hdr.METADATA_GUID, p["meta_offset"], MiB)])
    # the file's length first: a fixed image holds all its blocks, a dynamic one ends 5 MiB after the BAT
    data_offset = p["data_offset"]
    host.truncate(data_offset + (size if p["fixed"] else 0))
    if p["fixed"] or p["zero"]:
        state = hdr.PAYLOAD_BLOCK_ZERO if p["zero"] else hdr.PAYLOAD_BLOCK_FULLY_PRESENT
        blocks = -(-size // bs)
        bat = bytearray(8 * (hdr.bat_index(blocks - 1, p["ratio"]) + 1) if blocks else 0)
        for b in range(blocks):
            entry = state if p["zero"] else (-(-(data_offset + b * bs) // MiB) * MiB) | state
            struct.pack_into("<Q", bat, 8 * hdr.bat_index(b, p["ratio"]), entry)
        host.pwrite(bytes(bat), p["bat_offset"])
    host.pwrite(table, hdr.REGION1_OFFSET)
    host.pwrite(table, hdr.REGION2_OFFSET)
    host.pwrite(metadata(p), p["meta_offset"])


def metadata(p: Dict[str, Any]) -> bytes:
    """The metadata table and its five items after it (at 64 KiB), as qemu-img 7.2 writes them."""
    virtual = hdr.META_IS_REQUIRED | hdr.META_IS_VIRTUAL_DISK
    items = ((hdr.FILE_PARAMETERS_GUID, hdr.META_IS_REQUIRED,
              hdr.FileParameters(p["block_size"], hdr.PARAMS_LEAVE_BLOCKS_ALLOCATED if p["fixed"] else 0)),
             (hdr.VIRTUAL_DISK_SIZE_GUID, virtual, hdr.VirtualDiskSize(p["size"])),
             (hdr.PAGE83_GUID, virtual, hdr.Page83Data(uuid.uuid4().bytes)),
             (hdr.LOGICAL_SECTOR_GUID, virtual, hdr.LogicalSectorSize(512)),
             (hdr.PHYSICAL_SECTOR_GUID, virtual, hdr.PhysicalSectorSize(512)))
    entries = []
    offset = hdr.METADATA_TABLE_SIZE
    for guid, flags, item in items:
        entries.append(hdr.MetadataTableEntry(guid, offset, item.SIZE, flags))
        offset += item.SIZE
    return hdr.pack_metadata_table(entries) + b"".join(item.pack() for dummy, dummy2, item in items)


DRIVER = VhdxDriver()
