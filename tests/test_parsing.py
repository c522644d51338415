"""toolcall.calls.parsing: <tool_call> blocks to calls, and every way that can fail."""

import json
import random

import pytest

from toolcall.calls.parsing import ParseResult, UnbalancedTagsError, extract_json_blocks, parse_calls


def block(obj, pad="\n"):
    return f"<tool_call>{pad}{json.dumps(obj) if not isinstance(obj, str) else obj}{pad}</tool_call>"


CALL = {"name": "f", "arguments": {"x": 1, "s": "a b"}}


def test_qwen_style_single_call():
    assert parse_calls(block(CALL)) == ParseResult([CALL], None)


def test_several_calls_whitespace_and_surrounding_text():
    other = {"name": "g", "arguments": {}}
    text = "Sure, calling both.\n" + block(CALL) + "\n" + block(other, pad="  ") + block(CALL, pad="")
    assert parse_calls(text) == ParseResult([CALL, other, CALL], None)


def test_no_call():
    for text in ["", "The answer is 4.", "tool_call {}", "<tool_call", "<TOOL_CALL>{}</TOOL_CALL>"]:
        assert parse_calls(text) == ParseResult([], "parse:no_call"), text


@pytest.mark.parametrize(
    "text",
    [
        "</tool_call>",
        '{"name": "f", "arguments": {}}</tool_call>',
        block(CALL) + "</tool_call>",
        "<tool_call><tool_call>" + json.dumps(CALL) + "</tool_call></tool_call>",
        "<tool_call>" + json.dumps(CALL) + block(CALL),  # an open block before the last one
    ],
)
def test_unbalanced_or_nested_tags(text):
    assert parse_calls(text) == ParseResult([], "parse:unbalanced_tags")
    with pytest.raises(UnbalancedTagsError):
        extract_json_blocks(text)


def test_final_block_may_lack_its_closing_tag():
    assert parse_calls(block(CALL) + "\n<tool_call>\n" + json.dumps(CALL) + "\n") == ParseResult([CALL, CALL], None)
    # ... but its JSON must be complete and alone up to the end of the text
    assert parse_calls("<tool_call>\n" + json.dumps(CALL)[:-3]) == ParseResult([], "parse:malformed_json")
    assert parse_calls("<tool_call>" + json.dumps(CALL) + " done") == ParseResult([], "parse:malformed_json")


@pytest.mark.parametrize("inner", ["", "{name: 'f'}", '{"name": "f", "arguments": {}', "{'name': 'f', 'arguments': {}}", "[[[" * 100000])
def test_malformed_json(inner):
    assert parse_calls(block(CALL) + block(inner)) == ParseResult([], "parse:malformed_json")


@pytest.mark.parametrize(
    "obj",
    [
        [CALL],  # an array of calls in one block
        "null",
        "42",
        {"arguments": {}},  # no name
        {"name": 3, "arguments": {}},
        {"name": "f"},  # no arguments
        {"name": "f", "arguments": [1]},
        {"name": "f", "arguments": "[1]"},  # a JSON string, but not of an object
        {"name": "f", "arguments": "{oops"},
        {"name": "f", "arguments": {}, "parameters": {}},  # ambiguous
    ],
)
def test_bad_call_shape(obj):
    assert parse_calls(block(CALL) + block(obj)) == ParseResult([], "parse:bad_call_shape")


def test_arguments_as_json_string_and_parameters_alias():
    encoded = {"name": "f", "arguments": json.dumps(CALL["arguments"])}
    alias = {"name": "f", "parameters": CALL["arguments"], "id": "call_0"}  # other keys are ignored
    assert parse_calls(block(encoded) + block(alias)) == ParseResult([CALL, CALL], None)


def test_extract_json_blocks_gives_raw_stripped_text():
    text = "x<tool_call>\n {bad json} \n</tool_call>y<tool_call>{}</tool_call><tool_call> [1"
    assert extract_json_blocks(text) == ["{bad json}", "{}", "[1"]
    assert extract_json_blocks("no tags") == []


def test_repair_is_applied_only_when_json_fails():
    seen = []

    def repair(text):
        seen.append(text)
        return text.replace("'", '"')

    good = block(CALL)
    assert parse_calls(good, repair=repair) == ParseResult([CALL], None, repaired=False)
    assert seen == []
    single_quoted = block(CALL).replace('"', "'")
    assert parse_calls(good + single_quoted, repair=repair) == ParseResult([CALL, CALL], None, repaired=True)
    assert seen == [json.dumps(CALL).replace('"', "'")]  # the stripped block text, once
    # a repair that does not help leaves the output malformed
    assert parse_calls(block("{oops"), repair=lambda t: t) == ParseResult([], "parse:malformed_json")
    # without repair the same text is malformed
    assert parse_calls(single_quoted) == ParseResult([], "parse:malformed_json")


def test_never_raises_on_random_text():
    rng = random.Random(0)
    pieces = ["<tool_call>", "</tool_call>", "\n", " ", "{", "}", "[", "]", '"', ":", ",", "name", "arguments",
              "parameters", '"name": "f"', '"arguments": {}', '"arguments": "{}"', "null", "1e999", "NaN", "-",
              "\\u00", "\\", "\x00", "é", "\ud800", "9" * 5000, "tool_call", "<", ">", "/"]
    errors = set()
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        if rng.random() < 0.2:
            text += "".join(chr(rng.randrange(0x30000)) for _ in range(rng.randrange(20)))
        result = parse_calls(text)
        assert isinstance(result, ParseResult)
        assert (result.error_type is None) == bool(result.calls)  # an error never keeps calls
        errors.add(result.error_type)
    assert {"parse:no_call", "parse:unbalanced_tags", "parse:malformed_json", "parse:bad_call_shape"} <= errors
