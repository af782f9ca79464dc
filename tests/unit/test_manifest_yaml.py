"""The manifest YAML reader: PyYAML's safe loader, with lines, duplicate keys refused and bounds kept.

Every test runs with libyaml's loader (CSafeLoader) and with PyYAML's pure-Python one: the manifest
means the same, and fails with the same problems, whichever PyYAML a host has.
"""
import datetime
import random
import time

import pytest
import yaml

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.marked_yaml import (
    TOO_DEEP, MarkedDict, MarkedList, YAMLProblem, int_text, line_of, load_marked)

DEPTH, NODES = 64, 1000000

SAMPLE = """\
# a comment
---
version: 1
defaults: {format: qcow2, preallocation: off, options: {cluster_size: 64K, lazy_refcounts: yes}}
images:
  - path: golden/debian.qcow2      # trailing comment
    state: present
    size: 8G
    options:
      cluster_size: 64K
      compat: "1.1"
    snapshots: [pristine, "after install", 'it''s', 3]
    mode: 0644
  -
    path: "tab\\there \\u00e9"
    flags: [on, Off, TRUE, no, null]
"""


@pytest.fixture(params=["libyaml", "python"])
def loader(request, monkeypatch):
    """Which PyYAML loader reads the manifests: libyaml's when PyYAML has it, else the pure-Python one."""
    if request.param == "python":
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    elif not hasattr(yaml, "CSafeLoader"):
        pytest.skip("this PyYAML is built without libyaml")
    return request.param


def load(text):
    return load_marked(text, DEPTH, NODES)


def problem(text):
    with pytest.raises(YAMLProblem) as info:
        load(text)
    return info.value


def test_reads_as_the_safe_loader_does(loader):
    doc = load(SAMPLE)
    assert doc == yaml.safe_load(SAMPLE)
    assert doc["images"][0]["mode"] == 0o644 and doc["defaults"]["preallocation"] is False
    assert doc["images"][1]["path"] == "tab\there \u00e9"
    assert doc["images"][1]["flags"] == [True, False, True, False, None]


def test_mappings_and_lists_know_their_lines(loader):
    doc = load(SAMPLE)
    assert isinstance(doc, MarkedDict)
    assert isinstance(doc, dict)
    assert doc.line == 3
    assert doc.key_lines == {"version": 3, "defaults": 4, "images": 5}
    images = doc["images"]
    assert isinstance(images, MarkedList) and isinstance(images, list)
    assert images.line == 6 and images.item_lines == [6, 15]
    first = images[0]
    assert first.line == 6
    assert first.key_lines["size"] == 8
    assert first["options"].key_lines == {"cluster_size": 10, "compat": 11}
    assert first["snapshots"].item_lines == [12, 12, 12, 12]
    assert images[1].line == 15          # the mapping starts on the line after the lone "-"


def test_line_of_a_location(loader):
    doc = load(SAMPLE)
    assert line_of(doc, ()) == 3
    assert line_of(doc, ("images", 0, "options", "compat")) == 11
    assert line_of(doc, ("images", 1)) == 15
    # a part the document does not have: the line of the deepest part it has
    assert line_of(doc, ("images", 0, "backing_file")) == 6
    assert line_of(doc, ("images", 7, "size")) == 5
    assert line_of(doc, ("defaults", "options", "cluster_size")) == 4
    assert line_of({"plain": "dict"}, ("plain",)) is None


def test_integers_keep_their_text(loader):
    doc = load("a: 0640\nb: 640\nc: '0640'\nd: 0x1a0\ne: 1_000\n")
    assert doc == {"a": 0o640, "b": 640, "c": "0640", "d": 0x1a0, "e": 1000}
    assert [int_text(doc, k) for k in "abcde"] == ["0640", "640", None, "0x1a0", "1_000"]
    assert int_text({"a": 1}, "a") is None


def test_anchors_aliases_merge_keys_and_block_scalars(loader):
    doc = load("""\
base: &base
  format: qcow2
  size: 1G
  options: &opts {cluster_size: 64K}
images:
  - <<: *base
    path: a.qcow2
    size: 2G
  - <<: [*base, {state: absent}]
    path: b.qcow2
    options: *opts
literal: |
  line one
  line two
folded: >
  one
  two
""")
    assert doc["images"][0] == {"format": "qcow2", "size": "2G", "options": {"cluster_size": "64K"}, "path": "a.qcow2"}
    assert doc["images"][1]["state"] == "absent" and doc["images"][1]["options"] == {"cluster_size": "64K"}
    assert doc["literal"] == "line one\nline two\n" and doc["folded"] == "one two\n"
    # a key brought in by the merge is where it is written: in the anchored mapping
    assert doc["images"][0].key_lines == {"format": 2, "size": 8, "options": 4, "path": 7}


def test_a_mapping_key_overridden_after_a_merge_is_not_a_duplicate(loader):
    assert load("b: &b {size: 1}\nc:\n  <<: *b\n  size: 2\n")["c"] == {"size": 2}


def test_an_integer_overridden_by_text_forgets_its_text(loader):
    doc = load("b: &b {mode: 640}\nc:\n  <<: *b\n  mode: '0640'\n")
    assert int_text(doc["b"], "mode") == "640" and int_text(doc["c"], "mode") is None


@pytest.mark.parametrize("text, line, message", [
    ("images:\n  - size: 1\n    size: 2\n", 3, "invalid YAML: duplicate key 'size' (first on line 2)"),
    ("a: {b: 1, b: 2}\n", 1, "invalid YAML: duplicate key 'b' (first on line 1)"),
    ("a: 1\nb: 2\na: 3\n", 3, "invalid YAML: duplicate key 'a' (first on line 1)"),
    ("a: 1\n---\nb: 2\n", 2, "invalid YAML: expected a single document in the stream, but found another document"),
    ("a: *nowhere\n", 1, "invalid YAML: found undefined alias"),
    ("a: 1\nb: 2024-13-45\n", 2, "invalid YAML: cannot read '2024-13-45' as !!timestamp: month must be in 1..12"),
    ("a: !!float abc\n", 1, "invalid YAML: cannot read 'abc' as !!float: could not convert"),
    ("a: !!int abc\n", 1, "invalid YAML: cannot read 'abc' as !!int: invalid literal"),
    ("a:\n  b: !!bool maybe\n", 2, "invalid YAML: cannot read 'maybe' as !!bool"),
    ("a: !!timestamp x\n", 1, "invalid YAML: cannot read 'x' as !!timestamp"),
    ("a: !!str [1]\n", 1, "invalid YAML: expected a scalar node, but found sequence"),
    ("a: !!python/object:os.system x\n", 1, "invalid YAML: could not determine a constructor for the tag"),
    ("? [a]\n: 1\n", 1, "invalid YAML: found unhashable key"),
    ("a: !!binary 'a'\n", 1, "invalid YAML: failed to decode base64 data"),
    ("a: !!map x\n", 1, "invalid YAML: expected a mapping node, but found scalar"),
    ("a: !!seq x\n", 1, "invalid YAML: expected a sequence node, but found scalar"),
    ("a: 1\nb: c: d\n", 2, "invalid YAML: mapping values are not allowed"),
    ("a:\n  - b\n c: 1\n", 3, "invalid YAML: "),
    ("a:\n\t- b\n", 2, "invalid YAML: found character"),
    ("a: [1, 2\n", 2, "invalid YAML: "),
    ("a: \"open\n", 2, "invalid YAML: "),
    ("a: 1\nb: x\x00\n", 2, "invalid YAML: unacceptable character #x0000: "),
    ("a: %s\nb: 1\nc: \x07\n" % ("\u00e9" * 40), 3, "invalid YAML: unacceptable character #x0007: "),
])
def test_errors_name_their_line(loader, text, line, message):
    found = problem(text)
    assert found.line == line and found.message.startswith(message), (found.line, found.message)
    assert "\n" not in found.message and len(found.message) < 300


def test_syntax_error_says_where_the_unclosed_part_started(loader):
    found = problem("version: 1\nimages:\n  - path: a.qcow2\n    size: [1G\n")
    assert found.line == 5 and found.message.endswith("(while parsing a flow sequence on line 4)")


def test_empty_document(loader):
    assert load("# nothing\n") is None
    assert load("") is None


@pytest.mark.parametrize("depth", [DEPTH + 1, 100, 999, 5000])
def test_too_deep_is_refused(loader, depth):
    found = problem("version: 1\nimages:\n  - {x: %s%s}\n" % ("[" * depth, "]" * depth))
    assert found.message == TOO_DEEP % DEPTH
    assert found.line in (3, None)       # None: PyYAML's recursive composer ran out of stack


def test_deep_enough_is_read(loader):
    depth = DEPTH - 3       # the document, images and the image are the first three levels
    x = load("version: 1\nimages:\n  - {x: %s%s}\n" % ("[" * depth, "]" * depth))["images"][0]["x"]
    levels = 0
    while isinstance(x, list):
        x, levels = x[0] if x else None, levels + 1
    assert levels == depth


def test_block_nesting_too_deep(loader):
    text = "".join("%s- \n" % ("  " * i) for i in range(200))
    assert problem(text).message == TOO_DEEP % DEPTH


def test_an_alias_of_itself_is_too_deep(loader):
    assert problem("a: &x [*x]\n").message == TOO_DEEP % DEPTH


def test_billion_laughs_is_refused_quickly(loader):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += ["a%d: &a%d [%s]" % (i, i, ", ".join(["*a%d" % (i - 1)] * 10)) for i in range(1, 10)]
    start = time.monotonic()
    found = problem("\n".join(lines) + "\n")
    assert time.monotonic() - start < 10
    assert found.message == ("the manifest has more than 1000000 values once its aliases (*name) are expanded; "
                             "refused")
    assert found.line is None


def test_aliases_within_the_bound_are_read(loader):
    # nodes with the aliases expanded: the document 1, its keys 2, a 1 + 3, b 1 + 3 * (1 + 3): 20
    text = "a: &a [1, 2, 3]\nb: [*a, *a, *a]\n"
    assert load_marked(text, DEPTH, 20) == {"a": [1, 2, 3], "b": [[1, 2, 3]] * 3}
    with pytest.raises(YAMLProblem):
        load_marked(text, DEPTH, 19)


def test_safe_loader_types_are_kept(loader):
    doc = load("d: 2024-01-02\nb: !!binary aGVsbG8=\nf: 1.5\nn: ~\n")
    assert doc == {"d": datetime.date(2024, 1, 2), "b": b"hello", "f": 1.5, "n": None}


def test_huge_integers_stay_text(loader):
    huge = "9" * 5000
    doc = load("a: %s\nb: 0x%s\nc: 12\nd: 0x10\n" % (huge, "f" * 5000))
    assert doc == {"a": huge, "b": "0x" + "f" * 5000, "c": 12, "d": 16}


def test_mutated_input_gives_data_or_a_problem(loader):
    """Fuzz: any mutation of a valid manifest reads, or is one YAMLProblem with a line in the file."""
    rng = random.Random(20261125)
    alphabet = " -:#'\"[]{},\n\t|>&*!~0aZ\\<"
    for _round in range(1500):
        text = list(SAMPLE)
        for _edit in range(rng.randint(1, 4)):
            pos = rng.randrange(len(text))
            choice = rng.random()
            if choice < 0.4:
                text[pos] = rng.choice(alphabet)
            elif choice < 0.7:
                del text[pos]
            else:
                text.insert(pos, rng.choice(alphabet))
        try:
            load("".join(text))
        except YAMLProblem as exc:
            assert exc.line is None or 1 <= exc.line <= len(SAMPLE.splitlines()) + 5, exc.message
            assert "\n" not in exc.message


def test_every_safe_tag_on_every_kind_of_value_gives_data_or_a_problem(loader):
    tags = ["!!null", "!!bool", "!!int", "!!float", "!!binary", "!!timestamp", "!!omap", "!!pairs", "!!set",
            "!!str", "!!seq", "!!map", "!!merge", "!!value", "!unknown"]
    values = ["x", "1", "''", "[1, [2]]", "{a: 1}", "{[a]: 1}", "[{a: 1, b: 2}]", "2024-02-30", "1:2:3", "~", "0x"]
    for tag in tags:
        for value in values:
            try:
                load("a: %s %s\n" % (tag, value))
            except YAMLProblem as exc:
                assert exc.line == 1 and "\n" not in exc.message, (tag, value, exc.message)
