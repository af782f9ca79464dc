"""The manifest's JSON Schema (``manifest.schema.json``, published in docs/manifest.md) and its validator."""
import copy
import os
from typing import Any, Dict

from ..errors import MissingPackage
from .data import SCHEMA

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifest.schema.json")


def manifest_schema() -> Dict[str, Any]:
    """The manifest schema as a dict (a copy of ``data.SCHEMA``, equal to the shipped JSON file)."""
    return copy.deepcopy(SCHEMA)


def manifest_validator() -> Any:
    """A ``jsonschema.Draft7Validator`` of the manifest schema.

    jsonschema is imported here, not with this module: the Ansible module imports the manifest code
    on managed hosts that may have only the standard library, and validates its data without the
    schema.  Raises :class:`~..errors.MissingPackage` when jsonschema is not installed.
    """
    try:
        import jsonschema  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise MissingPackage("validating a manifest file", "jsonschema") from None
    return jsonschema.Draft7Validator(manifest_schema())
