"""The manifest's JSON Schema (``manifest.schema.json``, published in docs/manifest.md) and its validator."""
import copy
import os
from typing import Any, Dict

from .data import SCHEMA

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifest.schema.json")


def manifest_schema() -> Dict[str, Any]:
    """The manifest schema as a dict (a copy of ``data.SCHEMA``, equal to the shipped JSON file)."""
    return copy.deepcopy(SCHEMA)
