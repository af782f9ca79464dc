"""Every writable format against qemu-img 7.2, the same tests over each entry of the FORMATS table
(``conformance.py``): create, create errors, ``-o help``, probing, qemu-written images read through
vdisk, vdisk-written images judged by qemu-img, check, bad headers, mutations.

Both directions: what vdisk creates equals what qemu-img creates for the same options (byte for
byte, or all but the fields that are random in every image) and refuses what qemu-img refuses with
qemu-img's message; images qemu-img creates and fills read identically through vdisk (info and map
too); images vdisk converts and writes pass ``qemu-img check`` and ``qemu-img compare`` and are
closed cleanly; damaged images are judged as qemu-img judges them; bad headers and random byte
flips give one-line errors (in a split of refused and accepted mutants that is known per seed) and
never change the file. The per-format files hold what is specific to one format.
"""
import json
import os
import re

import pytest

import helpers
import imgfmt_util as u
from conformance import FORMATS, GiB, MiB, check_like_qemu, engine_writes, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.signatures import may_be
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver, probe_file


def cells(attr):
    """pytest parameters ``(fmt, cell)`` for every cell of every format's *attr* list."""
    return [pytest.param(fmt, cell, id="%s-%s" % (fmt.name, cell.id), marks=() if cell.fast else pytest.mark.slow)
            for fmt in FORMATS for cell in getattr(fmt, attr)]


def with_help():
    return [pytest.param(fmt, id=fmt.name) for fmt in FORMATS if fmt.help_names]


def with_probe():
    return [pytest.param(fmt, id=fmt.name) for fmt in FORMATS if fmt.probe_cells or fmt.create_cells]


def samples():
    return [pytest.param(fmt, name, id="%s-%s" % (fmt.name, name)) for fmt in FORMATS for name in fmt.samples]


def image(tmp_path, fmt, tool, size, opts, stem=None):
    return fmt.create(tool, tmp_path / ("%s.%s" % (stem or tool[0], fmt.ext)), size, opts)


def map_json(path, fmt, tool):
    if tool == "qemu":
        return json.loads(helpers._txt(helpers.qemu_img("map", "--output=json", "-f", fmt.name, path,
                                                        check=True).stdout))
    return json.loads(u.vdisk("map", "--output=json", "-f", fmt.name, path, check=True).stdout)


def assert_one_line_error(proc, message):
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def assert_qemu_clean(fmt, path):
    """qemu-img check finds nothing, and vdisk's check says the same."""
    q = check_like_qemu(fmt, path)
    assert q["rc"] == 0, q
    assert "corruptions" not in q, q
    assert "leaks" not in q, q


def without_names(check):
    return {k: v for k, v in check.items() if k not in ("filename", "stderr")}


def spans(size, block):
    """qemu-img's fill: the start, across an allocation unit (a whole one when it is small), the middle,
    the last sector; within the image."""
    wanted = [(0, 3000), (block - 700, min(block, MiB) + 1400), (size // 2 + 77, 1000), (size - 512, 512)]
    return [(o, min(n, size - o)) for o, n in wanted if 0 <= o < size]


# -- create ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,cell", cells("create_cells"))
def test_create_identical_to_qemu(tmp_path, fmt, cell):
    if "backing_file" in cell.opts:
        helpers.make_raw(tmp_path / cell.opts["backing_file"], 4096)
    a = image(tmp_path, fmt, "qemu", cell.size, cell.opts)
    b = image(tmp_path, fmt, "vdisk", cell.size, cell.opts)
    assert fmt.layout(b) == fmt.layout(a)
    assert os.path.getsize(b) == os.path.getsize(a)
    assert probe_file(b) == fmt.probed_as(cell)
    message = fmt.unopenable(cell)
    if message:
        q = helpers.qemu_img("info", "-f", fmt.name, a)
        assert q.returncode == 1
        assert message in helpers._txt(q.stderr)
        assert_one_line_error(u.vdisk("info", "-f", fmt.name, b), message)
        return
    qa, qb, va, vb = fmt.info(a, "qemu"), fmt.info(b, "qemu"), fmt.info(a, "vdisk"), fmt.info(b, "vdisk")
    if cell.opts.get("preallocation") in ("falloc", "full"):
        for info in (qa, qb, va, vb):       # the same bytes, allocated as the file system pleases
            info.pop("actual-size")
    assert vb == qa
    assert qb == qa
    assert va == qa
    if fmt.checkable:
        # qemu-img check judges vdisk's image as it judges its own (which leaks with 1000-byte parallels clusters)
        assert without_names(check_like_qemu(fmt, b)) == without_names(helpers.qemu_check(a, fmt.name))
    fmt.check_created(b, cell)


@pytest.mark.parametrize("fmt,cell", cells("refused_cells"))
def test_create_refused_like_qemu(tmp_path, fmt, cell):
    if "backing_file" in cell.opts:     # opened at create, as qemu-img opens it: it must exist
        helpers.qemu_img("create", "-q", "-f", cell.opts["backing_fmt"], tmp_path / cell.opts["backing_file"], "1M",
                         check=True)
    o = u.options_text(cell.opts)
    args = ["create", "-f", fmt.name] + (["-o", o] if o else [])
    mine = tmp_path / ("v." + fmt.ext)
    assert_one_line_error(u.vdisk(*args, mine, cell.size), cell.message)
    assert not os.path.exists(mine)
    if cell.qemu:
        q = helpers.qemu_img(*args, tmp_path / ("q." + fmt.ext), cell.size)
        assert q.returncode == 1
        if cell.qemu == "same":
            assert cell.message in helpers._txt(q.stderr)


@pytest.mark.parametrize("fmt", with_help())
def test_options_help_lists_qemu_options(fmt):
    q = helpers._txt(helpers.qemu_img("create", "-f", fmt.name, "-o", "help", "x").stdout)
    theirs = {line.split("=")[0].strip(): line for line in q.splitlines()[1:] if "=" in line}
    ours = u.vdisk("create", "-f", fmt.name, "-o", "help", check=True).stdout.splitlines()[1:]
    names = [line.split("=")[0].strip() for line in ours]
    assert set(names) == fmt.help_names
    assert len(names) == len(set(names))
    for name, line in zip(names, ours):
        if name in fmt.help_own_text:
            line, theirs[name] = line.split(" - ")[0], theirs[name].split(" - ")[0]
        assert " ".join(line.split()) == " ".join(theirs[name].split())


@pytest.mark.parametrize("fmt", with_probe())
def test_probe(tmp_path, fmt):
    path = image(tmp_path, fmt, "qemu", MiB, {})
    assert probe_file(path) == fmt.name
    driver = get_driver(fmt.name)
    with open(path, "rb") as f:
        head = f.read(512)
    assert driver.probe(head, "x") == 100
    assert may_be(fmt.name, head)       # the registry's pre-test (formats/signatures.py) lets it through
    for label, data, score in fmt.probe_cells:
        assert driver.probe(data(head), "x") == score, label
        assert may_be(fmt.name, data(head)) or score == 0, label


# -- qemu writes, vdisk reads --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,cell", cells("written_cells"))
def test_qemu_written_reads_identically(tmp_path, fmt, cell):
    path = image(tmp_path, fmt, "qemu", cell.size, cell.opts)
    size = helpers.qemu_info(path, fmt.name)["virtual-size"]
    assert size == fmt.virtual_size(tmp_path, cell.size, cell.opts)
    raw = helpers.make_raw(tmp_path / "src.raw", size, spans(size, fmt.fill_block(cell.opts)))
    helpers.run("qemu-img", "convert", "-n", "-f", "raw", "-O", fmt.name, raw, path)
    with open(raw, "rb") as f:
        data = f.read()
    assert u.read_all(path, fmt.name) == data
    mine = tmp_path / "mine.raw"
    u.vdisk("convert", "-f", fmt.name, "-O", "raw", path, mine, check=True)
    assert mine.read_bytes() == data
    assert fmt.info(path, "vdisk") == fmt.info(path, "qemu")
    if fmt.map_like_qemu:
        assert map_json(path, fmt, "vdisk") == map_json(path, fmt, "qemu")
    if fmt.checkable:
        check_like_qemu(fmt, path)


@pytest.mark.parametrize("fmt,cell", cells("over_2g_cells"))
def test_qemu_written_over_2g(tmp_path, fmt, cell):
    path = image(tmp_path, fmt, "qemu", 3 * GiB + 512, cell.opts, stem="big")
    size = helpers.qemu_info(path, fmt.name)["virtual-size"]
    helpers.qemu_io(fmt.name, path, "write -P 0x11 0 4k", "write -P 0x22 %d 8k" % (2 * GiB - 4096),
                    "write -P 0x33 %d 512" % (size - 512), "write -z %d 64k" % GiB)
    img = u.open_image(path, fmt.name)
    try:
        assert img.virtual_size == size
        assert img.read(0, 4096) == b"\x11" * 4096
        assert img.read(2 * GiB - 4096, 8192) == b"\x22" * 8192
        assert img.read(size - 512, 512) == b"\x33" * 512
        assert img.read(GiB, 4096) == bytes(4096)
    finally:
        u.close_chain(img)
    u.assert_same_as_qemu(path, fmt.name, tmp_path)
    if fmt.checkable:
        check_like_qemu(fmt, path)


@pytest.mark.parametrize("fmt,name", samples())
def test_samples_read_like_qemu(tmp_path, fmt, name):
    path = u.sample(name, tmp_path)
    u.assert_same_as_qemu(path, fmt.name, tmp_path)
    assert fmt.info(path, "vdisk") == fmt.info(path, "qemu")
    if fmt.checkable:
        check_like_qemu(fmt, path)


# -- vdisk writes, qemu reads --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,cell", cells("convert_cells"))
def test_vdisk_convert_passes_qemu(tmp_path, fmt, cell):
    size = cell.size
    at = min(fmt.convert_block(cell.opts) - 100, size // 2)
    raw = helpers.make_raw(tmp_path / "src.raw", size, [(0, min(size, 70000)), (at, min(300000, size // 3)),
                                                         (size - 512, 512)])
    out = tmp_path / ("v." + fmt.ext)
    o = u.options_text(cell.opts)
    u.vdisk("convert", "-f", "raw", "-O", fmt.name, *(["-o", o] if o else []), raw, out, check=True)
    assert helpers.qemu_compare(out, raw, fmt.name, "raw")
    info = fmt.info(out, "qemu")
    assert info == fmt.info(out, "vdisk")
    assert info["virtual-size"] == fmt.virtual_size(tmp_path, size, cell.opts)
    if fmt.checkable:
        assert_qemu_clean(fmt, out)
    fmt.closed_cleanly(out)


@pytest.mark.parametrize("fmt,cell", cells("writes_into_cells"))
def test_vdisk_writes_into_qemu_image(tmp_path, fmt, cell):
    size = cell.size
    path = image(tmp_path, fmt, "qemu", size, cell.opts)
    helpers.qemu_io(fmt.name, path, "write -P 0x41 0 8k", "write -P 0x42 %d 4k" % (3 * MiB))
    writes = [(4096, 10000), (MiB + 3, 70001), (2 * MiB - 5, 10), (size - 512, 512)] + cell.more_writes
    u.write_engine(path, fmt.name, engine_writes(writes))
    helpers.qemu_io(fmt.name, path, "read -P 0x41 0 4k", "read -P 0x42 %d 4k" % (3 * MiB))
    if fmt.checkable:
        assert_qemu_clean(fmt, path)
    ref = u.qemu_raw(path, fmt.name, tmp_path)
    for offset, length in writes:
        assert ref[offset:offset + length] == pattern(offset, length), offset
    assert ref == u.read_all(path, fmt.name)
    fmt.closed_cleanly(path)


# -- check ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,cell", cells("damage_cells"))
def test_check_like_qemu(tmp_path, fmt, cell):
    path = fmt.damaged(tmp_path, cell.how)
    q = check_like_qemu(fmt, path)
    if fmt.check_stderr_like_qemu:
        v = u.vdisk("check", "--output=json", "-f", fmt.name, path)
        assert v.stderr.splitlines() == q["stderr"].splitlines()
    human_q = helpers._txt(helpers.qemu_img("check", "-f", fmt.name, path).stdout)
    assert u.vdisk("check", "-f", fmt.name, path).stdout == human_q


@pytest.mark.parametrize("fmt,cell", cells("unsupported_check_cells"))
def test_check_unsupported_like_qemu(tmp_path, fmt, cell):
    path = image(tmp_path, fmt, "qemu", MiB, cell.opts)
    helpers.qemu_io(fmt.name, path, "write -P 1 0 64k")
    q = helpers.qemu_img("check", *cell.args, "-f", fmt.name, path)
    v = u.vdisk("check", *cell.args, "-f", fmt.name, path)
    assert q.returncode == 63
    assert v.returncode == 63
    assert "does not support checks" in v.stderr


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,cell", cells("bad_header_cells"))
def test_bad_header_refused_like_qemu(tmp_path, fmt, cell):
    path = u.sample(cell.sample, tmp_path) if cell.sample else image(tmp_path, fmt, "qemu", fmt.bad_header_size, {})
    fmt.apply_edits(path, cell)
    before = u.sha(path)
    if cell.qemu:
        q = helpers.qemu_img("info", "-f", fmt.name, path)
        assert q.returncode == 1
        if cell.qemu == "same":
            assert cell.message in helpers._txt(q.stderr), helpers._txt(q.stderr)
    if fmt.bad_header_limited:
        proc, took = u.cli_limited("info", "-f", fmt.name, path)
        assert took < 10
        assert "Traceback" not in proc.stderr, proc.stderr
    else:
        proc = u.vdisk("info", "-f", fmt.name, path)
    assert_one_line_error(proc, cell.message)
    assert u.sha(path) == before


@pytest.mark.parametrize("fmt,cell", cells("hostile_write_cells"))
def test_hostile_entry_not_written(tmp_path, fmt, cell):
    """A map entry or data offset pointing into the metadata: a write there is refused and writes nothing."""
    path = image(tmp_path, fmt, "qemu", cell.size, cell.opts)
    if cell.grow:
        os.truncate(path, os.path.getsize(path) + cell.grow)
    fmt.apply_edits(path, cell)
    with open(path, "rb") as f:
        before = f.read()
    img = u.open_image(path, fmt.name, writable=True)
    try:
        with pytest.raises(errors.CorruptImage, match=re.escape(cell.message) if cell.message else None):
            img.write(0, b"\xee" * 512)
    finally:
        u.close_chain(img)
    with open(path, "rb") as f:
        assert f.read() == before


@pytest.mark.parametrize("fmt,cell", cells("mutation_cells"))
def test_mutations(tmp_path, fmt, cell):
    good, regions = fmt.mutation_image(tmp_path, cell)
    out = u.mutation_run(good, fmt.name, regions, cell.seed, fmt.mutation_cases, tmp_path,
                         cli_every=fmt.mutation_cli_every)
    # the seed fixes the flips: a different split means a check was added to or lost from the format's parser
    assert out == cell.expected
