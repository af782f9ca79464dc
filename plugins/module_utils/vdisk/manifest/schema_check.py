"""Check a manifest's data against its JSON Schema with jsonschema: one short problem per mistake.

jsonschema's own messages are written for schema authors ("'8X' does not match '^\\s*(0[xX]...'");
each error becomes a :class:`SchemaProblem` worded for users instead -- "expected a string, got 12",
"unknown field 'sise' (known: ...)", "path is required", or the ``x-error`` the schema gives for a
failed ``pattern`` or ``not`` -- located by the keys and list indexes that lead to the value.
"""
import datetime
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from ..schema import manifest_validator

Location = Tuple[Any, ...]

_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "a boolean (true/false)", "null": "null"}
_SHOWN_CHARS = 60       # a value quoted in a message is cut to this length: messages stay one short line


@dataclass
class SchemaProblem:
    """One mistake: *location* leads from the document to the offending value (a missing or unknown
    field's name last), *message* says what is wrong, and *at* is where in the document its line is."""
    location: Location
    message: str
    at: Location


def schema_problems(doc: Any) -> List[SchemaProblem]:
    """Every mistake in *doc* against the manifest schema, one problem each, in jsonschema's order.

    Raises :class:`~..errors.MissingPackage` when jsonschema is not installed."""
    validator = manifest_validator()
    errors = [_most_specific(error) for error in validator.iter_errors(doc)]
    # a value of the wrong type fails its other keywords too (minimum, pattern): the type says it all
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    # a field that is not taken where it is (defaults.path): what is wrong with its value is beside the point
    refused = {tuple(e.absolute_path) + _about(e) for e in errors if e.validator == "not" and _about(e)}
    problems: List[SchemaProblem] = []
    for error in errors:
        where = tuple(error.absolute_path)
        if (error.validator != "type" and where in mistyped) or any(where[:len(r)] == r for r in refused):
            continue
        problems.extend(_problems(error))
    return problems


def show_value(value: Any) -> str:
    """A value as a message quotes it: YAML's words for booleans and null, short text for the rest."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, tuple):
        return "a (key, value) pair"        # an item of !!omap or !!pairs
    if isinstance(value, (set, frozenset)):
        return "a set"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return "the date %s (quote it to make it text)" % value.isoformat()
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return repr(value[:_SHOWN_CHARS]) + "..."
    return repr(value)


def _most_specific(error: Any) -> Any:
    """For an error that only says "none of these matched" (anyOf, oneOf), the suberror that best
    says what is wrong (jsonschema's best_match: the deepest, most relevant one)."""
    if not error.context:
        return error
    from jsonschema.exceptions import best_match  # pylint: disable=import-outside-toplevel
    return best_match(error.context) or error


def _problems(error: Any) -> List[SchemaProblem]:
    where = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        shown = known + ["%s*" % p.lstrip("^") for p in patterns]     # '^x-' -> 'x-*' (extension keys)
        return [SchemaProblem(where + (key,), "unknown field '%s' (known: %s)" % (key, ", ".join(shown)),
                              where + (key,))
                for key in error.instance
                if key not in known and not any(re.search(p, str(key)) for p in patterns)]
    if error.validator == "required" and isinstance(error.instance, dict):
        name = _missing(error)
        return [SchemaProblem(where + (name,), "%s is required" % name, where)]
    return [SchemaProblem(where, _message(error), where + _about(error))]


def _missing(error: Any) -> Any:
    """The required property an error is about (jsonschema reports each missing one separately)."""
    missing = [name for name in error.validator_value if name not in error.instance]
    for name in missing:
        if error.message.startswith(repr(name)):
            return name
    return missing[0] if missing else "a field"


def _about(error: Any) -> Location:
    """For ``not: {required: [...]}`` (a field that is not taken there): that field, for its line."""
    if error.validator == "not" and isinstance(error.instance, dict):
        for name in error.validator_value.get("required", ()):
            if name in error.instance:
                return (name,)
    return ()


def _message(error: Any) -> str:
    """The user's message for one failed keyword."""
    kind, value, expected = error.validator, error.instance, error.validator_value
    custom = _x_error(error)
    if kind == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        return "expected %s, got %s" % (" or ".join(_TYPE_NAMES.get(t, t) for t in types), show_value(value))
    if kind == "enum":
        return "invalid value %s: expected one of %s" % (
            show_value(value), ", ".join(e if isinstance(e, str) else show_value(e) for e in expected))
    if kind == "const":
        return "must be %s, got %s" % (show_value(expected), show_value(value))
    if kind == "minimum":
        return "must be at least %s, got %s" % (expected, show_value(value))
    if kind == "minLength":
        return "must not be empty" if expected == 1 else "must be at least %d characters long" % expected
    if kind == "minItems":
        return "needs at least %d item(s)" % expected
    if kind == "pattern":
        return "%s: %s" % (show_value(value), custom or "does not match %s" % expected)
    if kind == "not":
        return custom or "is not allowed here"
    return " ".join(error.message.split())[:200]


def _x_error(error: Any) -> str:
    """The schema's message for users (``x-error``) beside the failed keyword, or in the ``not`` subschema."""
    schemas: List[Dict[str, Any]] = [error.schema]
    if error.validator == "not" and isinstance(error.validator_value, dict):
        schemas.insert(0, error.validator_value)
    for schema in schemas:
        if isinstance(schema, dict) and schema.get("x-error"):
            return schema["x-error"]
    return ""
