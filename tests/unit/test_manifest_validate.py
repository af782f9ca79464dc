"""vdisk validate: every class of manifest problem, all reported at once, with its message."""
import json
import os
import textwrap

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_manifests


def write(directory, text, name="manifest.yml"):
    path = os.path.join(str(directory), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    return path


def problems(directory, text, **kwargs):
    return [str(p) for p in load_manifests([write(directory, text)], **kwargs).problems]


def validate(capsys, *args):
    rc = main(["validate"] + [str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_valid_manifest(tmp_path, capsys):
    path = write(tmp_path, """
        version: 1
        defaults: {format: qcow2, preallocation: off}
        images:
          - path: base.qcow2
            size: 1G
            options: {cluster_size: 64K, lazy_refcounts: true}
            snapshots: [pristine]
          - path: vm.qcow2
            backing_file: base.qcow2
            backing_format: qcow2
        """)
    assert validate(capsys, path) == (0, "%s: valid (2 images)\n" % path, "")
    rc, out, err = validate(capsys, "--output=json", path)
    assert rc == 0 and err == ""
    data = json.loads(out)
    assert {k: data[k] for k in ("format_version", "valid", "manifests", "images", "problems")} == {
        "format_version": 1, "valid": True, "manifests": [path], "images": 2, "problems": []}


def test_yaml_syntax_error_has_its_line(tmp_path):
    m = tmp_path / "manifest.yml"
    found = problems(tmp_path, """
        version: 1
        images:
          - path: a.qcow2
            size: 1G
              format: raw
        """)
    assert len(found) == 1 and found[0].startswith("%s: line 5: invalid YAML: " % m)
    found = problems(tmp_path, """
        version: 1
        images:
          - path: a.qcow2
            size: [1G
        """)
    # PyYAML notices the unclosed list where the file ends, and says where it started
    assert len(found) == 1 and found[0].startswith("%s: line 5: invalid YAML: " % m)
    assert found[0].endswith("(while parsing a flow sequence on line 4)")
    found = problems(tmp_path, """
        version: 1
        images:
          - path: a.qcow2
            size: 1G
            size: 2G
        """)
    assert found == ["%s: line 5: invalid YAML: duplicate key 'size' (first on line 4)" % m]


def test_every_problem_at_once_cli(tmp_path, capsys):
    path = write(tmp_path, """
        version: 1
        images:
          - path: a.qcow2
            size: 8X
          - path: b.qcow2
            size: 1G
            colour: blue
          - path: c.img
            format: floppy
            size: 1M
          - path: d.qcow2
            size: 1M
            options: {cluster_sise: 64K}
          - path: e.raw
            format: raw
            size: 1M
            options: {cluster_size: 64K}
          - size: 1M
        """)
    rc, out, err = validate(capsys, path)
    assert rc == 1 and out == ""
    lines = err.splitlines()
    unknown = "vdisk: validate: %s: line 9: images[2] (c.img): format: Unknown file format 'floppy' (known: " % path
    assert lines[2].startswith(unknown) and "qcow2" in lines[2]
    lines[2] = unknown
    # in manifest order, each with the line of its field (of the image for a missing one)
    assert lines == [
        "vdisk: validate: %s: line 4: images[0] (a.qcow2): size: '8X': expected a size such as 8G, 512M or 1048576 "
        "(suffixes k, M, G, T, P, E)" % path,
        "vdisk: validate: %s: line 7: images[1] (b.qcow2): colour: unknown field 'colour' (known: path, state, "
        "format, size, preallocation, options, backing_file, backing_format, snapshots, prune_snapshots, source, "
        "source_checksum, source_format, compress, allow_shrink, recreate, encryption, owner, group, mode)" % path,
        unknown,
        "vdisk: validate: %s: line 13: images[3] (d.qcow2): cluster_sise: Invalid parameter 'cluster_sise' for "
        "format qcow2 (known: cluster_size, compat, compression_type, data_file, data_file_raw, encrypt.cipher-alg, "
        "encrypt.cipher-mode, encrypt.format, encrypt.hash-alg, encrypt.iter-time, encrypt.ivgen-alg, "
        "encrypt.ivgen-hash-alg, encrypt.key-secret, encryption, extended_l2, lazy_refcounts, refcount_bits)" % path,
        "vdisk: validate: %s: line 17: images[4] (e.raw): cluster_size: Invalid parameter 'cluster_size' for "
        "format raw (known: none)" % path,
        "vdisk: validate: %s: line 18: images[5]: path is required" % path,
    ]
    rc, out, err = validate(capsys, "--output=json", path)
    data = json.loads(out)
    assert rc == 1
    assert not data["valid"]
    assert len(data["problems"]) == 6
    assert data["problems"][0] == {
        "severity": "error", "manifest": path, "line": 4, "index": 0, "image": "a.qcow2", "field": "size",
        "message": "'8X': expected a size such as 8G, 512M or 1048576 (suffixes k, M, G, T, P, E)",
        "text": err.splitlines()[0][len("vdisk: validate: "):]}


def test_top_level_and_defaults(tmp_path):
    assert problems(tmp_path, """
        version: 2
        defaults: {path: x.qcow2, size: -1}
        imgs: []
        """) == [
        "%s: line 1: images is required" % (tmp_path / "manifest.yml"),
        "%s: line 1: version: invalid value 2: expected one of 1" % (tmp_path / "manifest.yml"),
        "%s: line 2: defaults.size: must be at least 0, got -1" % (tmp_path / "manifest.yml"),
        "%s: line 2: defaults: path is not taken in defaults: every image names its own" % (tmp_path / "manifest.yml"),
        "%s: line 3: imgs: unknown field 'imgs' (known: version, defaults, allow_paths, images, x-*)"
        % (tmp_path / "manifest.yml"),
    ]
    assert problems(tmp_path, "- just a list\n") == [
        "%s: line 1: expected a mapping, got a list" % (tmp_path / "manifest.yml")]
    assert problems(tmp_path, "# nothing here\n") == [
        "%s: the manifest is empty: expected a mapping with version and images" % (tmp_path / "manifest.yml")]


def test_bad_size_value_and_shrink_flag_type(tmp_path):
    m = tmp_path / "manifest.yml"
    assert problems(tmp_path, """
        version: 1
        images:
          - {path: a.qcow2, size: 1.5}
          - {path: b.qcow2, size: 99E}
          - {path: c.qcow2, size: 1M, allow_shrink: maybe}
        """) == [
        "%s: line 3: images[0] (a.qcow2): size: expected a string or an integer, got 1.5" % m,
        "%s: line 4: images[1] (b.qcow2): size: invalid size '99E': must be between 0 and 9223372036854775807" % m,
        "%s: line 5: images[2] (c.qcow2): allow_shrink: expected a boolean (true/false), got 'maybe'" % m,
    ]


def test_duplicate_paths(tmp_path):
    m = tmp_path / "manifest.yml"
    other = write(tmp_path / "sub", """
        version: 1
        images:
          - {path: ../a.qcow2, size: 1M}
        """)
    main_path = write(tmp_path, """
        version: 1
        images:
          - {path: a.qcow2, size: 1M}
          - {path: ./x/../a.qcow2, size: 2M}
        """)
    found = [str(p) for p in load_manifests([main_path, other], allow_paths=[str(tmp_path)]).problems]
    assert found == [
        "%s: line 4: images[1] (./x/../a.qcow2): path: the same file as images[0]" % m,
        "%s: line 3: images[0] (../a.qcow2): path: the same file as %s: images[0] (a.qcow2)" % (other, m),
    ]


def test_cycles(tmp_path):
    m = tmp_path / "manifest.yml"
    assert problems(tmp_path, """
        version: 1
        images:
          - {path: a.qcow2, backing_file: c.qcow2}
          - {path: b.qcow2, backing_file: a.qcow2}
          - {path: c.qcow2, source: b.qcow2}
          - {path: self.qcow2, backing_file: self.qcow2}
          - {path: ok.qcow2, size: 1M}
        """) == [
        "%s: line 3: images[0] (a.qcow2): backing_file: dependency cycle through backing files and sources: "
        "a.qcow2 -> c.qcow2 -> b.qcow2 -> a.qcow2" % m,
        "%s: line 6: images[3] (self.qcow2): backing_file: dependency cycle through backing files and sources: "
        "self.qcow2 -> self.qcow2" % m,
    ]


def test_dependency_on_a_deleted_image(tmp_path):
    assert problems(tmp_path, """
        version: 1
        images:
          - {path: base.qcow2, state: absent}
          - {path: vm.qcow2, backing_file: base.qcow2}
        """) == ["%s: line 4: images[1] (vm.qcow2): backing_file: base.qcow2 is deleted by images[0] (state: absent)"
                 % (tmp_path / "manifest.yml")]


def test_escaping_paths(tmp_path):
    d = tmp_path / "repo"
    text = """
        version: 1
        images:
          - {path: ../outside.qcow2, size: 1M}
          - {path: /etc/vdisk.qcow2, size: 1M}
          - {path: in.qcow2, source: ../golden/base.qcow2}
          - {path: vm.qcow2, backing_file: ../../golden/base.qcow2}
          - {path: link/x.qcow2, size: 1M}
        """
    os.makedirs(str(d))
    os.symlink("/tmp", str(d / "link"))
    found = problems(d, text)
    why = "is outside the manifest's directory %s: allow its directory with allow_paths in the manifest or " \
          "--allow-path" % d
    m = d / "manifest.yml"
    assert found == [
        "%s: line 3: images[0] (../outside.qcow2): path: %s %s" % (m, tmp_path / "outside.qcow2", why),
        "%s: line 4: images[1] (/etc/vdisk.qcow2): path: /etc/vdisk.qcow2 %s" % (m, why),
        "%s: line 5: images[2] (in.qcow2): source: %s %s" % (m, tmp_path / "golden/base.qcow2", why),
        "%s: line 6: images[3] (vm.qcow2): backing_file: %s %s" % (m, d / "../../golden/base.qcow2", why),
        "%s: line 7: images[4] (link/x.qcow2): path: %s %s" % (m, d / "link/x.qcow2", why),
    ]
    # allowed by the command line or by the manifest
    found = [str(p) for p in load_manifests([str(m)], allow_paths=[str(tmp_path), "/etc"]).problems]
    assert found == ["%s: line 6: images[3] (vm.qcow2): backing_file: %s %s" % (m, d / "../../golden/base.qcow2", why),
                     "%s: line 7: images[4] (link/x.qcow2): path: %s %s" % (m, d / "link/x.qcow2", why)]
    assert problems(d, text.replace("images:", "allow_paths: [.., /etc, /tmp, /]\n        images:")) == []


def test_unreadable_manifest(tmp_path, capsys):
    rc, out, err = validate(capsys, tmp_path / "missing.yml")
    assert rc == 1 and err == "vdisk: validate: %s: could not read the manifest: No such file or directory\n" % (
        tmp_path / "missing.yml")


def test_usage_error(capsys):
    assert main(["plan"]) == 1
    assert capsys.readouterr().err.startswith("vdisk: plan: the following arguments are required: MANIFEST.yml")


def test_allow_path_on_the_command_line(tmp_path, capsys):
    repo = tmp_path / "repo"
    path = write(repo, """
        version: 1
        images:
          - {path: ../shared/a.qcow2, size: 1M}
        """)
    rc, out, err = validate(capsys, path)
    assert rc == 1 and "path: %s is outside the manifest's directory" % (tmp_path / "shared/a.qcow2") in err
    rc, out, err = validate(capsys, "--allow-path", tmp_path / "shared", path)
    assert (rc, err) == (0, "")


def test_defaults_checked_once(tmp_path):
    m = tmp_path / "manifest.yml"
    found = problems(tmp_path, """
        version: 1
        defaults: {format: qcow2, options: {lazy_refcount: true}}
        images:
          - {path: a.qcow2, size: 1M}
          - {path: b.qcow2, size: 1M}
        """)
    assert len(found) == 1 and found[0].startswith(
        "%s: line 2: defaults.lazy_refcount: Invalid parameter 'lazy_refcount' for format qcow2 (known: " % m)
