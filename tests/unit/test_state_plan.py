"""state/spec and state/plan as data: (fields, observed state) -> expected actions or error."""
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError, InvalidOption
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.observe import ObservedImage
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.plan import (
    plan, plan_convert, plan_snapshot, predict, properties)
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import image_spec

M = 1 << 20
QCOW2_OPTS = {"compat": "1.1", "cluster_size": 65536, "lazy_refcounts": False, "refcount_bits": 16,
              "extended_l2": False, "compression_type": "zlib"}


def qcow2(size=64 * M, snapshots=(), backing=None, backing_fmt=None, **opts):
    options = dict(QCOW2_OPTS, **opts)
    return ObservedImage(path="/d/a.qcow2", exists=True, format="qcow2", virtual_size=size, options=options,
                         backing_file=backing, backing_format=backing_fmt,
                         snapshots=[{"name": n, "id": str(i + 1)} for i, n in enumerate(snapshots)])


ABSENT = ObservedImage(path="/d/a.qcow2")
RAW = ObservedImage(path="/d/a.qcow2", exists=True, format="raw", virtual_size=64 * M)


def kinds(fields, observed, **kw):
    spec = image_spec(dict({"path": "a.qcow2"}, **fields), base_dir="/d")
    return [a.kind for a in plan(spec, observed, **kw)]


CASES = [
    # (fields, observed, expected action kinds)
    ({"size": "64M"}, ABSENT, ["create"]),
    ({"size": "64M"}, qcow2(), []),
    ({"size": 64 * M}, qcow2(), []),
    ({"size": "64M", "format": "qcow2", "preallocation": "metadata"}, qcow2(), []),   # creation-time only
    ({}, qcow2(), []),                                                                 # no size: any size
    ({"size": "65M"}, qcow2(), ["grow"]),
    ({"size": "32M", "allow_shrink": True}, qcow2(), ["shrink"]),
    ({"size": "64M", "options": {"cluster_size": "64K", "compat": "v3"}}, qcow2(), []),
    ({"size": "64M", "options": {"lazy_refcounts": True}}, qcow2(), ["amend"]),
    ({"size": "64M", "options": {"compat": "0.10"}}, qcow2(), ["amend"]),
    ({"size": "64M", "options": {"refcount_bits": 64}}, qcow2(), ["amend"]),
    ({"size": "128M", "options": {"lazy_refcounts": "on"}}, qcow2(), ["amend", "grow"]),
    ({"size": "64M", "options": {"cluster_size": "128K"}, "recreate": True}, qcow2(), ["replace"]),
    ({"size": "64M", "format": "raw", "recreate": True}, qcow2(snapshots=["x"]), ["replace"]),
    ({"format": "raw", "recreate": True}, qcow2(), ["replace"]),          # keeps the old size
    ({"size": "64M", "snapshots": ["a", "b"]}, ABSENT, ["create", "snapshot_create", "snapshot_create"]),
    ({"snapshots": ["a", "b"]}, qcow2(snapshots=["b"]), ["snapshot_create"]),
    ({"snapshots": ["a"]}, qcow2(snapshots=["a", "old"]), []),
    ({"snapshots": ["a"], "prune_snapshots": True}, qcow2(snapshots=["a", "old"]), ["snapshot_delete"]),
    ({"prune_snapshots": True}, qcow2(snapshots=["x", "y"]), ["snapshot_delete", "snapshot_delete"]),
    ({"state": "absent"}, qcow2(), ["delete"]),
    ({"state": "absent"}, ABSENT, []),
    ({"state": "absent", "size": "1G"}, ABSENT, []),
    ({"backing_file": "base.qcow2"}, qcow2(backing="base.qcow2", backing_fmt="qcow2"), []),
    ({"backing_file": "base.qcow2", "backing_format": "qcow2"}, qcow2(backing="base.qcow2",
                                                                     backing_fmt="qcow2"), []),
    ({"backing_file": "new.qcow2"}, qcow2(backing="base.qcow2", backing_fmt="qcow2"), ["amend"]),
    ({"backing_file": "base.qcow2", "backing_format": "raw"}, qcow2(backing="base.qcow2",
                                                                   backing_fmt="qcow2"), ["amend"]),
    ({"size": "64M", "format": "raw"}, RAW, []),
    ({"size": "128M", "format": "raw"}, RAW, ["grow"]),
]


@pytest.mark.parametrize("fields,observed,expected", CASES)
def test_plan_cases(fields, observed, expected):
    assert kinds(fields, observed) == expected


def test_create_from_source_then_grow():
    src = ObservedImage(path="/d/src.raw", exists=True, format="raw", virtual_size=10 * M)
    spec = image_spec({"path": "a.qcow2", "source": "src.raw", "size": "20M", "compress": True}, base_dir="/d")
    actions = plan(spec, ABSENT, source=src)
    assert [a.kind for a in actions] == ["convert", "grow"]
    assert actions[0].params["source"] == "/d/src.raw" and actions[0].params["compress"]
    assert predict(properties(ABSENT), actions)["virtual-size"] == 20 * M


def test_source_ignored_once_the_image_exists():
    spec = image_spec({"path": "a.qcow2", "source": "src.raw"}, base_dir="/d")
    assert plan(spec, qcow2(), source=None) == []


def test_missing_source():
    spec = image_spec({"path": "a.qcow2", "source": "nope.raw"}, base_dir="/d")
    with pytest.raises(ImageError) as exc:
        plan(spec, ABSENT, source=ObservedImage(path="/d/nope.raw"))
    assert exc.value.field == "source" and "nope.raw" in str(exc.value)


def test_size_from_backing_file():
    base = ObservedImage(path="/d/base.qcow2", exists=True, format="qcow2", virtual_size=16 * M)
    spec = image_spec({"path": "a.qcow2", "backing_file": "base.qcow2"}, base_dir="/d")
    (action,) = plan(spec, ABSENT, backing=base)
    assert action.after["virtual-size"] == 16 * M
    assert action.after["backing-filename-format"] == "qcow2"
    assert action.params["size"] == 16 * M


def test_missing_size():
    spec = image_spec({"path": "a.qcow2"}, base_dir="/d")
    with pytest.raises(InvalidOption) as exc:
        plan(spec, ABSENT)
    assert exc.value.field == "size" and exc.value.path == "/d/a.qcow2"
    assert "size" in str(exc.value)


def test_shrink_refused_names_allow_shrink():
    spec = image_spec({"path": "a.qcow2", "size": "32M"}, base_dir="/d")
    with pytest.raises(InvalidOption) as exc:
        plan(spec, qcow2())
    assert exc.value.field == "allow_shrink" and "allow_shrink" in str(exc.value)


@pytest.mark.parametrize("fields,field", [
    ({"format": "raw"}, "format"),
    ({"options": {"cluster_size": "128K"}}, "cluster_size"),
    ({"options": {"extended_l2": True}}, "extended_l2"),
    ({"options": {"compression_type": "zstd"}}, "compression_type"),
])
def test_fixed_mismatch_names_recreate(fields, field):
    spec = image_spec(dict({"path": "a.qcow2", "size": "64M"}, **fields), base_dir="/d")
    with pytest.raises(InvalidOption) as exc:
        plan(spec, qcow2())
    assert exc.value.field == field
    assert "recreate" in str(exc.value)
    assert "/d/a.qcow2" in str(exc.value)


def test_diff_properties_and_prediction():
    spec = image_spec({"path": "a.qcow2", "size": "128M", "options": {"lazy_refcounts": True},
                       "snapshots": ["s"]}, base_dir="/d")
    observed = qcow2(snapshots=["old"])
    actions = plan(spec, observed)
    before = properties(observed)
    after = predict(before, actions)
    assert before["virtual-size"] == 64 * M and after["virtual-size"] == 128 * M
    assert before["options"]["lazy_refcounts"] is False and after["options"]["lazy_refcounts"] is True
    assert after["snapshots"] == ["old", "s"]
    for action in actions:
        d = action.to_dict()
        assert set(d) == {"action", "path", "description", "before", "after"}
        assert d["path"] == "/d/a.qcow2" and d["description"]


@pytest.mark.parametrize("fields,field", [
    ({"sizes": "1G"}, "sizes"),
    ({"options": {"no_such_option": 1}}, "no_such_option"),
    ({"options": {"size": "1G"}}, "size"),
    ({"options": {"cluster_size": "huge"}}, "cluster_size"),
    ({"format": "nope"}, "format"),
    ({"state": "gone"}, "state"),
    ({"size": "12Q"}, "size"),
    ({"format": "raw", "snapshots": ["a"]}, "snapshots"),
    ({"format": "raw", "backing_file": "b"}, "backing_file"),
    ({"backing_format": "qcow2"}, "backing_format"),
    ({"compress": True}, "compress"),
    ({"snapshots": "a"}, "snapshots"),
    ({"snapshots": ["a", "a"]}, "snapshots"),
    ({"format": "raw", "preallocation": "metadata"}, "preallocation"),
])
def test_spec_errors_name_the_field(fields, field):
    with pytest.raises(InvalidOption) as exc:
        image_spec(dict({"path": "a.qcow2"}, **fields), base_dir="/d")
    assert exc.value.field == field
    assert field in str(exc.value)


def test_spec_paths_and_defaults():
    spec = image_spec({"path": "g/a.qcow2", "source": "../s.vmdk", "backing_file": "../b.qcow2",
                       "options": {"lazy_refcounts": "on"}},
                      base_dir="/m", defaults={"format": "qcow2", "preallocation": False,
                                               "options": {"cluster_size": "128K"}})
    assert spec.path == "/m/g/a.qcow2"
    assert spec.source == "/s.vmdk"
    assert spec.backing_file == "../b.qcow2"
    assert spec.options == {"cluster_size": 131072, "lazy_refcounts": True}
    assert spec.preallocation == "off"
    with pytest.raises(InvalidOption):
        image_spec({"format": "qcow2"})


# -- image_snapshot ------------------------------------------------------------------------------
@pytest.mark.parametrize("state,names,equal,expected", [
    ("present", [], None, ["snapshot_create"]),
    ("present", ["s"], None, []),
    ("absent", ["s"], None, ["snapshot_delete"]),
    ("absent", [], None, []),
    ("applied", ["s"], False, ["snapshot_apply"]),
    ("applied", ["s"], True, []),
])
def test_plan_snapshot(state, names, equal, expected):
    actions = plan_snapshot(qcow2(snapshots=names), "s", state,
                            None if equal is None else (lambda: equal))
    assert [a.kind for a in actions] == expected


def test_plan_snapshot_errors():
    with pytest.raises(ImageError) as exc:
        plan_snapshot(qcow2(), "nope", "applied")
    assert "nope" in str(exc.value)
    with pytest.raises(ImageError) as exc:
        plan_snapshot(RAW, "s", "present")
    assert "snapshots" in str(exc.value)
    with pytest.raises(ImageError) as exc:
        plan_snapshot(ABSENT, "s", "present")
    assert "a.qcow2" in str(exc.value)


# -- image_convert -------------------------------------------------------------------------------
SRC = ObservedImage(path="/d/src.raw", exists=True, format="raw", virtual_size=64 * M)


@pytest.mark.parametrize("dest,on_exists,fmt,options,equal,expected", [
    (ABSENT, "compare", "qcow2", {}, True, ["convert"]),
    (qcow2(), "compare", "qcow2", {}, True, []),
    (qcow2(), "compare", "qcow2", {}, False, ["convert"]),
    (qcow2(), "compare", "qcow2", {"cluster_size": 131072}, True, ["convert"]),
    (qcow2(), "compare", "qcow2", {"cluster_size": 65536, "compat": "v3"}, True, []),
    (qcow2(size=32 * M), "compare", "qcow2", {}, True, ["convert"]),
    (RAW, "compare", "qcow2", {}, True, ["convert"]),
    (qcow2(), "skip", "raw", {}, False, []),
    (qcow2(), "replace", "qcow2", {}, True, ["convert"]),
    (qcow2(backing="b.qcow2"), "compare", "qcow2", {}, True, ["convert"]),
])
def test_plan_convert(dest, on_exists, fmt, options, equal, expected):
    asked = []

    def same():
        asked.append(1)
        return equal
    actions = plan_convert(SRC, dest, fmt, options, on_exists, same_content=same)
    assert [a.kind for a in actions] == expected
    if not dest.exists or on_exists != "compare" or dest.format != fmt:
        assert not asked        # the content is compared only when everything else matches


def test_plan_convert_missing_source():
    with pytest.raises(ImageError) as exc:
        plan_convert(ObservedImage(path="/d/missing.raw"), ABSENT, "qcow2", {})
    assert "missing.raw" in str(exc.value)


# -- http(s) sources ------------------------------------------------------------------------------
URL = "https://images.example/debian.qcow2"
SHA256 = "sha256:" + "ab" * 32


def url_spec(**fields):
    return image_spec(dict({"path": "a.qcow2", "source": URL, "source_checksum": SHA256}, **fields), base_dir="/d")


def test_url_source_is_kept_apart_from_local_files():
    spec = image_spec({"path": "a.qcow2", "source": URL, "source_checksum": "sha256:" + "AB" * 32,
                       "source_format": "qcow2", "compress": True}, base_dir="/d")
    assert spec.source is None and spec.source_url == URL
    assert spec.source_checksum == SHA256           # normalised: lowercase hex
    assert spec.source_format == "qcow2" and spec.compress
    sha512 = image_spec({"path": "a.qcow2", "source": "http://h:8080/x.raw", "source_checksum": "sha512:" + "0F" * 64})
    assert sha512.source_checksum == "sha512:" + "0f" * 64 and sha512.source_url == "http://h:8080/x.raw"


@pytest.mark.parametrize("fields,field,message", [
    ({"source": URL}, "source_checksum", "source_checksum is required for a URL source"),
    ({"source": URL, "source_checksum": "sha256:" + "ab" * 31}, "source_checksum", "64 hex digits"),
    ({"source": URL, "source_checksum": "sha256:" + "xy" * 32}, "source_checksum", "invalid checksum"),
    ({"source": URL, "source_checksum": "md5:" + "ab" * 16}, "source_checksum", "invalid checksum"),
    ({"source": URL, "source_checksum": "sha512:" + "ab" * 32}, "source_checksum", "128 hex digits"),
    ({"source": URL, "source_checksum": "ab" * 32}, "source_checksum", "invalid checksum"),
    ({"source": "ftp://h/x.qcow2", "source_checksum": SHA256}, "source", "unsupported URL scheme 'ftp'"),
    ({"source": "file:///etc/x.qcow2", "source_checksum": SHA256}, "source", "unsupported URL scheme 'file'"),
    ({"source": "https:///x.qcow2", "source_checksum": SHA256}, "source", "names no host"),
    ({"source": "https://u:secret@h/x.qcow2", "source_checksum": SHA256}, "source", "credentials"),
    ({"source": "https://h:99999/x.qcow2", "source_checksum": SHA256}, "source", "invalid URL"),
    ({"source": "https://h/x y.qcow2", "source_checksum": SHA256}, "source", "percent-encode"),
    ({"source": "local.qcow2", "source_checksum": SHA256}, "source_checksum",
     "source_checksum applies to a URL source"),
    ({"source_checksum": SHA256}, "source_checksum", "source_checksum applies to a URL source"),
])
def test_url_source_errors_name_the_field(fields, field, message):
    with pytest.raises(InvalidOption) as exc:
        image_spec(dict({"path": "a.qcow2"}, **fields), base_dir="/d")
    assert exc.value.field == field and exc.value.path == "/d/a.qcow2"
    assert message in str(exc.value) and field in str(exc.value)


def test_url_source_not_downloaded_has_an_unknown_size():
    spec = url_spec(size="8G", snapshots=["clean"])
    actions = plan(spec, ABSENT)        # planning never downloads: no local copy
    assert [a.kind for a in actions] == ["convert", "snapshot_create"]      # the grow is decided once downloaded
    convert = actions[0]
    assert convert.params["source"] == URL and convert.params["source_url"] == URL
    assert convert.params["source_checksum"] == SHA256 and convert.params["source_file"] is None
    assert convert.after["virtual-size"] is None
    assert URL in convert.description and "download" in convert.description
    after = predict(properties(ABSENT), actions)
    assert after["virtual-size"] is None and after["snapshots"] == ["clean"]


def test_url_source_planned_from_its_local_copy():
    copy = ObservedImage(path="/cache/sha256-ab", exists=True, format="qcow2", virtual_size=2 * M)
    actions = plan(url_spec(size="8M", compress=True), ABSENT, source=copy)
    assert [a.kind for a in actions] == ["convert", "grow"]
    assert actions[0].params["source_file"] == "/cache/sha256-ab" and actions[0].params["source_format"] == "qcow2"
    assert actions[0].params["compress"] and actions[0].after["virtual-size"] == 2 * M
    assert actions[1].after["virtual-size"] == 8 * M
    with pytest.raises(InvalidOption) as exc:       # a download larger than the size asked for: refused
        plan(url_spec(size="1M"), ABSENT, source=copy)
    assert exc.value.field == "allow_shrink"


def test_url_source_ignored_once_the_image_exists():
    assert plan(url_spec(), qcow2()) == []


def test_images_made_from_an_unknown_size_have_an_unknown_size():
    made = ObservedImage(path="/d/base.qcow2", exists=True, format="qcow2", virtual_size=None)     # predicted
    overlay = image_spec({"path": "a.qcow2", "backing_file": "base.qcow2"}, base_dir="/d")
    (create,) = plan(overlay, ABSENT, backing=made)
    assert create.kind == "create"
    assert create.after["virtual-size"] is None
    assert create.params["size"] is None
    assert "not known yet" in create.description
    copy = image_spec({"path": "a.raw", "format": "raw", "source": "base.qcow2", "size": "1G"}, base_dir="/d")
    (convert,) = plan(copy, ABSENT, source=made)
    assert convert.kind == "convert" and convert.after["virtual-size"] is None
    # an existing overlay on it: its size is left alone until the backing file's is known
    assert plan(overlay, qcow2(backing="base.qcow2"), backing=made) == []


# -- overlay drift: an overlay without size keeps its backing file's size --------------------------
def overlay_kinds(observed_size, backing_size, **fields):
    spec = image_spec(dict({"path": "a.qcow2", "backing_file": "base.qcow2"}, **fields), base_dir="/d")
    base = ObservedImage(path="/d/base.qcow2", exists=True, format="qcow2", virtual_size=backing_size)
    return [a.kind for a in plan(spec, qcow2(size=observed_size, backing="base.qcow2"), backing=base)]


@pytest.mark.parametrize("observed_size,backing_size,fields,expected", [
    (64 * M, 64 * M, {}, []),
    (64 * M, 128 * M, {}, ["grow"]),                         # the backing file grew
    (64 * M, 64 * M - 100, {}, []),                          # as images store it: a multiple of 512
    (128 * M, 64 * M, {"allow_shrink": True}, ["shrink"]),   # the overlay was grown outside vdisk
    (64 * M, 128 * M, {"size": "64M"}, []),                  # a size given wins
    (64 * M, 128 * M, {"snapshots": ["s"]}, ["grow", "snapshot_create"]),
])
def test_overlay_keeps_its_backing_file_size(observed_size, backing_size, fields, expected):
    assert overlay_kinds(observed_size, backing_size, **fields) == expected


def test_overlay_larger_than_its_backing_file_is_refused_without_allow_shrink():
    with pytest.raises(InvalidOption) as exc:
        overlay_kinds(128 * M, 64 * M)
    assert exc.value.field == "allow_shrink" and exc.value.path == "/d/a.qcow2"
    assert "larger than its backing file's 64 MiB" in str(exc.value)


def test_overlay_grow_diff():
    spec = image_spec({"path": "a.qcow2", "backing_file": "base.qcow2"}, base_dir="/d")
    base = ObservedImage(path="/d/base.qcow2", exists=True, format="qcow2", virtual_size=96 * M)
    (grow,) = plan(spec, qcow2(backing="base.qcow2"), backing=base)
    assert (grow.before, grow.after, grow.params["size"]) == ({"virtual-size": 64 * M}, {"virtual-size": 96 * M},
                                                              96 * M)
    assert "backing file" in grow.description


def test_overlay_with_a_missing_backing_file_is_left_alone():
    spec = image_spec({"path": "a.qcow2", "backing_file": "base.qcow2"}, base_dir="/d")
    assert plan(spec, qcow2(backing="base.qcow2"), backing=ObservedImage(path="/d/base.qcow2")) == []
    assert plan(spec, qcow2(backing="base.qcow2")) == []        # not observed at all
