"""state/download against a local http server: fetching, verifying, the cache, every failure leaving nothing
behind; and URL sources through the Ansible module's data path (manifest.load.load_data + state.batch)."""
import hashlib
import os
import time

import helpers
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import HostIOError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_data
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state import batch, download
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.download import (
    DownloadError, DownloadSettings, cache_entry, cached, fetch, verify_file)
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.image import widen

M = 1 << 20
BODY = bytes(range(256)) * (3 * 4096 + 17)         # a little over 3 MiB: several chunks, not a multiple of one


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data):
    return "sha512:" + hashlib.sha512(data).hexdigest()


from http_server import refused_url


def names(directory):
    return sorted(os.listdir(str(directory)))


# -- fetch -----------------------------------------------------------------------------------------
def test_fetch_without_cache_uses_a_hidden_file_beside_the_image_and_removes_it(tmp_path, server):
    url = server.serve("/disk.raw", BODY)
    calls = []
    settings = DownloadSettings(progress=lambda u, done, total: calls.append((u, done, total)))
    with fetch(url, sha256(BODY), str(tmp_path / "a.qcow2"), settings) as local:
        assert os.path.dirname(local) == str(tmp_path)
        assert os.path.basename(local).startswith(".a.qcow2.download-")
        with open(local, "rb") as f:
            assert f.read() == BODY
    assert names(tmp_path) == []
    # progress: the start, every chunk, and the end with done == total
    assert calls[0] == (url, 0, len(BODY)) and calls[-1] == (url, len(BODY), len(BODY))
    assert len(calls) == 1 + -(-len(BODY) // download.CHUNK)
    assert [done for _u, done, _t in calls] == sorted(done for _u, done, _t in calls)


def test_fetch_sha512(tmp_path, server):
    url = server.serve("/disk.raw", BODY)
    with fetch(url, sha512(BODY), str(tmp_path / "a.raw")) as local:
        assert os.path.getsize(local) == len(BODY)
    assert names(tmp_path) == []


def test_fetch_removes_the_download_when_the_block_is_interrupted(tmp_path, server):
    url = server.serve("/disk.raw", BODY)
    with pytest.raises(KeyboardInterrupt):
        with fetch(url, sha256(BODY), str(tmp_path / "a.raw")):
            raise KeyboardInterrupt
    assert names(tmp_path) == []


def test_an_interrupted_download_leaves_nothing(tmp_path, server):
    url = server.serve("/disk.raw", BODY)

    def interrupt(_url, done, _total):
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with fetch(url, sha256(BODY), str(tmp_path / "a.raw"), DownloadSettings(progress=interrupt)):
            pass
    assert names(tmp_path) == []


@pytest.mark.parametrize("case,expected", [
    ("missing", "download failed: HTTP Error 404: Not Found"),
    ("checksum", "checksum mismatch: expected sha256:%s, got %s" % ("00" * 32, sha256(BODY))),
    ("truncated", "download truncated after %d of %d bytes" % (len(BODY) // 2, len(BODY))),
    ("refused", "download failed: connection refused"),
    ("ftp-redirect", "download failed: HTTP Error 302: redirected to a URL that is not http or https"),
    ("slow", "download failed: timed out"),
])
def test_failures_name_the_url_and_leave_nothing(tmp_path, server, case, expected):
    url = server.serve("/disk.raw", BODY)
    checksum = sha256(BODY)
    if case == "missing":
        url = server.url("/nope.raw")
    elif case == "checksum":
        checksum = "sha256:" + "00" * 32
    elif case == "truncated":
        server.truncated.add("/disk.raw")
    elif case == "refused":
        url = refused_url()
    elif case == "ftp-redirect":
        server.redirects["/moved.raw"] = "ftp://127.0.0.1/disk.raw"
        url = server.url("/moved.raw")
    elif case == "slow":
        server.slow.add("/disk.raw")
    settings = DownloadSettings(timeout=0.3 if case == "slow" else download.DEFAULT_TIMEOUT)
    with pytest.raises(DownloadError) as exc:
        with fetch(url, checksum, str(tmp_path / "a.raw"), settings):
            pytest.fail("the block must not run")
    assert str(exc.value) == "%s: %s" % (url, expected)
    assert "\n" not in str(exc.value)
    assert names(tmp_path) == []


def test_http_redirects_are_followed(tmp_path, server):
    server.serve("/disk.raw", BODY)
    server.redirects["/latest.raw"] = "/disk.raw"
    with fetch(server.url("/latest.raw"), sha256(BODY), str(tmp_path / "a.raw")) as local:
        assert os.path.getsize(local) == len(BODY)


# -- the cache -------------------------------------------------------------------------------------
def test_cache_miss_then_hit(tmp_path, server):
    url = server.serve("/disk.raw", BODY)
    cache = tmp_path / "cache"            # made when missing
    settings = DownloadSettings(cache_dir=str(cache))
    assert cached(sha256(BODY), settings) is None
    with fetch(url, sha256(BODY), str(tmp_path / "a.raw"), settings) as local:
        assert local == cache_entry(str(cache), sha256(BODY)) == str(cache / ("sha256-" + sha256(BODY)[7:]))
    assert names(cache) == ["sha256-" + sha256(BODY)[7:]]          # kept; no temporary file left
    assert names(tmp_path) == ["cache"]
    assert cached(sha256(BODY), settings) == local
    with fetch(url, sha256(BODY), str(tmp_path / "b.raw"), settings) as again:
        assert again == local
    assert server.requests == ["/disk.raw"]


def test_corrupted_cache_entry_is_downloaded_again(tmp_path, server):
    url = server.serve("/disk.raw", BODY)
    settings = DownloadSettings(cache_dir=str(tmp_path))
    entry = cache_entry(str(tmp_path), sha256(BODY))
    with open(entry, "wb") as f:
        f.write(BODY[:-1] + b"?")
    assert cached(sha256(BODY), settings) is None
    with fetch(url, sha256(BODY), str(tmp_path / "a.raw"), settings) as local:
        assert local == entry
    with open(entry, "rb") as f:
        assert f.read() == BODY
    assert server.requests == ["/disk.raw"] and names(tmp_path) == [os.path.basename(entry)]


def test_failed_download_into_the_cache_leaves_nothing(tmp_path, server):
    url = server.serve("/disk.raw", BODY)
    server.truncated.add("/disk.raw")
    with pytest.raises(DownloadError, match="truncated"):
        with fetch(url, sha256(BODY), str(tmp_path / "a.raw"), DownloadSettings(cache_dir=str(tmp_path / "c"))):
            pass
    assert names(tmp_path / "c") == []


def test_cache_entry_that_is_not_a_file_is_refused(tmp_path, server):
    url = server.serve("/disk.raw", BODY)
    os.symlink("/etc/passwd", cache_entry(str(tmp_path), sha256(BODY)))
    settings = DownloadSettings(cache_dir=str(tmp_path))
    assert cached(sha256(BODY), settings) is None
    with pytest.raises(HostIOError, match="not a regular file"):
        with fetch(url, sha256(BODY), str(tmp_path / "a.raw"), settings):
            pass
    assert server.requests == []


def test_verify_file_sees_a_file_written_since(tmp_path):
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(BODY)
    assert verify_file(path, sha256(BODY)) and verify_file(path, sha256(BODY))
    time.sleep(0.01)
    with open(path, "r+b") as f:        # same size, other content
        f.write(b"?")
    assert not verify_file(path, sha256(BODY))
    assert not verify_file(str(tmp_path / "missing"), sha256(BODY))


# -- through the Ansible module's data path: load_data + state.batch --------------------------------
def module_run(tmp_path, images, downloads=None, check_mode=False):
    loaded = load_data(images, {"format": "qcow2"}, str(tmp_path))
    assert loaded.valid, [str(p) for p in loaded.problems]
    policy = widen(None, loaded.allowed_dirs)
    plans = batch.plan_all(loaded.entries, policy, downloads)
    report = None if check_mode else batch.apply_all(loaded.entries, policy, plans, downloads)
    return plans, report


def qcow2_bytes(tmp_path, size="8M", *backing):
    path = str(tmp_path / "served.qcow2")
    helpers.qemu_img("create", "-q", "-f", "qcow2", *backing, path, size, check=True)
    helpers.qemu_io("qcow2", path, "write -P 5 0 512k", "write -P 6 2M 64k")
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def test_module_data_path_plans_without_downloading_then_applies(tmp_path, server):
    data = qcow2_bytes(tmp_path)
    url = server.serve("/img.qcow2", data)
    images = [{"path": "vm.qcow2", "source": url, "source_checksum": sha256(data), "size": "16M"},
              {"path": "overlay.qcow2", "backing_file": "vm.qcow2"}]
    plans, _report = module_run(tmp_path, images, check_mode=True)
    assert server.requests == [] and names(tmp_path) == []
    assert [[a.kind for a in p.actions] for p in plans] == [["convert"], ["create"]]
    assert plans[0].after["virtual-size"] is None and plans[1].after["virtual-size"] is None
    _plans, report = module_run(tmp_path, images)
    assert report.ok, report.failed
    assert [a.kind for _e, a in report.done] == ["convert", "grow", "create"]
    assert server.requests == ["/img.qcow2"] and names(tmp_path) == ["overlay.qcow2", "vm.qcow2"]
    assert helpers.qemu_info(str(tmp_path / "overlay.qcow2"))["virtual-size"] == 16 * M
    plans, _report = module_run(tmp_path, images, check_mode=True)
    assert not any(p.actions for p in plans)


def test_module_data_path_plans_from_the_cache(tmp_path, server):
    data = qcow2_bytes(tmp_path)
    url = server.serve("/img.qcow2", data)
    downloads = DownloadSettings(cache_dir=str(tmp_path / "cache"))
    images = [{"path": "vm.qcow2", "source": url, "source_checksum": sha256(data), "size": "16M"}]
    module_run(tmp_path, images, downloads)
    os.unlink(str(tmp_path / "vm.qcow2"))
    plans, _report = module_run(tmp_path, images, downloads, check_mode=True)
    assert [a.kind for a in plans[0].actions] == ["convert", "grow"]
    assert plans[0].actions[0].after["virtual-size"] == 8 * M and plans[0].after["virtual-size"] == 16 * M
    _plans, report = module_run(tmp_path, images, downloads)
    assert report.ok and server.requests == ["/img.qcow2"]


def test_a_download_larger_than_the_size_asked_for_is_refused_before_converting(tmp_path, server):
    data = qcow2_bytes(tmp_path, "32M")
    url = server.serve("/img.qcow2", data)
    _plans, report = module_run(tmp_path, [{"path": "vm.qcow2", "source": url, "source_checksum": sha256(data),
                                            "size": "16M"}])
    entry, action, message = report.failed
    assert action is None and message.startswith("allow_shrink: the image is 32 MiB, larger than the requested 16 MiB")
    assert [a.kind for _e, a in report.not_done] == ["convert"] and report.done == []
    assert names(tmp_path) == []


def test_a_download_that_names_a_backing_file_is_refused(tmp_path, server):
    helpers.qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "8M", check=True)
    data = qcow2_bytes(tmp_path, "8M", "-b", "base.qcow2", "-F", "qcow2")
    url = server.serve("/overlay.qcow2", data)
    _plans, report = module_run(tmp_path, [{"path": "vm.qcow2", "source": url, "source_checksum": sha256(data)}])
    assert report.failed[2] == ("%s: the downloaded image names backing file base.qcow2: a URL source must be a "
                                "standalone image" % url)
    assert names(tmp_path) == ["base.qcow2"]


def test_module_data_path_failure_names_the_url_and_leaves_nothing(tmp_path, server):
    url = server.url("/gone.qcow2")
    _plans, report = module_run(tmp_path, [{"path": "d/vm.qcow2", "source": url, "source_checksum": sha256(b"")}])
    entry, action, message = report.failed
    assert message == "%s: download failed: HTTP Error 404: Not Found" % url
    assert action.kind == "convert" and entry.name == "d/vm.qcow2"
    assert names(tmp_path / "d") == []


@pytest.mark.parametrize("fields,message", [
    ({"source": "https://h/x.qcow2"},
     "source_checksum is required for a URL source (sha256:HEX or sha512:HEX)"),
    ({"source": "https://h/x.qcow2", "source_checksum": "sha256:abc"},
     "source_checksum: invalid checksum 'sha256:abc': expected sha256:HEX (64 hex digits) or sha512:HEX "
     "(128 hex digits)"),
    ({"source": "ftp://h/x.qcow2", "source_checksum": "sha256:" + "0" * 64},
     "source: unsupported URL scheme 'ftp': only http and https sources are downloaded"),
    ({"source": "local.qcow2", "source_checksum": "sha256:" + "0" * 64},
     "source_checksum applies to a URL source"),
])
def test_module_data_validation(tmp_path, fields, message):
    loaded = load_data([dict({"path": "a.qcow2"}, **fields)], None, str(tmp_path))
    assert [str(p) for p in loaded.problems] == ["images: images[0] (a.qcow2): %s" % message]


def test_interrupted_while_converting_the_download_leaves_nothing(tmp_path, server, monkeypatch):
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops import convert as convert_module

    def interrupted(sources, *args, **kwargs):
        assert os.path.basename(sources[0]).startswith(".vm.qcow2.download-")     # the verified download
        raise KeyboardInterrupt

    data = qcow2_bytes(tmp_path)
    url = server.serve("/img.qcow2", data)
    monkeypatch.setattr(convert_module, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        module_run(tmp_path, [{"path": "vm.qcow2", "source": url, "source_checksum": sha256(data)}])
    assert names(tmp_path) == []
