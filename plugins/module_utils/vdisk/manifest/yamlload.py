"""Read a manifest's YAML: with PyYAML's safe loader when it is installed, else a small safe subset reader.

The engine is stdlib only (it also runs as module_utils on hosts without PyYAML), so this module
carries a reader for the YAML that manifests use: block mappings and sequences, plain, single-
and double-quoted scalars, comments, one-line flow lists and mappings (``[a, b]``, ``{k: v}``),
``---``.  Scalars resolve as PyYAML's YAML 1.1 does (``off`` is false, ``0644`` is octal), so a
manifest means the same with or without PyYAML.  Anything else (anchors, tags, block scalars,
multi-line flow) is refused with its line number, never guessed.  Duplicate keys are errors with
both readers (PyYAML silently keeps the last one).
"""
import re
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ImageError
from ..units import MAX_DIGITS


class YAMLSyntaxError(ImageError):
    """The file is not YAML this reader accepts; ``line`` is 1-based."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None):
        super().__init__("line %d: %s" % (line, message) if line else message, path=path)
        self.line = line


def have_pyyaml() -> bool:
    """True when PyYAML can be imported."""
    try:
        import yaml  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    except ImportError:
        return False
    return True


def load_yaml(text: str, path: Optional[str] = None, pyyaml: Optional[bool] = None) -> Any:
    """Parse one YAML document; *pyyaml* None uses PyYAML when installed, False forces the subset reader."""
    if pyyaml is None:
        pyyaml = have_pyyaml()
    if pyyaml:
        return _load_pyyaml(text, path)
    return _Reader(text, path).document()


# -- PyYAML -------------------------------------------------------------------------------------
def _load_pyyaml(text: str, path: Optional[str]) -> Any:
    import yaml  # pylint: disable=import-outside-toplevel

    class _Loader(yaml.SafeLoader):  # pylint: disable=too-many-ancestors
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _value in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise YAMLSyntaxError("duplicate key '%s'" % key, path, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep)

        def construct_yaml_int(self, node):
            text = self.construct_scalar(node)
            return text if _too_long(text) else super().construct_yaml_int(node)

    _Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)

    try:
        return yaml.load(text, Loader=_Loader)  # nosec: a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise YAMLSyntaxError(what, path, mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise YAMLSyntaxError(str(exc).splitlines()[0], path) from None


# -- the subset reader --------------------------------------------------------------------------
_NULL = ("", "~", "null", "Null", "NULL")
_TRUE = ("yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")
_FALSE = ("no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")
_INT = re.compile(r"^[-+]?(0|[1-9][0-9_]*)$")
_OCT = re.compile(r"^[-+]?0[0-7_]+$")
_HEX = re.compile(r"^[-+]?0x[0-9a-fA-F_]+$")
_FLOAT = re.compile(r"^[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+][0-9]+)?$")
_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f", "r": "\r",
            "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\"}


class _Line:
    __slots__ = ("number", "indent", "text")

    def __init__(self, number: int, indent: int, text: str):
        self.number, self.indent, self.text = number, indent, text


class _Reader:
    def __init__(self, text: str, path: Optional[str]):
        self.path = path
        self.lines: List[_Line] = []
        for number, raw in enumerate(text.splitlines(), 1):
            body = raw.rstrip()
            stripped = body.lstrip(" ")
            if "\t" in body[:len(body) - len(stripped)] or stripped.startswith("\t"):
                raise self.error("tabs are not allowed in indentation", number)
            content = self._strip_comment(stripped, number)
            if not content:
                continue
            if content in ("---", "...") and not self.lines and content == "---":
                continue
            if content in ("---", "..."):
                if content == "---":
                    raise self.error("only one YAML document per manifest file", number)
                break
            self.lines.append(_Line(number, len(body) - len(stripped), content))

    def error(self, message: str, line: Optional[int]) -> YAMLSyntaxError:
        return YAMLSyntaxError(message, self.path, line)

    def _strip_comment(self, text: str, number: int) -> str:
        quote = None
        for i, ch in enumerate(text):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "\"'" and (i == 0 or text[i - 1] in " [{,:-"):
                quote = ch
            elif ch == "#" and (i == 0 or text[i - 1] == " "):
                return text[:i].rstrip()
        if quote:
            raise self.error("unterminated quoted string (multi-line quoted strings are not supported)", number)
        return text

    def document(self) -> Any:
        if not self.lines:
            return None
        value, index = self.block(0, self.lines[0].indent)
        if index < len(self.lines):
            line = self.lines[index]
            raise self.error("unexpected indentation or content %r" % line.text, line.number)
        return value

    def block(self, index: int, indent: int) -> Tuple[Any, int]:
        line = self.lines[index]
        if _is_item(line.text):
            return self.sequence(index, indent)
        if self._split_key(line) is not None:
            return self.mapping(index, indent)
        value = self.inline(line.text, line.number)
        if index + 1 < len(self.lines) and self.lines[index + 1].indent > indent:
            raise self.error("multi-line plain scalars are not supported", self.lines[index + 1].number)
        return value, index + 1

    def sequence(self, index: int, indent: int) -> Tuple[List[Any], int]:
        items: List[Any] = []
        while index < len(self.lines) and self.lines[index].indent == indent and _is_item(self.lines[index].text):
            line = self.lines[index]
            rest = line.text[1:].lstrip(" ")
            if not rest:
                index += 1
                if index < len(self.lines) and self.lines[index].indent > indent:
                    value, index = self.block(index, self.lines[index].indent)
                else:
                    value = None
            else:
                # "- key: value" starts a mapping (or nested sequence) indented where "key" stands
                inner = indent + len(line.text) - len(rest)
                self.lines[index] = _Line(line.number, inner, rest)
                value, index = self.block(index, inner)
            items.append(value)
        self._check_dedent(index, indent)
        return items, index

    def mapping(self, index: int, indent: int) -> Tuple[Dict[Any, Any], int]:
        out: Dict[Any, Any] = {}
        while index < len(self.lines) and self.lines[index].indent == indent:
            line = self.lines[index]
            split = self._split_key(line)
            if split is None:
                raise self.error("expected 'key: value', got %r" % line.text, line.number)
            key, rest = split
            if key in out:
                raise self.error("duplicate key '%s'" % key, line.number)
            index += 1
            if rest:
                if rest[0] in "|>":
                    raise self.error("block scalars (| and >) are not supported without PyYAML", line.number)
                out[key] = self.inline(rest, line.number)
                if index < len(self.lines) and self.lines[index].indent > indent:
                    raise self.error("unexpected indentation after '%s: %s'" % (key, rest),
                                     self.lines[index].number)
            elif index < len(self.lines) and (self.lines[index].indent > indent or (
                    self.lines[index].indent == indent and _is_item(self.lines[index].text))):
                out[key], index = self.block(index, self.lines[index].indent)
            else:
                out[key] = None
        self._check_dedent(index, indent)
        return out, index

    def _check_dedent(self, index: int, indent: int) -> None:
        if index < len(self.lines) and self.lines[index].indent > indent:
            raise self.error("unexpected indentation", self.lines[index].number)

    def _split_key(self, line: _Line) -> Optional[Tuple[Any, str]]:
        text = line.text
        if text[0] in "\"'":
            end = _quoted_end(text, 0)
            if end is None:
                raise self.error("unterminated quoted string", line.number)
            rest = text[end:].lstrip(" ")
            if not rest.startswith(":"):
                return None
            return self.inline(text[:end], line.number), rest[1:].strip()
        if text[0] in "[{&*!|>%@`":
            if text[0] in "&*!":
                raise self.error("anchors, aliases and tags are not supported without PyYAML", line.number)
            return None
        match = re.match(r"^([^:#]*?[^\s:#]?)\s*:(?:\s+(.*))?$", text)
        if not match or not match.group(1).strip():
            return None
        return _scalar(match.group(1).strip()), (match.group(2) or "").strip()

    def inline(self, text: str, number: int) -> Any:
        value, end = self.flow(text, 0, number, top=True)
        if text[end:].strip():
            raise self.error("unexpected text after a value: %r" % text[end:].strip(), number)
        return value

    def flow(self, text: str, pos: int, number: int, top: bool = False) -> Tuple[Any, int]:
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos >= len(text):
            return None, pos
        ch = text[pos]
        if ch in "&*!":
            raise self.error("anchors, aliases and tags are not supported without PyYAML", number)
        if ch in "\"'":
            end = _quoted_end(text, pos)
            if end is None:
                raise self.error("unterminated quoted string", number)
            return self._unquote(text[pos:end], number), end
        if ch in "[{":
            return self._collection(text, pos, number)
        stop = len(text) if top else _plain_end(text, pos)
        raw = text[pos:stop].strip()
        if top and ": " in raw:
            raise self.error("mapping values are not allowed here: %r" % raw, number)
        return _scalar(raw), stop

    def _collection(self, text: str, pos: int, number: int) -> Tuple[Any, int]:
        close = "]" if text[pos] == "[" else "}"
        mapping = close == "}"
        out: Any = {} if mapping else []
        pos += 1
        while True:
            while pos < len(text) and text[pos] == " ":
                pos += 1
            if pos >= len(text):
                raise self.error("flow collection not closed on its line (multi-line flow is not supported)",
                                 number)
            if text[pos] == close:
                return out, pos + 1
            if mapping:
                key, pos = self.flow(text, pos, number)
                while pos < len(text) and text[pos] == " ":
                    pos += 1
                if pos >= len(text) or text[pos] != ":":
                    raise self.error("expected ':' after key %r in a flow mapping" % (key,), number)
                value, pos = self.flow(text, pos + 1, number)
                if key in out:
                    raise self.error("duplicate key '%s'" % key, number)
                out[key] = value
            else:
                value, pos = self.flow(text, pos, number)
                out.append(value)
            while pos < len(text) and text[pos] == " ":
                pos += 1
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif pos < len(text) and text[pos] != close:
                raise self.error("expected ',' or '%s' in a flow collection" % close, number)

    def _unquote(self, token: str, number: int) -> str:
        body = token[1:-1]
        if token[0] == "'":
            return body.replace("''", "'")
        out: List[str] = []
        i = 0
        while i < len(body):
            ch = body[i]
            if ch != "\\":
                out.append(ch)
                i += 1
                continue
            code = body[i + 1:i + 2]
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
                i += 2
            elif code in ("x", "u", "U"):
                width = {"x": 2, "u": 4, "U": 8}[code]
                digits = body[i + 2:i + 2 + width]
                if not re.match(r"^[0-9a-fA-F]{%d}$" % width, digits):
                    raise self.error("invalid escape \\%s%s" % (code, digits), number)
                out.append(chr(int(digits, 16)))
                i += 2 + width
            else:
                raise self.error("invalid escape \\%s" % code, number)
        return "".join(out)


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _quoted_end(text: str, pos: int) -> Optional[int]:
    """The index after the quoted string starting at *pos*, or None when it is not closed."""
    quote = text[pos]
    i = pos + 1
    while i < len(text):
        if quote == "'" and text[i] == "'":
            if text[i + 1:i + 2] == "'":
                i += 2
                continue
            return i + 1
        if quote == '"':
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                return i + 1
        i += 1
    return None


def _plain_end(text: str, pos: int) -> int:
    """Where a plain scalar inside a flow collection ends."""
    i = pos
    while i < len(text) and text[i] not in ",]}" and not (text[i] == ":" and text[i + 1:i + 2] in (" ", "")):
        i += 1
    return i


def _too_long(number: str) -> bool:
    """An integer with more significant digits than any field takes: it is kept as its text, so
    the field's own parser (units.parse_size, parse_int) refuses it as too large, naming the field
    (int() of it would take quadratic time, or raise ValueError past Python's 4300 digits)."""
    body = number.replace("_", "").lstrip("+-")
    if body[:2].lower() in ("0x", "0o", "0b"):
        body = body[2:]
    return len(body.lstrip("0")) > MAX_DIGITS


def _scalar(raw: str) -> Any:
    """Resolve a plain scalar as PyYAML's YAML 1.1 resolver does."""
    if raw in _NULL:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    plain = raw.replace("_", "")
    if (_INT.match(raw) or _OCT.match(raw) or _HEX.match(raw)) and _too_long(plain):
        return raw
    if _INT.match(raw):
        return int(plain)
    if _OCT.match(raw):
        return int(plain, 8)
    if _HEX.match(raw):
        return int(plain, 16)
    if _FLOAT.match(raw) and any(c.isdigit() for c in raw):
        return float(plain)
    return raw
