"""Templates round-trip every gold call; validation drops bad rows with a reason."""

import copy
import json

import pytest
from tiny_model import make_tiny_model

from toolcall.bfcl.rows import gold_calls
from toolcall.bfcl.validate import excess_drops, validate_rows
from toolcall.calls.parsing import parse_calls
from toolcall.calls.prompts import CALL_END, PromptFormat, TOOL_TEMPLATE, template_supports_tools
from toolcall.calls.schema import to_json_schema
from test_data import fixture_extra, fixture_rows

# A template that renders tools natively (Qwen2.5's layout, shortened).
NATIVE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    plain = load_tokenizer(make_tiny_model(tmp_path_factory.mktemp("plain")))
    native = load_tokenizer(make_tiny_model(tmp_path_factory.mktemp("native"), chat_template=NATIVE))
    return plain, native


def test_template_choice_follows_tool_support(tokenizers):
    plain, native = tokenizers
    assert not template_supports_tools(plain) and PromptFormat(plain).template == TOOL_TEMPLATE
    assert template_supports_tools(native) and PromptFormat(native).template is None


@pytest.mark.parametrize("which", [0, 1])
def test_every_gold_call_round_trips_through_the_template(tokenizers, which):
    fmt = PromptFormat(tokenizers[which])
    for row in fixture_rows():
        calls = gold_calls(row["ground_truth"])
        completion = fmt.completion(row["messages"], row["functions"], calls)
        assert completion.endswith("<|im_end|>") and completion.count("<tool_call>") == len(calls)
        assert parse_calls(completion).calls == calls, row["id"]
        tokens, prompt_len = fmt.example(row, calls)
        assert fmt.tokenizer.decode(tokens[prompt_len:]) == completion


@pytest.mark.parametrize("which", [0, 1])
def test_the_decision_weight_lands_on_the_token_after_each_call(tokenizers, which):
    """sft.decision_weight: the token after each </tool_call> (another call, or the turn's end) and no other."""
    fmt = PromptFormat(tokenizers[which])
    for row in fixture_rows():
        calls = gold_calls(row["ground_truth"])
        tokens, prompt_len, weights = fmt.example(row, calls, decision_weight=3.0)
        assert (tokens, prompt_len) == fmt.example(row, calls)  # the weights change nothing else
        completion = tokens[prompt_len:]
        picked = [i for i, w in enumerate(weights) if w == 3.0]
        assert len(weights) == len(completion) and len(picked) == len(calls) and set(weights) == {1.0, 3.0}
        for n, i in enumerate(picked):
            assert fmt.tokenizer.decode(completion[:i]).endswith(CALL_END), row["id"]
            rest = fmt.tokenizer.decode(completion[i:])
            assert rest.startswith("<|im_end|>") if n == len(calls) - 1 else rest.lstrip().startswith("<tool_call>")


def test_a_completion_without_a_closing_tag_has_no_decision_token(tokenizers):
    fmt = PromptFormat(tokenizers[0])
    text = "no call here<|im_end|>"
    with pytest.raises(ValueError, match="no '</tool_call>' in the completion"):
        fmt.decision_tokens(text, fmt.encode(text))


def test_prompt_shows_json_schema_types_and_keeps_unicode(tokenizers):
    fmt = PromptFormat(tokenizers[0])
    fn = {"name": "f", "description": "d", "parameters": {"type": "dict", "properties": {
        "x": {"type": "float"}, "t": {"type": "tuple", "items": {"type": "any"}}}, "required": ["x"]}}
    prompt = fmt.prompt([{"role": "user", "content": "héllo"}], [fn])
    assert '"type": "object"' in prompt and '"type": "number"' in prompt and '"dict"' not in prompt
    assert to_json_schema(fn["parameters"])["properties"]["t"] == {"type": "array", "items": {"type": "string"}}
    calls = [{"name": "f", "arguments": {"x": 1.5, "t": ["naïve \"quoted\" {braces} <b>?"]}}]
    completion = fmt.completion([{"role": "user", "content": "q"}], [fn], calls)
    assert parse_calls(completion).calls == calls


def test_content_style_renders_calls_as_plain_text(tokenizers):
    fmt = PromptFormat(tokenizers[1], style="content")
    row = fixture_rows()[0]
    calls = gold_calls(row["ground_truth"])
    completion = fmt.completion(row["messages"], row["functions"], calls)
    assert "<tool_call>{" in completion and parse_calls(completion).calls == calls
    with pytest.raises(ValueError, match="unknown prompt style"):
        PromptFormat(tokenizers[0], style="markdown")


def broken(row, how):
    row = copy.deepcopy(row)
    if how == "unknown_function":
        row["ground_truth"] = [{"no_such_fn": {}}]
    elif how == "missing_required":
        fn = row["functions"][0]
        req = fn["parameters"]["required"][0]
        for entry in row["ground_truth"]:
            entry.get(fn["name"], {}).pop(req, None)
    elif how == "bad_type":
        fn = row["functions"][0]
        next(iter(fn["parameters"]["properties"].values()))["type"] = "banana"
    elif how == "empty":
        row["ground_truth"] = []
    elif how == "required_not_in_properties":
        row["functions"][0]["parameters"]["required"].append("ghost")
    return row


def test_validation_drops_bad_rows_with_reasons(tokenizers):
    fmt = PromptFormat(tokenizers[0])
    good = [r for r in fixture_rows() if r["category"] == "simple"]
    bad = [broken(good[0], h) for h in
           ("unknown_function", "missing_required", "bad_type", "empty", "required_not_in_properties")]
    kept, report = validate_rows(good + bad, fmt, max_seq_len=4096)
    assert [r["id"] for r in kept] == [r["id"] for r in good]
    assert report["n_dropped"] == 5 and report["reasons"] == {
        "gold:unknown_function": 1, "gold:missing_required": 1, "schema:bad_type": 1,
        "gold:empty_or_malformed": 1, "schema:required_not_in_properties": 1}
    _, short = validate_rows(good, fmt, max_seq_len=64)
    assert short["reasons"] == {"target:too_long": len(good)}
    json.dumps(report)  # the metrics file must be serializable


def test_every_extra_fixture_row_validates_and_counts_by_source(tokenizers):
    fmt = PromptFormat(tokenizers[0])
    extra = [r for rows in fixture_extra().values() for r in rows]
    kept, report = validate_rows(fixture_rows()[:12] + extra, fmt, max_seq_len=8192)
    assert len(kept) == 12 + len(extra)  # the exec answers, parsed, pass the AST check and round-trip
    assert report["by_source"]["paper"] == {"n_in": 12, "n_kept": 12, "reasons": {}}
    assert report["by_source"]["exec_parallel_multiple"] == {"n_in": 3, "n_kept": 3, "reasons": {}}


def test_too_long_rows_of_an_extra_source_do_not_count_as_a_broken_source(tokenizers):
    fmt = PromptFormat(tokenizers[0])
    paper = [r for r in fixture_rows() if r["category"] == "simple"]
    extra = [{**r, "source": "live_simple"} for r in paper]
    _, report = validate_rows(paper + extra, fmt, max_seq_len=64)  # every row is too long
    assert report["by_source"]["live_simple"]["reasons"] == {"target:too_long": 12}
    assert excess_drops(report, 0.05) == {"paper": (1.0, {"target:too_long": 12})}
    bad = [broken(r, "unknown_function") for r in extra[:2]] + extra[2:]
    _, report = validate_rows(paper + bad, fmt, max_seq_len=4096)
    assert excess_drops(report, 0.05) == {"live_simple": (2 / 12, {"gold:unknown_function": 2})}
    assert excess_drops(report, 0.2) == {}


def test_hub_data_source_reads_a_snapshot_layout(monkeypatch, tmp_path):
    """The hub source cannot be reached here: serve its files from a local snapshot."""
    import huggingface_hub

    from test_data import FILES, FIXTURE
    from toolcall.bfcl.sources import read_source

    calls = []

    def fake_download(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type, revision))
        return str(FIXTURE / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    raw = read_source("hub", FILES, hub_repo="gorilla-llm/Berkeley-Function-Calling-Leaderboard", hub_revision="v1")
    local = read_source("local", FILES, local_dir=FIXTURE)
    assert raw == local
    assert ("gorilla-llm/Berkeley-Function-Calling-Leaderboard", "possible_answer/BFCL_v4_multiple.json", "dataset", "v1") in calls
