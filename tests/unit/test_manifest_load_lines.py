"""vdisk validate reports every problem of the manifests, each with its line, in manifest order.

Also: the schema's errors (jsonschema) worded for users, one problem per mistake; duplicates found
among all images, whatever else is wrong with them; valid images returned beside the problems.
"""
import json
import os
import textwrap

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import Problem, load_manifests


def write(directory, text, name="manifest.yml"):
    path = os.path.join(str(directory), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    return path


def found(directory, text, **kwargs):
    return load_manifests([write(directory, text)], **kwargs).problems


def where(problems):
    """(line, index, field, message) of each problem."""
    return [(p.line, p.index, p.field, p.message) for p in problems]


def test_every_problem_has_its_line_and_they_come_in_manifest_order(tmp_path):
    first = write(tmp_path, """
        version: 1
        images:
          - {path: a.qcow2, backing_file: b.qcow2}
          - path: b.qcow2
            backing_file: a.qcow2
          - path: c.qcow2
            size: lots
          - {path: d.qcow2, format: floppy}
          - path: e.qcow2
            colour: blue
          - {path: c.qcow2, size: 1M}
        """, "first.yml")
    second = write(tmp_path, """
        version: 1
        images:
          - {path: f.qcow2, size: 1M, mode: 640}
          - {path: a.qcow2, size: 1M}
        """, "second.yml")
    # found: each image's problems, then duplicates, then the cycle (a.qcow2 -> b.qcow2 -> a.qcow2)
    problems = load_manifests([first, second]).problems
    assert [(p.manifest, p.line) for p in problems] == [
        (first, 3), (first, 7), (first, 8), (first, 10), (first, 11),
        (second, 3), (second, 4)]
    assert [p.field for p in problems] == ["backing_file", "size", "format", "colour", "path", "mode", "path"]
    assert str(problems[-1]) == "%s: line 4: images[1] (a.qcow2): path: the same file as %s: images[0] (a.qcow2)" % (
        second, first)
    assert all(p.line is not None for p in problems)


def test_a_duplicate_is_found_when_the_other_image_has_an_error(tmp_path):
    m = tmp_path / "manifest.yml"
    problems = found(tmp_path, """
        version: 1
        images:
          - {path: a.qcow2, size: 8X}
          - {path: a.qcow2, size: 1M}
          - {path: ./a.qcow2, format: floppy}
          - {path: b.qcow2, colour: blue}
          - {path: b.qcow2, size: 1M}
        """)
    assert [str(p) for p in problems if p.field == "path"] == [
        "%s: line 4: images[1] (a.qcow2): path: the same file as images[0]" % m,
        "%s: line 5: images[2] (./a.qcow2): path: the same file as images[0]" % m,
        "%s: line 7: images[4] (b.qcow2): path: the same file as images[3]" % m,
    ]
    assert len(problems) == 6


def test_a_duplicate_is_not_planned_but_the_valid_images_are(tmp_path):
    loaded = load_manifests([write(tmp_path, """
        version: 1
        images:
          - path: ok.qcow2
            size: 1M
          - path: bad.qcow2
            size: lots
          - {path: ok.qcow2, size: 2M}
          - path: vm.qcow2
            backing_file: ok.qcow2
        """)])
    assert where(loaded.problems)[0][:3] == (6, 1, "size")
    assert where(loaded.problems)[1][:3] == (7, 2, "path")
    assert [(e.index, e.name, e.line) for e in loaded.entries] == [(0, "ok.qcow2", 3), (3, "vm.qcow2", 8)]
    assert loaded.entries[1].depends == [0]


def test_problem_to_dict_has_severity_and_line(tmp_path):
    (problem,) = found(tmp_path, "version: 1\nimages:\n  - {path: a.qcow2, size: 8X}\n")
    assert problem.severity == "error"
    data = problem.to_dict()
    assert data["severity"] == "error"
    assert data["line"] == 3
    assert data["text"] == str(problem)
    assert json.loads(json.dumps(data)) == data
    assert Problem("m.yml", "could not read the manifest: No such file").to_dict()["line"] is None


def test_a_field_named_by_its_message_is_not_repeated():
    assert str(Problem("m.yml", "path is required", 2, None, "path", 7)) == "m.yml: line 7: images[2]: path is required"
    assert str(Problem("m.yml", "expected a string, got 1", 0, "a", "format", 3)) == (
        "m.yml: line 3: images[0] (a): format: expected a string, got 1")


@pytest.mark.parametrize("image, line, field, message", [
    ("{path: a.qcow2, size: -1.5}", 3, "size", "expected a string or an integer, got -1.5"),
    ("{path: a.qcow2, size: -1}", 3, "size", "must be at least 0, got -1"),
    ("{path: a.qcow2, state: big}", 3, "state", "invalid value 'big': expected one of present, absent"),
    ("{path: a.qcow2, state: 1}", 3, "state", "expected a string, got 1"),
    ("{path: a.qcow2, options: 5}", 3, "options", "expected a mapping, got 5"),
    ("{path: a.qcow2, format: ''}", 3, "format", "must not be empty"),
    ("{path: a.qcow2, compress: yes please}", 3, "compress", "expected a boolean (true/false), got 'yes please'"),
    ("{path: 2024-01-02}", 3, "path", "expected a string, got the date 2024-01-02 (quote it to make it text)"),
    ("{path: a.qcow2, source: [x]}", 3, "source", "expected a string, got a list"),
    ("{path: a.qcow2, state: %s}" % ("x" * 500), 3, "state", None),
    ("\n    path: a.qcow2\n    snapshots:\n      - one\n      - 1.5", 7, "snapshots[1]",
     "expected a string or an integer, got 1.5"),
    ("{size: 1M}", 3, "path", "path is required"),
    ("{path: a.qcow2, sise: 1M}", 3, "sise", "unknown field 'sise' (known: path, state, format, size, "
     "preallocation, options, backing_file, backing_format, snapshots, prune_snapshots, source, source_checksum, source_format, "
     "compress, allow_shrink, recreate, encryption, owner, group, mode)"),
    ("5", 3, None, "expected a mapping, got 5"),
])
def test_one_mistake_one_problem_worded_for_users(tmp_path, image, line, field, message):
    problems = found(tmp_path, "version: 1\nimages:\n  - %s\n" % image)
    assert len(problems) == 1, [str(p) for p in problems]
    assert (problems[0].line, problems[0].index, problems[0].field) == (line, 0, field)
    if message is None:     # a long value is cut: the problem stays one short line
        assert len(str(problems[0])) < 300 and "..." in problems[0].message
    else:
        assert problems[0].message == message


@pytest.mark.parametrize("text, line, field, message", [
    ("version: 1\nimages: {}\n", 2, "images", "expected a list, got a mapping"),
    ("version: '1'\nimages: []\n", 1, "version", "invalid value '1': expected one of 1"),
    ("version: 1\nimages: []\nallow_paths: ['']\n", 3, "allow_paths[0]", "must not be empty"),
    ("version: 1\nimages: []\ndefaults:\n  format: raw\n  path: x\n", 5, "defaults",
     "path is not taken in defaults: every image names its own"),
    ("version: 1\nimages: []\ndefaults: {path: 5}\n", 3, "defaults",
     "path is not taken in defaults: every image names its own"),
    ("version: true\nimages: []\n", 1, "version", "invalid value true: expected one of 1"),
    ("version: 1\nimages: []\ndefaults: {colour: red}\n", 3, "defaults.colour",
     "unknown field 'colour' (known: path, state, format, size, preallocation, options, backing_file, "
     "backing_format, snapshots, prune_snapshots, source, source_checksum, source_format, compress, allow_shrink, recreate, encryption, owner, "
     "group, mode)"),
    ("images: []\n", 1, "version", "version is required"),
])
def test_top_level_problems(tmp_path, text, line, field, message):
    problems = found(tmp_path, text)
    assert where(problems) == [(line, None, field, message)]


def test_defaults_with_a_problem_hold_back_the_images_but_not_their_duplicates(tmp_path):
    loaded = load_manifests([write(tmp_path, """
        version: 1
        defaults: {format: qcow2, size: huge}
        images:
          - {path: a.qcow2}
          - {path: a.qcow2}
        """)])
    assert where(loaded.problems) == [
        (2, None, "defaults.size",
         "'huge': expected a size such as 8G, 512M or 1048576 (suffixes k, M, G, T, P, E)"),
        (5, 1, "path", "the same file as images[0]")]
    assert loaded.entries == []


def test_spec_problem_lines_point_at_the_field_or_the_option(tmp_path):
    problems = found(tmp_path, """
        version: 1
        defaults:
          format: qcow2
          size: 1M
        images:
          - path: a.qcow2
            options:
              compat: "1.1"
              lazy_refcounts: maybe
          - path: b.qcow2
            format: raw
            snapshots: [x]
          - path: c.qcow2
            options: {cluster_sise: 64K}
        """)
    assert [(p.line, p.index, p.field) for p in problems] == [
        (9, 0, "lazy_refcounts"), (12, 1, "snapshots"), (14, 2, "cluster_sise")]


def test_entries_know_their_line(tmp_path):
    loaded = load_manifests([write(tmp_path, """
        version: 1
        images:
          - path: a.qcow2
            size: 1M

          - {path: b.qcow2, size: 1M}
          -
            path: c.qcow2
            size: 1M
        """)])
    assert loaded.valid
    assert [(e.name, e.line) for e in loaded.entries] == [("a.qcow2", 3), ("b.qcow2", 6), ("c.qcow2", 8)]


def test_whole_file_problems_have_no_line_and_come_first(tmp_path):
    good = write(tmp_path, "version: 1\nimages:\n  - {path: a.qcow2, size: 8X}\n", "good.yml")
    missing = str(tmp_path / "missing.yml")
    problems = load_manifests([missing, good]).problems
    assert [(p.manifest, p.line) for p in problems] == [(missing, None), (good, 3)]


def test_a_none_matched_error_is_told_by_its_most_specific_part():
    """The manifest schema has no anyOf/oneOf today; should it get one, its error says what is wrong."""
    import jsonschema
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest import schema_check
    validator = jsonschema.Draft7Validator({"properties": {"size": {"anyOf": [
        {"type": "string", "pattern": "^[0-9]+[kMG]$"}, {"type": "integer", "minimum": 0}]}}})
    (error,) = validator.iter_errors({"size": -1})
    best = schema_check._most_specific(error)
    assert best is not error and list(best.absolute_path) == ["size"]
    assert schema_check._message(best) in ("must be at least 0, got -1", "expected a string, got -1")
