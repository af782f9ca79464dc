"""Read a manifest's YAML with PyYAML's safe loader, remembering where everything was written.

Mappings load as :class:`MarkedDict` and sequences as :class:`MarkedList`: a dict and a list (the
JSON Schema validator and the state layer take them as such) that also know the 1-based line of
the node, of each key or item, and -- for integer values -- the text the number was written as:
``mode: 0640`` and ``mode: 640`` both load as integers, and only the text tells that the second
is the decimal number 640.

Anchors, aliases, merge keys (``<<: *base``) and block scalars work as PyYAML reads them; tags are
those of the safe loader.  Beyond PyYAML: a key written twice in one mapping is an error (keys
brought in by a merge key may be overridden), and a document nested deeper than a bound, or
expanding through its aliases to more nodes than a bound (a "billion laughs" document), is refused
before anything is constructed.  Every failure is a :class:`YAMLProblem`: one line, and its line
number when there is one.

PyYAML is imported when a manifest is read, not when this module is imported: the Ansible module
imports the manifest code on managed hosts that may have only the standard library.
"""
import functools
from typing import Any, Dict, List, Optional, Sequence

from ..errors import MissingPackage
from ..units import MAX_DIGITS

TOO_DEEP = "the manifest's structure is too deep (nested more than %d levels)"
_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class MarkedDict(dict):
    """A YAML mapping: ``line`` is where it starts, ``key_lines[key]`` where each key is written, and
    ``int_texts[key]`` the text of each integer value as written (``0640``, ``640``, ``0x1a0``)."""

    def __init__(self, line: Optional[int] = None):
        super().__init__()
        self.line = line
        self.key_lines: Dict[Any, int] = {}
        self.int_texts: Dict[Any, str] = {}


class MarkedList(list):
    """A YAML sequence: ``line`` is where it starts, ``item_lines[i]`` where item *i* starts."""

    def __init__(self, line: Optional[int] = None):
        super().__init__()
        self.line = line
        self.item_lines: List[int] = []


class YAMLProblem(Exception):
    """The text is not a manifest this reader takes: ``message`` is the one line users see and
    ``line`` (1-based) where the problem is, None when it is the whole file's."""

    def __init__(self, message: str, line: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.line = line


def load_marked(text: str, max_depth: int, max_nodes: int) -> Any:
    """The one YAML document in *text* (None when there is none), with marked mappings and sequences.

    Raises :class:`YAMLProblem` for invalid YAML, a duplicate key, a document nested deeper than
    *max_depth* levels or with more than *max_nodes* nodes once its aliases are expanded; and
    :class:`~..errors.MissingPackage` when PyYAML is not installed.
    """
    yaml = _import_yaml()
    loader = None
    try:
        base = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader     # libyaml's when PyYAML has it
        loader = _loader_class(base, yaml)(text)    # the pure-Python reader checks the characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_bounds(node, max_depth, max_nodes)
        return loader.construct_document(node)
    except RecursionError:
        # the pure-Python composer recurses once per level; libyaml stops at 1000 levels by itself
        raise YAMLProblem(TOO_DEEP % max_depth) from None
    except yaml.MarkedYAMLError as exc:
        raise _marked_problem(exc, max_depth) from None
    except yaml.reader.ReaderError as exc:
        raise YAMLProblem("invalid YAML: unacceptable character #x%04x: %s" % (exc.character, exc.reason),
                          _line_of_character(text, exc.character)) from None
    except yaml.YAMLError as exc:
        raise YAMLProblem("invalid YAML: %s" % _one_line(str(exc))) from None
    finally:
        if loader is not None:
            loader.dispose()


def line_of(doc: Any, location: Sequence[Any]) -> Optional[int]:
    """The line of the deepest part of *location* (keys and list indexes from *doc*) that *doc* has:
    the line of the key or item itself, else of the mapping or sequence it would be in."""
    line = getattr(doc, "line", None)
    node = doc
    for part in location:
        if isinstance(node, MarkedDict) and _has_key(node, part):
            line = node.key_lines.get(part, line)
            node = node[part]
        elif isinstance(node, MarkedList) and isinstance(part, int) and 0 <= part < len(node):
            line = node.item_lines[part]
            node = node[part]
        else:
            break
    return line


def int_text(mapping: Any, key: Any) -> Optional[str]:
    """How the integer value of *key* in *mapping* was written, when it is a marked integer."""
    return mapping.int_texts.get(key) if isinstance(mapping, MarkedDict) else None


def _has_key(mapping: Dict[Any, Any], key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:       # an unhashable part: no key of a YAML mapping
        return False


def _import_yaml() -> Any:
    try:
        import yaml  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise MissingPackage("reading a manifest file", "PyYAML") from None
    return yaml


@functools.lru_cache(maxsize=None)
def _loader_class(base: type, yaml: Any) -> type:
    """The safe loader *base* with the marking constructors (made once per base)."""
    loader = type("MarkedLoader", (_Marking, base), {"ConstructorError": yaml.constructor.ConstructorError})
    loader.add_constructor("tag:yaml.org,2002:map", _Marking.construct_marked_mapping)
    loader.add_constructor("tag:yaml.org,2002:seq", _Marking.construct_marked_sequence)
    loader.add_constructor(_INT_TAG, _Marking.construct_bounded_int)
    return loader


class _Marking:
    """Constructors mixed into PyYAML's safe loader (the yaml classes they need are set by _loader_class)."""
    ConstructorError: Any = None

    def construct_marked_mapping(self, node: Any) -> Any:
        if node.id != "mapping":
            raise self.ConstructorError(None, None, "expected a mapping node, but found %s" % node.id,
                                        node.start_mark)
        mapping = MarkedDict(_line(node))
        yield mapping       # filled afterwards, so that a mapping may contain an alias of itself
        self._refuse_duplicate_keys(node)
        self.flatten_mapping(node)      # merge keys: the merged pairs first, so the mapping's own win
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise self.ConstructorError("while constructing a mapping", node.start_mark,
                                            "found unhashable key", key_node.start_mark) from None
            mapping[key] = self.construct_object(value_node)
            mapping.key_lines[key] = _line(key_node)
            if value_node.tag == _INT_TAG:
                mapping.int_texts[key] = value_node.value
            else:
                mapping.int_texts.pop(key, None)

    def construct_marked_sequence(self, node: Any) -> Any:
        if node.id != "sequence":
            raise self.ConstructorError(None, None, "expected a sequence node, but found %s" % node.id,
                                        node.start_mark)
        items = MarkedList(_line(node))
        yield items
        for child in node.value:
            items.append(self.construct_object(child))
            items.item_lines.append(_line(child))

    def construct_bounded_int(self, node: Any) -> Any:
        """An integer, or its text when it has more digits than any field takes: the field's own
        parser then refuses it as too large, naming the field (int() of it would take quadratic
        time, or raise ValueError past Python's 4300 digits)."""
        text = self.construct_scalar(node)
        return text if _too_long(text) else self.construct_yaml_int(node)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        """PyYAML's, but a value its constructor cannot read (``!!float abc``, ``!!bool x``, ``!!int ''``,
        ``2024-13-45``) is an error on its line, not a ValueError or an IndexError from the constructor."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, LookupError, AttributeError, TypeError, ArithmeticError) as exc:
            shown = repr(node.value[:60]) if isinstance(node.value, str) else "a " + node.id
            why = ": %s" % str(exc)[:100] if isinstance(exc, ValueError) else ""
            raise self.ConstructorError(None, None, "cannot read %s as %s%s" % (
                shown, node.tag.replace("tag:yaml.org,2002:", "!!"), why), node.start_mark) from None

    def _refuse_duplicate_keys(self, node: Any) -> None:
        first_lines: Dict[Any, int] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_lines.get(key)
            except TypeError:
                continue        # unhashable: refused with its line when the mapping is built
            if first is not None:
                raise YAMLProblem("invalid YAML: duplicate key '%s' (first on line %d)" % (key, first),
                                  _line(key_node))
            first_lines[key] = _line(key_node)


def _check_bounds(root: Any, max_depth: int, max_nodes: int) -> None:
    """Walk the composed document as it will be constructed -- every alias expanded where it is
    used -- without recursion, refusing it past *max_depth* levels of nesting or *max_nodes* nodes.
    The counting is what stops a "billion laughs" document: a few lines of anchors, each used ten
    times by the next, that would make every later walk (the schema, the checks) take forever."""
    stack = [(root, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise YAMLProblem("the manifest has more than %d values once its aliases (*name) are expanded; "
                              "refused" % max_nodes)
        if not isinstance(node.value, list):
            continue        # a scalar
        if depth > max_depth:
            raise YAMLProblem(TOO_DEEP % max_depth, _line(node))
        for child in node.value:
            if isinstance(child, tuple):        # a mapping's (key, value)
                stack.extend((part, depth + 1) for part in child)
            else:
                stack.append((child, depth + 1))


def _marked_problem(exc: Any, max_depth: int) -> YAMLProblem:
    """A PyYAML error with its marks as one line: what is wrong, then what was being read (and
    where, when that started on another line)."""
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    if exc.problem and "maximum nesting depth" in exc.problem:      # libyaml's own bound
        return YAMLProblem(TOO_DEEP % max_depth, line)
    if exc.problem and exc.context:
        if exc.problem.startswith("but "):
            text = "%s, %s" % (exc.context, exc.problem)
        elif exc.context_mark is not None and exc.context_mark.line + 1 != line:
            text = "%s (%s on line %d)" % (exc.problem, exc.context, exc.context_mark.line + 1)
        else:
            text = "%s (%s)" % (exc.problem, exc.context)
    else:
        text = exc.problem or exc.context or "not valid YAML"
    return YAMLProblem("invalid YAML: %s" % _one_line(text), line)


def _line_of_character(text: str, character: Any) -> Optional[int]:
    """The line of the first *character* (a code point) in *text*: the one the reader refused,
    since it refuses the first it meets.  (Its position is in bytes for libyaml, in characters
    for the pure-Python reader.)"""
    at = text.find(chr(character)) if isinstance(character, int) and 0 <= character <= 0x10FFFF else -1
    return text.count("\n", 0, at) + 1 if at >= 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _line(node: Any) -> int:
    return node.start_mark.line + 1


def _too_long(number: str) -> bool:
    """Whether an integer's text has more significant digits than any field takes (units.MAX_DIGITS)."""
    body = number.replace("_", "").lstrip("+-")
    if body[:2].lower() in ("0x", "0o", "0b"):
        body = body[2:]
    return len(body.lstrip("0")) > MAX_DIGITS
