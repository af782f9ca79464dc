"""Bounds on operator input in the engine: numbers, file names, snapshot names, manifests (issue 14, 6/8/9).

The CLI-level cases are in tests/interop/test_safety_inputs.py; these pin the engine's answer:
an :class:`ImageError` (``InvalidOption`` with its field where there is one) in one short line,
never a ``ValueError`` from ``int()`` or ``os.path``, and nothing made on the way.
"""
import os
import struct
import time
import tracemalloc

import pytest

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import OptionSpec
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError, InvalidOption
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import snapshots as qsnap
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2.snapshot_table import (
    parse_snapshot_table)
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest import load
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.marked_yaml import load_marked
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_manifests
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.batch import resolve_owner
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.create import create
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.measure import parse_measure_options
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import apply_image, plan_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.plan import plan_snapshot
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import observe
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import image_spec
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.units import parse_relative_size, parse_size

M = 1 << 20
HUGE = "9" * 5000


def short(value):
    """A test id for a long value (pytest's own would convert a 5000-digit int to text)."""
    if isinstance(value, int):
        return "int-%dbits" % value.bit_length()
    if isinstance(value, str) and len(value) > 12:
        return "%s..%d" % (value[:6].strip(), len(value))
    return None


def one_short_line(exc, *words):
    text = str(exc)
    assert "\n" not in text and len(text) < 400, text[:500]
    for word in words:
        assert word in text, (word, text)
    return text


# -- numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [HUGE, HUGE + "M", "0x" + "f" * 5000, HUGE + ".5G", " " + HUGE + " ", 10 ** 5000,
                                  "1" + "0" * 40], ids=short)
def test_parse_size_too_large(text):
    with pytest.raises(InvalidOption) as info:
        parse_size(text, "size")
    assert info.value.field == "size"
    one_short_line(info.value, "size", "too large", "must be between 0 and 9223372036854775807")


def test_parse_relative_size_too_large():
    for text in ("+" + HUGE, "-" + HUGE):
        with pytest.raises(InvalidOption):
            parse_relative_size(text)


@pytest.mark.parametrize("text,value", [("0" * 5000 + "1M", M), ("1." + "0" * 5000 + "1G", 1 << 30),
                                        ("0." + "5" * 5000 + "K", 568), ("0x" + "0" * 5000 + "10", 16),
                                        ("9223372036854775807", (1 << 63) - 1)], ids=short)
def test_parse_size_long_but_valid(text, value):
    assert parse_size(text) == value


def test_fraction_digits_past_precision_are_exact():
    # 1/1024 K is one byte; a fraction a hair below it is none (a float would round it up)
    assert parse_size("0.0009765625k") == 1
    assert parse_size("0.0009765624" + "9" * 5000 + "k") == 0
    assert parse_size("0.0009765625" + "0" * 5000 + "1k") == 1


@pytest.mark.parametrize("spec,value", [(OptionSpec("refcount_bits", "int"), v) for v in (
    HUGE, "-" + HUGE, "0x" + "f" * 5000, "0b" + "1" * 5000, 10 ** 5000, "1" + "0" * 40)] + [
    (OptionSpec("cluster_size", "size"), v) for v in (HUGE, "0x" + "f" * 5000, 10 ** 5000)],
    ids=lambda v: v.name if isinstance(v, OptionSpec) else short(v))
def test_option_numbers_too_large(spec, value):
    with pytest.raises(InvalidOption) as info:
        spec.parse(value)
    assert info.value.field == spec.name
    one_short_line(info.value, spec.name, "too large")


def test_int_option_still_parses_numbers():
    spec = OptionSpec("refcount_bits", "int")
    assert [spec.parse(v) for v in ("16", "0x10", 16, " 16 ", "0o20")] == [16, 16, 16, 16, 16]
    with pytest.raises(InvalidOption):
        spec.parse("sixteen")


def test_driver_options_too_large():
    driver = get_driver("qcow2")
    for name in ("cluster_size", "refcount_bits", "size"):
        with pytest.raises(InvalidOption) as info:
            driver.parse_options({name: HUGE})
        assert info.value.field == name


def test_measure_options_too_large():
    for name in ("cluster_size", "refcount_bits"):
        with pytest.raises(InvalidOption) as info:
            parse_measure_options(get_driver("qcow2"), {name: HUGE})
        one_short_line(info.value, name)


@pytest.fixture(params=["libyaml", "python"])
def yaml_loader(request, monkeypatch):
    """Manifests read with libyaml's loader, or with PyYAML's pure-Python one."""
    yaml = pytest.importorskip("yaml")
    if request.param == "python":
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    elif not hasattr(yaml, "CSafeLoader"):
        pytest.skip("this PyYAML is built without libyaml")
    return request.param


@pytest.mark.parametrize("field,text", [
    ("size", "size: %s" % HUGE), ("size", 'size: "%s"' % HUGE), ("size", "size: 0x%s" % ("f" * 5000)),
    ("size", "size: 0%s" % ("7" * 5000)),
    ("cluster_size", "size: 1M, options: {cluster_size: %s}" % HUGE),
    ("refcount_bits", "size: 1M, options: {refcount_bits: %s}" % HUGE)], ids=short)
def test_manifest_numbers_too_large(tmp_path, yaml_loader, field, text):
    path = tmp_path / "m.yml"
    path.write_text("version: 1\nimages:\n  - {path: a.qcow2, %s}\n" % text)
    loaded = load_manifests([str(path)])
    assert len(loaded.problems) == 1
    problem = loaded.problems[0]
    assert (problem.index, problem.image, problem.field) == (0, "a.qcow2", field)
    one_short_line(problem, str(path), "too large")


def test_manifest_short_numbers_stay_numbers(yaml_loader):
    assert load_marked("a: 12\nb: 0x10\nc: '12'\n", 64, 1000) == {"a": 12, "b": 16, "c": "12"}


def test_owner_ids_out_of_range():
    for value in (HUGE, 1 << 40, "a\0b", "9" * 30):
        with pytest.raises(ImageError) as info:
            resolve_owner(value)
        one_short_line(info.value)


# -- file names with a NUL byte -------------------------------------------------------------------
@pytest.mark.parametrize("field", ["path", "backing_file", "source"])
def test_nul_in_a_file_name_field(tmp_path, field):
    fields = {"path": "a.qcow2", "size": "1M", "backing_format": "qcow2", "backing_file": "b.qcow2"}
    if field == "source":
        fields = {"path": "a.qcow2"}
    fields[field] = "x\0y.qcow2"
    with pytest.raises(InvalidOption) as info:
        image_spec(fields, base_dir=str(tmp_path))
    assert info.value.field == field
    one_short_line(info.value, "NUL")
    assert "\0" not in str(info.value)


@pytest.mark.parametrize("field", ["path", "backing_file", "source", "allow_paths", "owner"])
def test_nul_in_a_manifest(tmp_path, field):
    image = {"path": '"a.qcow2"', "size": "1M"}
    image[field] = '"x\\0y"'
    if field == "backing_file":
        image["backing_format"] = "qcow2"
    top = ""
    if field == "allow_paths":
        del image["allow_paths"]
        top = 'allow_paths: ["x\\0y"]\n'
    text = "version: 1\n%simages:\n  - {%s}\n" % (top, ", ".join("%s: %s" % kv for kv in image.items()))
    path = tmp_path / "m.yml"
    path.write_text(text)
    loaded = load_manifests([str(path)])
    assert len(loaded.problems) == 1, [str(p) for p in loaded.problems]
    assert field in str(loaded.problems[0])
    one_short_line(loaded.problems[0], str(path))
    assert os.listdir(str(tmp_path)) == ["m.yml"]


# -- snapshot names -------------------------------------------------------------------------------
def test_snapshot_name_kept_to_255_bytes_as_qemu_img(tmp_path):
    path = str(tmp_path / "a.qcow2")
    create(path, "qcow2", M, {})
    image = open_image(path, "qcow2", writable=True)
    try:
        image.create_snapshot("a" * 70000)
        image.create_snapshot("\u00e9" * 200)       # cut inside a character, as qemu-img cuts it
    finally:
        close_chain(image)
    with open(path, "rb") as f:
        data = f.read()
    assert b"a" * 255 in data and b"a" * 256 not in data
    assert ("\u00e9" * 127).encode() + b"\xc3" in data
    names = [s["name"] for s in helpers.qemu_info(path)["snapshots"]]
    assert names == ["a" * 255, "\u00e9" * 127 + "\ufffd"]
    assert helpers.qemu_check(path)["rc"] == 0


def test_snapshot_table_keeps_names_it_cannot_decode(tmp_path):
    # an image's name of 65535 bytes that are not UTF-8 is written back as it was, not re-encoded
    # (U+FFFD is three bytes: re-encoding would not fit the 16-bit length)
    raw_name = b"\xff" * 65535
    entry = struct.pack(">QIHHIIQII", 0, 0, 1, len(raw_name), 0, 0, 0, 0, 24) + bytes(24) + b"1" + raw_name
    entry += bytes(-len(entry) % 8)
    (snap,) = parse_snapshot_table(entry, 1, "x", M)
    assert qsnap.pack_snapshot_table([snap]) == entry


def test_snapshot_id_longer_than_4300_digits(tmp_path):
    # ids are text in the image: a new id follows qemu's strtoul() of the others, never int() of them
    path = str(tmp_path / "a.qcow2")
    helpers.qemu_img("create", "-q", "-f", "qcow2", path, "1M", check=True)
    helpers.qemu_img("snapshot", "-c", "first", path, check=True)
    image = open_image(path, "qcow2", writable=True)
    try:
        snaps = image.snapshots_table()
        snaps[0].id = "9" * 5000
        qsnap.switch_state(image, list(snaps), list(image.l1), image.virtual_size)
    finally:
        close_chain(image)
    theirs = str(tmp_path / "q.qcow2")
    with open(path, "rb") as src, open(theirs, "wb") as dst:
        dst.write(src.read())
    helpers.qemu_img("snapshot", "-c", "next", theirs, check=True)
    image = open_image(path, "qcow2", writable=True)
    try:
        image.create_snapshot("next")
    finally:
        close_chain(image)
    assert [s["id"] for s in helpers.qemu_info(path)["snapshots"]] == \
        [s["id"] for s in helpers.qemu_info(theirs)["snapshots"]]


@pytest.mark.parametrize("name,word", [("s" * 256, "255"), ("\u00e9" * 128, "255"), ("a\0b", "NUL")], ids=short)
def test_snapshot_names_the_state_layer_refuses(tmp_path, name, word):
    with pytest.raises(InvalidOption) as info:
        image_spec({"path": "a.qcow2", "size": "1M", "snapshots": [name]}, base_dir=str(tmp_path))
    assert info.value.field == "snapshots"
    one_short_line(info.value, word)
    path = str(tmp_path / "a.qcow2")
    create(path, "qcow2", M, {})
    with pytest.raises(InvalidOption) as info:
        plan_snapshot(observe(path), name, "present")
    one_short_line(info.value, word)


def test_snapshot_name_of_255_bytes_is_idempotent(tmp_path):
    fields = {"path": "a.qcow2", "size": "1M", "snapshots": ["s" * 255]}
    assert apply_image(image_spec(fields, base_dir=str(tmp_path))).changed
    assert not apply_image(image_spec(fields, base_dir=str(tmp_path))).changed


# -- a missing backing file at create --------------------------------------------------------------
def test_create_refuses_a_missing_backing_file(tmp_path):
    path = str(tmp_path / "v.qcow2")
    with pytest.raises(ImageError) as info:
        create(path, "qcow2", M, {}, "nope.qcow2", "qcow2")
    one_short_line(info.value, "Could not open", "nope.qcow2", "backing")
    assert info.value.field == "backing_file"
    assert os.listdir(str(tmp_path)) == []
    create(path, "qcow2", M, {}, "nope.qcow2", "qcow2", unsafe=True)
    assert helpers.qemu_info(path)["backing-filename"] == "nope.qcow2"


def test_create_resolves_the_backing_file_beside_the_new_image(tmp_path, monkeypatch):
    os.mkdir(str(tmp_path / "sub"))
    create(str(tmp_path / "base.qcow2"), "qcow2", 2 * M, {})
    monkeypatch.chdir(str(tmp_path))
    with pytest.raises(ImageError) as info:
        create("sub/v.qcow2", "qcow2", M, {}, "base.qcow2", "qcow2")
    one_short_line(info.value, "'sub/base.qcow2'")
    assert os.listdir("sub") == []
    create("sub/v.qcow2", "qcow2", None, {}, "../base.qcow2", "qcow2")
    assert helpers.qemu_info(str(tmp_path / "sub" / "v.qcow2"))["virtual-size"] == 2 * M


@pytest.mark.parametrize("check_mode", [True, False])
@pytest.mark.parametrize("size", ["1M", None])
def test_state_layer_refuses_a_missing_backing_file(tmp_path, check_mode, size):
    # what the image module calls
    fields = {"path": "v.qcow2", "backing_file": "nope.qcow2", "backing_format": "qcow2", "size": size}
    spec = image_spec(fields, base_dir=str(tmp_path))
    with pytest.raises(ImageError) as info:
        apply_image(spec, check_mode=check_mode)
    assert info.value.field == "backing_file"
    one_short_line(info.value, "nope.qcow2")
    with pytest.raises(ImageError):
        plan_image(spec)
    assert os.listdir(str(tmp_path)) == []


# -- manifests: size and depth --------------------------------------------------------------------
def test_manifest_limit_is_16_mib():
    assert load.MAX_MANIFEST_BYTES == 16 * M


def test_a_17_mib_manifest_is_refused_fast_and_small(tmp_path):
    path = tmp_path / "big.yml"
    with open(str(path), "w") as f:
        f.write("version: 1\nimages:\n")
        line = "  - {path: a.qcow2, size: 1M}  # padding padding padding padding padding\n"
        f.write(line * (17 * M // len(line) + 1))
    tracemalloc.start()
    start = time.monotonic()
    try:
        loaded = load_manifests([str(path)])
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1, elapsed
    assert peak < 4 * M, peak
    assert len(loaded.problems) == 1
    one_short_line(loaded.problems[0], str(path), "16 MiB")


def test_the_limit_is_inclusive(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "MAX_MANIFEST_BYTES", 1000)
    path = tmp_path / "m.yml"
    text = "version: 1\nimages:\n  - {path: a.qcow2, size: 1M}\n"
    path.write_text(text + "#" * (1000 - len(text) - 1) + "\n")
    assert os.path.getsize(str(path)) == 1000
    assert load_manifests([str(path)]).valid
    path.write_text(text + "#" * (1000 - len(text)) + "\n")
    loaded = load_manifests([str(path)])
    assert len(loaded.problems) == 1
    one_short_line(loaded.problems[0], str(path), "1000 bytes")


def test_dev_zero_manifest_is_bounded():
    tracemalloc.start()
    try:
        loaded = load_manifests(["/dev/zero"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * M, peak
    one_short_line(loaded.problems[0], "/dev/zero", "16 MiB")


@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_manifest_names_the_file(tmp_path, yaml_loader, depth):
    path = tmp_path / "m.yml"
    path.write_text("version: 1\nimages:\n  - {path: a.qcow2, size: 1M, options: {x: %s%s}}\n"
                    % ("[" * depth, "]" * depth))
    loaded = load_manifests([str(path)])
    assert len(loaded.problems) == 1, [str(p) for p in loaded.problems]
    one_short_line(loaded.problems[0], str(path), "deep")


def test_billion_laughs_manifest_is_refused_fast(tmp_path, yaml_loader):
    lines = ["version: 1", 'lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += ["lol%d: &l%d [%s]" % (i, i, ", ".join(["*l%d" % (i - 1)] * 10)) for i in range(1, 10)]
    lines += ["images:", "  - {path: a.qcow2, size: 1M, options: {x: *l9}}"]
    path = tmp_path / "m.yml"
    path.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    loaded = load_manifests([str(path)])
    assert time.monotonic() - start < 10
    assert len(loaded.problems) == 1 and loaded.entries == []
    one_short_line(loaded.problems[0], str(path), "aliases", "refused")


def test_many_aliases_within_bounds_are_fine(tmp_path):
    text = "version: 1\nbase: &base {size: 1M, options: {cluster_size: 64K}}\nimages:\n" + "".join(
        "  - {<<: *base, path: d%d.qcow2}\n" % i for i in range(300))
    text = text.replace("base: &base", "defaults: {format: qcow2}\nx-base: &base")
    path = tmp_path / "m.yml"
    path.write_text(text)
    loaded = load_manifests([str(path)])
    # x-base: an extension key, the place for anchors; every image is read and checked
    assert loaded.problems == []
    assert len(loaded.entries) == 300


@pytest.mark.parametrize("field", ["path", "backing_file", "source", "allow_paths"])
def test_lone_surrogate_in_a_manifest_file_name(tmp_path, field, monkeypatch):
    """A YAML escape such as \\ud800 gives text no file name can hold: a problem, not a traceback."""
    yaml = pytest.importorskip("yaml")
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)     # libyaml refuses the escape by itself
    image = {"path": '"a.qcow2"', "size": "1M"}
    top = ""
    if field == "allow_paths":
        top = 'allow_paths: ["x\\ud800"]\n'
    else:
        image[field] = '"x\\ud800.qcow2"'
    if field == "backing_file":
        image["backing_format"] = "qcow2"
    path = tmp_path / "m.yml"
    path.write_text("version: 1\n%simages:\n  - {%s}\n" % (top, ", ".join("%s: %s" % kv for kv in image.items())))
    loaded = load_manifests([str(path)])
    assert len(loaded.problems) == 1, [str(p) for p in loaded.problems]
    one_short_line(loaded.problems[0], str(path), field, "\\ud800", "no file name can hold")
