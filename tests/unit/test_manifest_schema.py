"""One source for the image fields: the manifest schema, the state layer's spec, the images role, the docs."""
import json
import os

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import ATTRIBUTES
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.yamlload import load_yaml
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.schema import SCHEMA_FILE, manifest_schema
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.schema.validator import validate
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# argument_specs types -> JSON Schema types
TYPES = {"str": ["string"], "bool": ["boolean"], "list": ["array"], "dict": ["object"]}


def fields():
    return manifest_schema()["definitions"]["fields"]["properties"]


def role_options():
    with open(os.path.join(REPO, "roles/images/meta/argument_specs.yml")) as f:
        specs = load_yaml(f.read(), "argument_specs.yml")
    return specs["argument_specs"]["main"]["options"]["images_list"]["options"]


def test_role_and_manifest_accept_the_same_fields():
    schema, role = fields(), role_options()
    assert list(schema) == list(role)
    for name, option in role.items():
        types = schema[name].get("type")
        types = [types] if isinstance(types, str) else types
        if "$ref" in schema[name]:
            types = manifest_schema()["definitions"][schema[name]["$ref"].split("/")[-1]]["type"]
        if option["type"] != "raw":
            assert types[0] == TYPES[option["type"]][0], name
        else:
            assert len(types) > 1, name
        if "choices" in option:
            assert schema[name]["enum"] == option["choices"], name
        if option.get("required"):
            assert name in manifest_schema()["definitions"]["image"]["required"], name


def test_state_layer_takes_the_same_fields():
    assert set(fields()) == set(FIELDS) | set(ATTRIBUTES)


def test_schema_is_draft7_and_the_subset_validator_agrees_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = manifest_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    docs = [
        {"version": 1, "images": []},
        {"version": 1, "defaults": {"format": "raw"}, "images": [{"path": "a", "size": "1G", "mode": "0600"}]},
        {"version": 1, "images": [{"path": "a", "size": "8X"}]},
        {"version": 1, "images": [{"size": 1}]},
        {"version": 1, "defaults": {"path": "x"}, "images": [{"path": "a", "colour": 1}]},
        {"version": 2, "images": [{"path": "a", "snapshots": "x", "compress": "yes"}], "extra": 1},
        [1, 2],
    ]
    checker = jsonschema.Draft7Validator(schema)
    for doc in docs:
        ours = sorted(tuple(str(x) for x in p.location) for p in validate(doc, schema))
        theirs = sorted(tuple(str(x) for x in e.absolute_path) + ((e.message.split("'")[1],)
                        if e.validator in ("required", "additionalProperties") else ())
                        for e in checker.iter_errors(doc))
        assert ours == theirs, doc


def test_docs_publish_the_schema():
    with open(os.path.join(REPO, "docs/manifest.md")) as f:
        doc = f.read()
    with open(SCHEMA_FILE) as f:
        shipped = f.read()
    start = doc.index("<!-- schema -->\n```json\n") + len("<!-- schema -->\n```json\n")
    assert doc[start:doc.index("```", start)] == shipped
    assert json.loads(shipped) == manifest_schema()


def test_example_manifest_is_valid():
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_manifests
    loaded = load_manifests([os.path.join(REPO, "docs/examples/manifest.yml")])
    assert loaded.valid, [str(p) for p in loaded.problems]
    assert [e.name for e in loaded.entries][0] == "golden/base.qcow2"


def test_example_manifest_reads_the_same_without_pyyaml():
    pytest.importorskip("yaml")
    with open(os.path.join(REPO, "docs/examples/manifest.yml")) as f:
        text = f.read()
    assert load_yaml(text, "manifest.yml", pyyaml=False) == load_yaml(text, "manifest.yml", pyyaml=True)
