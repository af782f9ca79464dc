"""Manifest images made from http(s) sources, through the Python API (manifest.load + manifest.run), against
the qemu-img oracle: served qcow2 and raw images converted and verified, compress, the download cache, and
every failure (wrong checksum, 404, connection refused, truncated) leaving nothing behind."""
import hashlib
import os
import shutil
import textwrap

import helpers
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_manifests
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.run import apply_all, plan_all
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.download import DownloadSettings

M = 1 << 20


from http_server import refused_url


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def served_image(tmp_path, server, name, fmt, size="64M", *extra):
    """Make an image with data in it (qemu-img, qemu-io), serve its bytes; returns (its path, URL, bytes)."""
    origin = tmp_path / "origin"
    origin.mkdir(exist_ok=True)
    path = str(origin / name)
    helpers.qemu_img("create", "-q", "-f", fmt, *extra, path, size, check=True)
    helpers.qemu_io(fmt, path, "write -P 7 0 1M", "write -P 9 5M 64k", "write -P 3 %dM 1M" % (int(size[:-1]) - 1))
    with open(path, "rb") as f:
        data = f.read()
    server.files["/" + name] = data
    return path, server.url("/" + name), data


def write_manifest(directory, text, name="manifest.yml"):
    directory.mkdir(exist_ok=True)
    path = str(directory / name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    return path


def load(path):
    loaded = load_manifests([path])
    assert loaded.valid, [str(p) for p in loaded.problems]
    return loaded


def apply_manifest(path, downloads=None):
    return apply_all(load(path), downloads=downloads)


def clean(path):
    result = helpers.qemu_check(str(path))
    assert result["rc"] == 0, result
    return result


# -- success ---------------------------------------------------------------------------------------
def test_images_made_from_served_qcow2_and_raw(tmp_path, server):
    qcow2_path, qcow2_url, qcow2_data = served_image(tmp_path, server, "cloud.qcow2", "qcow2")
    raw_path, raw_url, raw_data = served_image(tmp_path, server, "disk.raw", "raw", "16M")
    work = tmp_path / "work"
    manifest = write_manifest(work, """
        version: 1
        images:
          - {path: vm.qcow2, source: "%s", source_checksum: "%s"}
          - {path: from-raw.qcow2, source: "%s", source_checksum: "%s", source_format: raw}
          - {path: copy.raw, format: raw, source: "%s", source_checksum: "%s"}
        """ % (qcow2_url, sha256(qcow2_data), raw_url, sha256(raw_data), raw_url, sha256(raw_data)))
    report = apply_manifest(manifest)
    assert report.ok, report.failed
    assert [a.kind for _e, a in report.done] == ["convert", "convert", "convert"]
    assert helpers.qemu_compare(qcow2_path, str(work / "vm.qcow2"), "qcow2", "qcow2")
    assert helpers.qemu_compare(raw_path, str(work / "from-raw.qcow2"), "raw", "qcow2")
    assert helpers.qemu_compare(raw_path, str(work / "copy.raw"), "raw", "raw")
    assert helpers.qemu_info(str(work / "copy.raw"))["format"] == "raw"
    clean(work / "vm.qcow2")
    clean(work / "from-raw.qcow2")
    assert sorted(os.listdir(str(work))) == ["copy.raw", "from-raw.qcow2", "manifest.yml", "vm.qcow2"]
    assert len(server.requests) == 3
    # idempotent: nothing downloaded again, nothing to do
    assert not any(p.actions for p in plan_all(load(manifest)))
    report = apply_manifest(manifest)
    assert report.ok
    assert report.done == []
    assert len(server.requests) == 3


def test_compress_size_and_sha512(tmp_path, server):
    origin_path, url, data = served_image(tmp_path, server, "disk.raw", "raw", "16M")
    work = tmp_path / "work"
    manifest = write_manifest(work, """
        version: 1
        images:
          - {path: packed.qcow2, source: "%s", source_checksum: "sha512:%s", compress: true, size: 32M}
        """ % (url, hashlib.sha512(data).hexdigest().upper()))
    loaded = load(manifest)
    assert loaded.entries[0].spec.source_checksum == "sha512:" + hashlib.sha512(data).hexdigest()
    report = apply_all(loaded)
    assert report.ok, report.failed
    assert [a.kind for _e, a in report.done] == ["convert", "grow"]
    packed = str(work / "packed.qcow2")
    assert helpers.qemu_info(packed)["virtual-size"] == 32 * M
    assert helpers.qemu_compare(origin_path, packed, "raw", "qcow2")      # the grown end reads as zeros
    assert clean(packed)["compressed-clusters"] > 0


def test_an_overlay_and_a_copy_of_an_image_made_from_a_url(tmp_path, server):
    origin_path, url, data = served_image(tmp_path, server, "base.qcow2", "qcow2", "32M")
    work = tmp_path / "work"
    manifest = write_manifest(work, """
        version: 1
        images:
          - {path: vm.qcow2, backing_file: base.qcow2, snapshots: [clean]}
          - {path: copy.raw, format: raw, source: base.qcow2}
          - {path: base.qcow2, source: "%s", source_checksum: "%s"}
        """ % (url, sha256(data)))
    plans = plan_all(load(manifest))
    assert server.requests == []                    # planning never downloads
    assert [p.entry.name for p in plans] == ["base.qcow2", "vm.qcow2", "copy.raw"]
    assert [p.after["virtual-size"] for p in plans] == [None, None, None]    # known once downloaded
    report = apply_manifest(manifest)
    assert report.ok, report.failed
    assert helpers.qemu_info(str(work / "vm.qcow2"))["virtual-size"] == 32 * M
    assert helpers.qemu_compare(origin_path, str(work / "vm.qcow2"), "qcow2", "qcow2")
    assert helpers.qemu_compare(origin_path, str(work / "copy.raw"), "qcow2", "raw")
    assert not any(p.actions for p in plan_all(load(manifest)))


# -- failures --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["checksum", "missing", "refused", "truncated"])
def test_failures_leave_nothing_and_name_the_url(tmp_path, server, case):
    _path, url, data = served_image(tmp_path, server, "cloud.qcow2", "qcow2", "8M")
    checksum = sha256(data)
    expected = {"checksum": "checksum mismatch: expected sha256:%s, got %s" % ("0" * 64, checksum),
                "missing": "download failed: HTTP Error 404: Not Found",
                "refused": "download failed: connection refused",
                "truncated": "download truncated after %d of %d bytes" % (len(data) // 2, len(data))}[case]
    if case == "checksum":
        checksum = "sha256:" + "0" * 64
    elif case == "missing":
        url = server.url("/gone.qcow2")
    elif case == "refused":
        url = refused_url()
    else:
        server.truncated.add("/cloud.qcow2")
    work = tmp_path / "work"
    manifest = write_manifest(work, """
        version: 1
        images:
          - {path: images/vm.qcow2, source: "%s", source_checksum: "%s", size: 16M}
          - {path: later.qcow2, size: 1M}
        """ % (url, checksum))
    report = apply_manifest(manifest)
    entry, action, message = report.failed
    assert message == "%s: %s" % (url, expected)
    assert entry.name == "images/vm.qcow2"
    assert action.kind == "convert"
    assert report.done == []
    assert [(e.name, a.kind) for e, a in report.not_done] == [("later.qcow2", "create")]
    assert os.listdir(str(work / "images")) == []
    assert not os.path.exists(str(work / "later.qcow2"))


def test_failure_with_a_cache_leaves_nothing_in_it(tmp_path, server):
    _path, url, data = served_image(tmp_path, server, "cloud.qcow2", "qcow2", "8M")
    work = tmp_path / "work"
    manifest = write_manifest(work, """
        version: 1
        images:
          - {path: vm.qcow2, source: "%s", source_checksum: "sha256:%s"}
        """ % (url, "1" * 64))
    report = apply_manifest(manifest, DownloadSettings(cache_dir=str(tmp_path / "cache")))
    assert "checksum mismatch" in report.failed[2]
    assert os.listdir(str(tmp_path / "cache")) == [] and not os.path.exists(str(work / "vm.qcow2"))


# -- the cache -------------------------------------------------------------------------------------
def test_the_cache_serves_a_second_image_and_replaces_a_corrupted_entry(tmp_path, server):
    origin_path, url, data = served_image(tmp_path, server, "cloud.qcow2", "qcow2", "32M")
    cache = tmp_path / "cache"
    downloads = DownloadSettings(cache_dir=str(cache))
    text = """
        version: 1
        images:
          - {path: %s, source: "%s", source_checksum: "%s", size: 48M}
        """
    first = write_manifest(tmp_path / "one", text % ("a.qcow2", url, sha256(data)))
    second = write_manifest(tmp_path / "two", text % ("b.qcow2", url, sha256(data)))
    assert apply_manifest(first, downloads).ok
    assert server.requests == ["/cloud.qcow2"]
    entry = str(cache / ("sha256-" + hashlib.sha256(data).hexdigest()))
    assert os.listdir(str(cache)) == [os.path.basename(entry)]
    # planning the second image from the cache: its size is known, nothing downloaded
    plans = plan_all(load(second), downloads=downloads)
    assert [a.kind for a in plans[0].actions] == ["convert", "grow"]
    assert plans[0].actions[0].after["virtual-size"] == 32 * M
    report = apply_manifest(second, downloads)
    assert report.ok, report.failed
    assert server.requests == ["/cloud.qcow2"]                 # the cache hit did not ask the server
    assert helpers.qemu_compare(origin_path, str(tmp_path / "two" / "b.qcow2"), "qcow2", "qcow2")
    # a corrupted entry is not used: downloaded again
    with open(entry, "r+b") as f:
        f.seek(len(data) // 2)
        f.write(b"corrupted")
    os.unlink(str(tmp_path / "two" / "b.qcow2"))
    plans = plan_all(load(second), downloads=downloads)
    assert plans[0].actions[0].after["virtual-size"] is None       # the entry does not verify
    report = apply_manifest(second, downloads)
    assert report.ok, report.failed
    assert server.requests == ["/cloud.qcow2", "/cloud.qcow2"]
    assert helpers.qemu_compare(origin_path, str(tmp_path / "two" / "b.qcow2"), "qcow2", "qcow2")
    with open(entry, "rb") as f:
        assert f.read() == data
    clean(tmp_path / "two" / "b.qcow2")


def test_a_cache_outside_the_manifest_directory_is_allowed(tmp_path, server):
    origin_path, url, data = served_image(tmp_path, server, "cloud.qcow2", "qcow2", "8M")
    cache = tmp_path / "elsewhere" / "cache"
    manifest = write_manifest(tmp_path / "work", """
        version: 1
        images:
          - {path: vm.qcow2, source: "%s", source_checksum: "%s"}
        """ % (url, sha256(data)))
    assert apply_manifest(manifest, DownloadSettings(cache_dir=str(cache))).ok
    shutil.rmtree(str(tmp_path / "work"))
    manifest = write_manifest(tmp_path / "work", """
        version: 1
        images:
          - {path: vm.qcow2, source: "%s", source_checksum: "%s"}
        """ % (url, sha256(data)))
    report = apply_manifest(manifest, DownloadSettings(cache_dir=str(cache)))
    assert report.ok, report.failed
    assert server.requests == ["/cloud.qcow2"]
    assert helpers.qemu_compare(origin_path, str(tmp_path / "work" / "vm.qcow2"), "qcow2", "qcow2")


# -- validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,message", [
    ('source: "https://h/x.qcow2"', "source_checksum is required for a URL source (sha256:HEX or sha512:HEX)"),
    ('source: "https://h/x.qcow2", source_checksum: "sha256:abc"',
     "source_checksum: 'sha256:abc': expected sha256:HEX (64 hex digits) or sha512:HEX (128 hex digits)"),
    ('source: "ftp://h/x.qcow2", source_checksum: "sha256:%s"' % ("0" * 64),
     "source: unsupported URL scheme 'ftp': only http and https sources are downloaded"),
    ('source: "file:///srv/x.qcow2", source_checksum: "sha256:%s"' % ("0" * 64),
     "source: unsupported URL scheme 'file': only http and https sources are downloaded"),
    ('source: local.qcow2, source_checksum: "sha256:%s"' % ("0" * 64),
     "source_checksum applies to a URL source"),
])
def test_manifest_validation(tmp_path, fields, message):
    manifest = write_manifest(tmp_path, """
        version: 1
        images:
          - {path: a.qcow2, %s}
        """ % fields)
    loaded = load_manifests([manifest])
    assert [str(p) for p in loaded.problems] == ["%s: line 3: images[0] (a.qcow2): %s" % (manifest, message)]
