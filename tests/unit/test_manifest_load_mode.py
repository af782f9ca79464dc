"""The file attribute ``mode``: octal as text, or an integer written in octal.

YAML reads ``mode: 0640`` as the octal number 416 but ``mode: 640`` as the decimal number 640 (mode
1200, setuid-less nonsense): a manifest file, whose text is known, refuses the second with a message
that says how to write it.  The Ansible module's data has no text: an integer is the numeric mode,
as Ansible's file module takes it.
"""
import os
import textwrap

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_data, load_manifests


def load(tmp_path, text):
    path = tmp_path / "manifest.yml"
    path.write_text(textwrap.dedent(text).lstrip())
    return load_manifests([str(path)])


@pytest.mark.parametrize("written, mode", [
    ("0640", 0o640), ("'0640'", 0o640), ("'640'", 0o640), ("'0o640'", 0o640), ('"4755"', 0o4755),
    ("0o640", 0o640),           # YAML 1.1 has no 0o: this is the text '0o640'
    ("0600", 0o600), ("0", 0), ("07777", 0o7777),
])
def test_octal_modes(tmp_path, written, mode):
    loaded = load(tmp_path, """
        version: 1
        images:
          - {path: a.qcow2, size: 1M, mode: %s}
        """ % written)
    assert loaded.valid, [str(p) for p in loaded.problems]
    assert loaded.entries[0].attributes == {"mode": mode}


@pytest.mark.parametrize("written, message", [
    ("640", "640 is read as a decimal number: write '0640' (quoted) or 0640 for an octal mode"),
    ("755", "755 is read as a decimal number: write '0755' (quoted) or 0755 for an octal mode"),
    ("680", "680 is read as a decimal number: write an octal mode such as '0640' (quoted) or 0640"),
    ("0x1a0", "0x1a0 is not an octal number: write an octal mode such as '0640' (quoted) or 0640"),
    ("010000", "invalid mode 010000: expected 0 to 07777"),
    ("-0640", "invalid mode -0640: expected 0 to 07777"),
    ("'0648'", "invalid mode '0648': expected an octal number such as '0640' (symbolic modes are not supported)"),
    ("u+rw", "invalid mode 'u+rw': expected an octal number such as '0640' (symbolic modes are not supported)"),
    ("true", "expected a string or an integer, got true"),
])
def test_modes_refused(tmp_path, written, message):
    loaded = load(tmp_path, """
        version: 1
        images:
          - path: a.qcow2
            size: 1M
            mode: %s
        """ % written)
    assert [(p.line, p.index, p.field, p.message) for p in loaded.problems] == [(5, 0, "mode", message)]
    assert loaded.entries == []


def test_a_decimal_mode_names_its_line_and_says_how_to_write_it(tmp_path):
    loaded = load(tmp_path, """
        version: 1
        images:
          - {path: a.qcow2, size: 1M, mode: 640}
        """)
    assert [str(p) for p in loaded.problems] == [
        "%s: line 3: images[0] (a.qcow2): mode: 640 is read as a decimal number: write '0640' (quoted) or 0640 "
        "for an octal mode" % (tmp_path / "manifest.yml")]


def test_mode_in_defaults(tmp_path):
    loaded = load(tmp_path, """
        version: 1
        defaults:
          format: qcow2
          mode: 640
        images:
          - {path: a.qcow2, size: 1M}
        """)
    assert [(p.line, p.index, p.field, p.message) for p in loaded.problems] == [
        (4, None, "defaults.mode", "640 is read as a decimal number: write '0640' (quoted) or 0640 for an octal mode")]
    loaded = load(tmp_path, """
        version: 1
        defaults: {mode: 0640, owner: root}
        images:
          - {path: a.qcow2, size: 1M}
          - {path: b.qcow2, size: 1M, mode: '0600'}
        """)
    assert loaded.valid
    assert [e.attributes for e in loaded.entries] == [{"mode": 0o640, "owner": "root"},
                                                      {"mode": 0o600, "owner": "root"}]


def test_a_mode_from_an_anchor_keeps_its_text(tmp_path):
    loaded = load(tmp_path, """
        version: 1
        images:
          - &a {path: a.qcow2, size: 1M, mode: 640}
          - {<<: *a, path: b.qcow2}
        """)
    assert [(p.line, p.index, p.field) for p in loaded.problems] == [(3, 0, "mode"), (3, 1, "mode")]


def test_module_data_takes_an_integer_as_the_numeric_mode(tmp_path):
    loaded = load_data([{"path": "a.qcow2", "size": "1M", "mode": 416}, {"path": "b.qcow2", "mode": "0640"},
                        {"path": "c.qcow2", "mode": 640}], base_dir=str(tmp_path))
    assert loaded.valid, [str(p) for p in loaded.problems]
    assert [e.attributes["mode"] for e in loaded.entries] == [0o640, 0o640, 640]
    assert os.listdir(str(tmp_path)) == []


def test_module_data_attribute_types(tmp_path):
    loaded = load_data([{"path": "a.qcow2", "mode": [1]}, {"path": "b.qcow2", "owner": {"x": 1}},
                        {"path": "c.qcow2", "mode": 0o17777}], base_dir=str(tmp_path))
    assert [(p.index, p.field, p.message) for p in loaded.problems] == [
        (0, "mode", "expected a string or an integer, got a list"),
        (1, "owner", "expected a string or an integer, got a mapping"),
        (2, "mode", "invalid mode 17777: expected 0 to 07777")]
