"""Parse a model's generated text into tool calls.

The expected format is Qwen/Hermes style, one block per call, blocks one
after another, whitespace (e.g. Qwen's newlines) allowed inside the tags::

    <tool_call>
    {"name": "fn", "arguments": {"x": 1}}
    </tool_call>

Text outside the blocks is ignored. Any error makes the whole output count as
no calls (``calls == []``): a partly valid output is not scored as partly
right. ``error_type`` is one of

* ``parse:no_call`` -- no tag at all;
* ``parse:unbalanced_tags`` -- a closing tag without an open block, or a block
  opened inside another one. A last block whose closing tag is missing at the
  very end of the text is accepted (generation may stop at end-of-turn right
  after the JSON); its text runs to the end, so if the JSON there is truncated
  or followed by anything the result is ``parse:malformed_json``;
* ``parse:malformed_json`` -- a block is not valid JSON;
* ``parse:bad_call_shape`` -- a block is not an object with a string ``name``
  and an object ``arguments``. ``arguments`` may also be a JSON string that
  decodes to an object, and ``parameters`` is accepted in its place (both at
  once is ambiguous, hence an error). Other keys are ignored.

Standard library only; ``parse_calls`` never raises on a str (only the
optional ``repair`` function, which is the caller's, may).
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ParseResult", "UnbalancedTagsError", "extract_json_blocks", "parse_calls"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_TAG = re.compile(r"</?tool_call>")


@dataclass(frozen=True)
class ParseResult:
    calls: list[dict] = field(default_factory=list)  # [{"name": str, "arguments": dict}]
    error_type: str | None = None  # None exactly when parsing succeeded
    repaired: bool = False  # some block parsed only after the repair function


class UnbalancedTagsError(ValueError):
    """The ``<tool_call>`` tags do not pair up (see the module docstring)."""


def extract_json_blocks(text):
    """Return the raw text inside each ``<tool_call>`` block, in order, stripped.

    No tag gives ``[]``; unbalanced or nested tags raise UnbalancedTagsError.
    A final block left open at the end of the text runs to the end.
    """
    blocks, start = [], None  # start: where the open block's text begins
    for tag in _TAG.finditer(text):
        if tag.group() == OPEN:
            if start is not None:
                raise UnbalancedTagsError(f"{OPEN} at {tag.start()} inside an open block")
            start = tag.end()
        else:
            if start is None:
                raise UnbalancedTagsError(f"{CLOSE} at {tag.start()} without an open block")
            blocks.append(text[start : tag.start()].strip())
            start = None
    if start is not None:
        blocks.append(text[start:].strip())
    return blocks


def parse_calls(text: str, *, repair: Callable[[str], str] | None = None) -> ParseResult:
    """Parse ``text`` into ``[{"name", "arguments"}]`` or say why not.

    ``repair``, if given, rewrites a block's text and is tried only when the
    block is not valid JSON as it stands, so its effect can be counted
    (``ParseResult.repaired``).
    """
    try:
        blocks = extract_json_blocks(text)
    except UnbalancedTagsError:
        return ParseResult([], "parse:unbalanced_tags")
    if not blocks:  # without an error, no block means no tag at all
        return ParseResult([], "parse:no_call")

    calls, repaired = [], False
    for block in blocks:
        obj = _loads(block)
        if obj is _INVALID and repair is not None:
            obj = _loads(repair(block))
            repaired = repaired or obj is not _INVALID
        if obj is _INVALID:
            return ParseResult([], "parse:malformed_json")
        call = _as_call(obj)
        if call is None:
            return ParseResult([], "parse:bad_call_shape")
        calls.append(call)
    return ParseResult(calls, None, repaired)


_INVALID = object()  # not valid JSON (None is valid JSON: null)


def _loads(text):
    try:
        return json.loads(text)
    # ValueError covers JSONDecodeError and over-long integers; deep nesting overflows the stack.
    except (ValueError, RecursionError):
        return _INVALID


def _as_call(obj):
    """``{"name": str, "arguments": dict}`` from a decoded block, or None if it has another shape."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if ("arguments" in obj) == ("parameters" in obj):  # neither, or ambiguous
        return None
    arguments = obj["arguments"] if "arguments" in obj else obj["parameters"]
    if isinstance(arguments, str):  # some models JSON-encode the arguments once more
        arguments = _loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return {"name": obj["name"], "arguments": arguments}
