"""A JSON Schema (draft 7) subset validator: the keywords ``manifest.schema.json`` uses, stdlib only.

Supported: ``type``, ``enum``, ``const``, ``properties``, ``required``, ``additionalProperties``,
``items`` (one schema), ``minItems``, ``minLength``, ``minimum``, ``pattern``, ``allOf``, ``not``
and local ``$ref`` (``#/definitions/...``).  Unknown keywords are ignored, as the standard says.
The non-standard ``x-error`` replaces the generic message of a failed ``pattern`` or ``not``
with one written for users.  Every problem is reported, not only the first: a :class:`Problem`
names the JSON location (``("images", 2, "size")``) and says what is wrong in one line.
"""
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

Location = Tuple[Any, ...]

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
          "number": "a number", "boolean": "a boolean (true/false)", "null": "null"}


@dataclass
class Problem:
    """One violation: where (``location``, a tuple of keys and list indexes) and what."""
    location: Location
    message: str


def validate(instance: Any, schema: Dict[str, Any]) -> List[Problem]:
    """Every violation of *schema* by *instance*, in document order (empty list: valid)."""
    problems: List[Problem] = []
    _check(instance, schema, schema, (), problems)
    return problems


def _resolve(root: Dict[str, Any], ref: str) -> Dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError("only local $ref are supported: %s" % ref)
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _check(value: Any, schema: Dict[str, Any], root: Dict[str, Any], where: Location,
           problems: List[Problem]) -> None:
    if "$ref" in schema:       # draft 7: keywords beside $ref are ignored
        _check(value, _resolve(root, schema["$ref"]), root, where, problems)
        return
    for sub in schema.get("allOf", ()):
        _check(value, sub, root, where, problems)
    if "not" in schema:
        if validate_quietly(value, schema["not"], root):
            problems.append(Problem(where, schema["not"].get("x-error") or "is not allowed here"))
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[t](value) for t in types):
            problems.append(Problem(where, "expected %s, got %s" % (" or ".join(_NAMES[t] for t in types),
                                                                    _show(value))))
            return     # the other keywords would only repeat the mismatch
    if "const" in schema and value != schema["const"]:
        problems.append(Problem(where, "must be %s, got %s" % (_show(schema["const"]), _show(value))))
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        problems.append(Problem(where, "invalid value %s: expected one of %s"
                                % (_show(value), ", ".join(_show(e) for e in schema["enum"]))))
    if isinstance(value, dict):
        _check_object(value, schema, root, where, problems)
    elif isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            problems.append(Problem(where, "needs at least %d item(s)" % schema["minItems"]))
        if "items" in schema:
            for index, item in enumerate(value):
                _check(item, schema["items"], root, where + (index,), problems)
    elif isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(Problem(where, "must not be empty" if schema["minLength"] == 1
                                    else "must be at least %d characters long" % schema["minLength"]))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(Problem(where, "%s: %s" % (_show(value), schema.get("x-error") or
                                                       "does not match %s" % schema["pattern"])))
    elif _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(Problem(where, "must be at least %s, got %s" % (schema["minimum"], value)))


def _check_object(value: Dict[str, Any], schema: Dict[str, Any], root: Dict[str, Any], where: Location,
                  problems: List[Problem]) -> None:
    properties = _properties(schema, root)
    for name in schema.get("required", ()):
        if name not in value:
            problems.append(Problem(where + (name,), "is required"))
    for name, item in value.items():
        if name in schema.get("properties", {}):
            _check(item, schema["properties"][name], root, where + (name,), problems)
        elif schema.get("additionalProperties") is False:
            problems.append(Problem(where + (name,), "unknown key '%s' (known: %s)"
                                    % (name, ", ".join(properties))))


def _properties(schema: Dict[str, Any], root: Dict[str, Any]) -> List[str]:
    """The property names a schema declares, own and through ``allOf``/``$ref`` (for messages)."""
    if "$ref" in schema:
        return _properties(_resolve(root, schema["$ref"]), root)
    names = list(schema.get("properties", {}))
    for sub in schema.get("allOf", ()):
        names.extend(n for n in _properties(sub, root) if n not in names)
    return names


def validate_quietly(value: Any, schema: Dict[str, Any], root: Dict[str, Any]) -> bool:
    """True when *value* is valid against *schema* (a part of *root*)."""
    problems: List[Problem] = []
    _check(value, schema, root, (), problems)
    return not problems


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
