"""One source for the image fields: the manifest schema, the state layer's spec, the images role, the docs."""
import json
import os

import jsonschema
import yaml

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import ATTRIBUTES, PATH_IN_DEFAULTS
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.schema import (
    SCHEMA_FILE, manifest_schema, manifest_validator)
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.state.spec import FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# argument_specs types -> JSON Schema types
TYPES = {"str": ["string"], "bool": ["boolean"], "list": ["array"], "dict": ["object"]}


def fields():
    return manifest_schema()["definitions"]["fields"]["properties"]


def role_options():
    with open(os.path.join(REPO, "roles/images/meta/argument_specs.yml")) as f:
        specs = yaml.safe_load(f)
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


def test_schema_is_draft7():
    jsonschema.Draft7Validator.check_schema(manifest_schema())
    assert isinstance(manifest_validator(), jsonschema.Draft7Validator)


def test_data_checks_say_what_the_schema_says():
    """load_data checks ``path`` in defaults without jsonschema, with the schema's own message."""
    assert manifest_schema()["properties"]["defaults"]["not"]["x-error"] == PATH_IN_DEFAULTS


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
