"""fetch_model writes the template training and eval render with, and mlx-lm's tool parser.

One source of truth: the source tokenizer (TOOL_TEMPLATE as fallback), the
tokenizer ``mlx_lm.load`` builds from the fetched directory, and the call the
server makes (``TokenizerWrapper.apply_chat_template(..., tools=, tokenize=True)``)
give the same text and ids; the server's own text state machine and parser turn
our completions, several calls included, back into the calls.
"""

import json

import pytest
from tiny_model import make_tiny_model

from toolcall.bfcl.rows import gold_calls
from toolcall.calls.prompts import PromptFormat, TOOL_PARSER, TOOL_TEMPLATE, tool_specs
from toolcall.model.fetch import fetch_model
from test_modelio import model_config
from test_data import fixture_rows


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    source = make_tiny_model(tmp_path_factory.mktemp("source"))
    fetched = fetch_model(model_config(source="local", path=str(source)), tmp_path_factory.mktemp("m") / "base")
    return source, fetched


def rows_by_category():
    rows = {}
    for r in fixture_rows():
        rows.setdefault(r["category"], r)
    return list(rows.values())


def test_fetched_directory_carries_tool_template_and_parser(dirs):
    import mlx_lm
    from mlx_lm.tool_parsers import json_tools

    _, fetched = dirs
    config = json.loads((fetched / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TOOL_TEMPLATE and config["tool_parser_type"] == TOOL_PARSER
    _, tokenizer = mlx_lm.load(str(fetched))
    assert tokenizer.has_tool_calling and tokenizer.tool_parser is json_tools.parse_tool_call
    fmt = PromptFormat(tokenizer)
    # The tokenizer's own template now renders tools, yet validation still reports it as the project's.
    assert fmt.native and fmt.template is None and fmt.template_source == "project"


def test_a_template_that_renders_tools_is_kept(tmp_path):
    from test_prompts_validate import NATIVE

    out = fetch_model(model_config(source="local", path=str(make_tiny_model(tmp_path / "src", chat_template=NATIVE))),
                      tmp_path / "base")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == NATIVE and "tool_parser_type" not in config


def test_source_fallback_loaded_model_and_server_render_identically(dirs):
    import mlx_lm
    from mlx_lm.utils import load_tokenizer

    source, fetched = dirs
    fallback = PromptFormat(load_tokenizer(source))  # the source ignores tools: TOOL_TEMPLATE as fallback
    assert not fallback.native and fallback.template_source == "project"
    _, served = mlx_lm.load(str(fetched))
    rows = rows_by_category()
    assert len(rows) == 4
    for row in rows:
        calls = gold_calls(row["ground_truth"])
        prompt = fallback.prompt(row["messages"], row["functions"])
        assert "<tools>" in prompt and row["functions"][0]["name"] in prompt
        for style in ("structured", "content"):  # the format ablation's two arms
            for tok in (served, served._tokenizer):
                fmt = PromptFormat(tok, style=style)
                assert fmt.prompt(row["messages"], row["functions"]) == prompt
                assert fmt.completion(row["messages"], row["functions"], calls) == PromptFormat(
                    fallback.tokenizer, style=style).completion(row["messages"], row["functions"], calls)
        # What mlx_lm.server does with a chat request (server.py, ResponseGenerator._tokenize).
        ids = served.apply_chat_template(
            json.loads(json.dumps(row["messages"])), add_generation_prompt=True,
            tools=json.loads(json.dumps(tool_specs(row["functions"]))), tokenize=True,
        )
        assert list(ids) == fallback.encode(prompt)


def test_server_parser_reads_our_completions_back(dirs):
    """The server's own state machine and ToolCallFormatter on our completion text (two calls here)."""
    import mlx_lm
    from mlx_lm.generate import TextStateMachine, make_text_state_machine
    from mlx_lm.server import ToolCallFormatter

    _, fetched = dirs
    _, tokenizer = mlx_lm.load(str(fetched))
    fmt = PromptFormat(tokenizer)
    row = next(r for r in rows_by_category() if r["category"] == "parallel_multiple")
    calls = gold_calls(row["ground_truth"])
    assert len(calls) >= 2
    text = fmt.completion(row["messages"], row["functions"], calls)
    assert text.count("</tool_call>\n<tool_call>") == len(calls) - 1

    sm = make_text_state_machine(tokenizer)
    state = sm.make_state("normal")
    segments = []
    for token in tokenizer.encode(text, add_special_tokens=False):  # token by token, as generated
        state, parts = TextStateMachine.split(state, tokenizer.decode([token]))
        segments += parts
    blocks, current, plain = [], None, ""
    for name, piece in segments:
        if name == "tool":
            current = (current or "") + piece
        else:
            if current is not None:
                blocks.append(current)
                current = None
            plain += piece
    out = ToolCallFormatter(tokenizer.tool_parser, tool_specs(row["functions"]))(blocks)
    assert [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])} for c in out] == calls
    # Between and after the calls only the separator newline and the end-of-turn token remain.
    assert plain.replace(tokenizer.eos_token, "").strip() == ""
