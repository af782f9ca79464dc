"""The manifest's JSON Schema (``manifest.schema.json``, published in docs/manifest.md) and its validator."""
import json
import os
from typing import Any, Dict

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifest.schema.json")


def manifest_schema() -> Dict[str, Any]:
    """The manifest schema as a dict (read from the file shipped beside this module)."""
    with open(SCHEMA_FILE, encoding="utf-8") as f:
        return json.load(f)
