"""The manifest YAML reader: the stdlib subset reader means what PyYAML's safe loader means."""
import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.yamlload import YAMLSyntaxError, load_yaml

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
    hex: 0x10
    float: 1.5
    fraction: 1.5T
    nothing: ~
    empty:
    url: http://example.com/a#b
    hash: "a # b"
  -
    path: "tab\\there \\u00e9"
    flags: [on, Off, TRUE, no, null]
  - path: c
    snapshots:
    - a
    - b
    nested:
      - - x
        - y
      - {k: [1, 2]}
empty_list: []
empty_map: {}
"""


def test_subset_reader_agrees_with_pyyaml():
    pytest.importorskip("yaml")
    expected = load_yaml(SAMPLE, "m.yml", pyyaml=True)
    assert load_yaml(SAMPLE, "m.yml", pyyaml=False) == expected
    assert expected["images"][0]["mode"] == 0o644 and expected["defaults"]["preallocation"] is False
    assert expected["images"][1]["path"] == "tab\there \u00e9"


@pytest.mark.parametrize("text, line, message", [
    ("a: 1\n  b: 2\n", 2, "unexpected indentation after 'a: 1'"),
    ("a: [1, 2\n", 1, "flow collection not closed on its line (multi-line flow is not supported)"),
    ("a: 1\na: 2\n", 2, "duplicate key 'a'"),
    ("a: {b: 1, b: 2}\n", 1, "duplicate key 'b'"),
    ("a: &x 1\n", 1, "anchors, aliases and tags are not supported without PyYAML"),
    ("a: |\n  text\n", 1, "block scalars (| and >) are not supported without PyYAML"),
    ("a: \"open\n", 1, "unterminated quoted string (multi-line quoted strings are not supported)"),
    ("a: b: c\n", 1, "mapping values are not allowed here: 'b: c'"),
    ("- a\nb: 1\n", 2, "unexpected indentation or content 'b: 1'"),
    ("a:\n\t- b\n", 2, "tabs are not allowed in indentation"),
    ("a: 1\n---\nb: 2\n", 2, "only one YAML document per manifest file"),
    ('a: "\\q"\n', 1, "invalid escape \\q"),
])
def test_subset_reader_errors_name_the_line(text, line, message):
    with pytest.raises(YAMLSyntaxError) as info:
        load_yaml(text, "m.yml", pyyaml=False)
    assert info.value.line == line and str(info.value) == "m.yml: line %d: %s" % (line, message)


def test_pyyaml_duplicate_keys_are_errors():
    pytest.importorskip("yaml")
    with pytest.raises(YAMLSyntaxError, match="line 3: duplicate key 'size'"):
        load_yaml("images:\n  - size: 1\n    size: 2\n", "m.yml", pyyaml=True)


def test_empty_document():
    assert load_yaml("# nothing\n", "m.yml", pyyaml=False) is None


def test_mutated_input_raises_only_syntax_errors():
    """Fuzz: any mutation of a valid manifest parses or raises YAMLSyntaxError, nothing else."""
    import random
    rng = random.Random(20261125)
    alphabet = " -:#'\"[]{},\n\t|>&*!~0aZ\\"
    for _round in range(3000):
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
            load_yaml("".join(text), "m.yml", pyyaml=False)
        except YAMLSyntaxError as exc:
            assert exc.line is None or 1 <= exc.line <= len(SAMPLE.splitlines()) + 4
