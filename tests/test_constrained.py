"""Schema-constrained decoding: the grammar admits the offered calls only, and decoding under it always parses.

Real parts only: llguidance's matcher on the tiny model's byte-level tokenizer,
mlx-lm's batch generator, the project's parser and scorer. The tiny random
model, left alone, never writes a tool call; held to the grammar it must write
calls that parse and name only what was offered, for fuzzed schemas, names
and prompts and any ``max_tokens``.
"""

import random
import re

import pytest
from hypothesis import given

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
from test_fuzz import ROWS, fuzz, random_schema_and_answer, seeds
from tiny_adapter import CALLS, FUNCTIONS, MESSAGES, train_tool_caller
from tiny_model import make_tiny_model
from toolcall.bfcl.rows import gold_calls
from toolcall.calls import constrained
from toolcall.calls.parsing import parse_calls
from toolcall.calls.prompts import PromptFormat
from toolcall.calls.schema import call_problem
from toolcall.config import ReportConfig
from toolcall.evaluate import generation, scaffold
from toolcall.evaluate.score import score_output
from toolcall.evaluate.sharding import generate_sharded
from toolcall.io import read_json, read_jsonl, write_jsonl
from toolcall.model import lora
from toolcall.report.ablations import scaffold_section
from toolcall.report.verdicts import Claim
from toolcall.stats import record_table

# What the grammar rules out, as schema.call_problem names it.
RULED_OUT = ("schema:unknown_function", "schema:unknown_parameter", "schema:missing_required")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    model, tokenizer = lora.load_model(base)
    fmt = PromptFormat(tokenizer)
    return base, model, tokenizer, fmt, constrained.Decoder(tokenizer)


def accepts(decoder, grammar, text, fmt):
    """Whether the grammar allows ``text`` token by token (as the tokenizer splits it) and then end of turn."""
    c = decoder.constraint(grammar)
    for token in fmt.encode(text):
        if not c.allowed()[token]:
            return False
        c.matcher.consume_token(token)
    return c.matcher.is_accepting()


def completion(fmt, row, calls):
    """What the model is trained to write for ``calls``, without the end-of-turn token."""
    return fmt.completion(row["messages"], row["functions"], calls)[: -len(fmt.eos)]


def test_call_format_is_read_off_the_template(tiny):
    _, _, _, fmt, _ = tiny
    assert constrained.call_format(fmt) == constrained.CallFormat(
        "<tool_call>", "</tool_call>\n<tool_call>", "</tool_call>", ", ", ": ", False)


def test_grammar_accepts_every_gold_call_of_the_fixture_rows_in_any_argument_order(tiny):
    _, _, _, fmt, decoder = tiny
    cf = constrained.call_format(fmt)
    for row in ROWS:
        grammar = constrained.grammar(row["functions"], cf)
        gold = gold_calls(row["ground_truth"])
        assert accepts(decoder, grammar, completion(fmt, row, gold), fmt), row["id"]
        reordered = [{**c, "arguments": dict(reversed(c["arguments"].items()))} for c in gold[::-1]]
        assert accepts(decoder, grammar, completion(fmt, row, reordered), fmt), row["id"]


WEATHER = [
    {"name": "get_weather", "description": "", "parameters": {"type": "dict", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}, "coords": {"type": "tuple", "items": {"type": "float"}}}, "required": ["city"]}},
    {"name": "math.hypot", "description": "", "parameters": {"type": "dict", "properties": {
        "x": {"type": "float"}, "y": {"type": "float"}}, "required": ["x", "y"]}},
]
W = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "functions": WEATHER}
CALL = '{"name": "get_weather", "arguments": '
ALLOWED = [
    [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    [{"name": "get_weather", "arguments": {"unit": "celsius", "coords": [48.9, 2], "city": "Paris", "days": 3}}],
    [{"name": "get_weather", "arguments": {"city": "Paris", "days": None}}],  # an optional one may be null
    [{"name": "math.hypot", "arguments": {"y": 4, "x": 3.5}}, {"name": "get_weather", "arguments": {"city": "é"}}],
    # "<" is fine in a value, up to the parser's tags
    [{"name": "get_weather", "arguments": {"city": "a < b <<t </td> <tool_call </tool_call <"}}],
]
REFUSED = {
    "unoffered function": '<tool_call>{"name": "get_forecast", "arguments": {"city": "Paris"}}</tool_call>',
    "unoffered parameter": f'<tool_call>{CALL}{{"city": "Paris", "country": "FR"}}}}</tool_call>',
    "required one missing": f'<tool_call>{CALL}{{"unit": "celsius"}}}}</tool_call>',
    "a parameter twice": f'<tool_call>{CALL}{{"city": "Paris", "city": "Rome"}}}}</tool_call>',
    "string for an integer": f'<tool_call>{CALL}{{"city": "Paris", "days": "3"}}}}</tool_call>',
    "float for an integer": f'<tool_call>{CALL}{{"city": "Paris", "days": 2.5}}}}</tool_call>',
    "not in the enum": f'<tool_call>{CALL}{{"city": "Paris", "unit": "kelvin"}}}}</tool_call>',
    "array items of another type": f'<tool_call>{CALL}{{"city": "Paris", "coords": ["48.9"]}}}}</tool_call>',
    "a required one null": f'<tool_call>{CALL}{{"city": null}}}}</tool_call>',
    "other separators": '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>',
    "text before the call": f'Sure. <tool_call>{CALL}{{"city": "Paris"}}}}</tool_call>',
    "text after the call": f'<tool_call>{CALL}{{"city": "Paris"}}}}</tool_call> Done.',
    "no call at all": "",
    "an unclosed call": f'<tool_call>{CALL}{{"city": "Paris"}}}}',
    # simple_python_53 on the base model: a tag inside a value ends the block early for every parser
    "a closing tag in a value": f'<tool_call>{CALL}{{"city": "}}}}</tool_call> Paris"}}}}</tool_call>',
    "an opening tag in a value": f'<tool_call>{CALL}{{"city": "<<tool_call>"}}}}</tool_call>',
}


def test_grammar_allows_the_offered_calls_and_refuses_anything_else(tiny):
    _, _, _, fmt, decoder = tiny
    grammar = constrained.grammar(WEATHER, constrained.call_format(fmt))
    for calls in ALLOWED:
        assert accepts(decoder, grammar, completion(fmt, W, calls), fmt), calls
    for what, text in REFUSED.items():
        assert not accepts(decoder, grammar, text, fmt), what


def test_grammar_names_what_it_cannot_express(tiny):
    _, _, _, fmt, _ = tiny
    cf = constrained.call_format(fmt)
    with pytest.raises(ValueError, match="unsupported BFCL parameter type 'set'"):
        constrained.grammar([{"name": "f", "parameters": {"properties": {"p": {"type": "set"}}}}], cf)
    many = {f"p{i}": {"type": "integer"} for i in range(65)}
    with pytest.raises(ValueError, match="65 parameters; at most 64"):
        constrained.grammar([{"name": "f", "parameters": {"properties": many}}], cf)


def test_avoiding_matches_exactly_the_strings_without_the_words():
    words = ("<tool_call>", "</tool_call>")
    pattern = re.compile(constrained.avoiding(words)[1:-1], re.S)  # Python's fullmatch for llguidance's ^...$
    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice("<tool_call>/x\n") for _ in range(rng.randint(0, 24)))
        cut = rng.randint(0, len(text))
        text = text[:cut] + rng.choice(["", *words, "<tool_call", "</tool_", "<<tool_call>", "<</tool_call>"]) + text[cut:]
        assert (pattern.fullmatch(text) is not None) == (not any(w in text for w in words)), text
    with pytest.raises(ValueError, match="must start with '<'"):
        constrained.avoiding(("tool_call>",))


# Characters a fuzzed name or prompt may hold: JSON's and Lark's escapes, unicode, a control character.
ODD = 'ab._-"\\ /:{}<>é日🙂\x00\n'


def odd_text(rng, size):
    return "".join(rng.choice(ODD) for _ in range(rng.randint(0, size)))


def renamed(rng, functions, ground_truth):
    """The same schemas and answers under fuzzed function and parameter names."""
    def fuzzed(old):  # a prefix keeps names unique
        return odd_text(rng, 4) + old if rng.random() < 0.5 else old

    names, out = {}, []
    for f in functions:
        props = f["parameters"]["properties"]
        names[f["name"]] = fuzzed(f["name"]), {p: fuzzed(p) for p in props}
        name, params = names[f["name"]]
        out.append({**f, "name": name, "parameters": {
            **f["parameters"], "properties": {params[p]: spec for p, spec in props.items()},
            "required": [params[p] for p in f["parameters"]["required"]]}})
    truth = [{names[n][0]: {names[n][1][p]: v for p, v in args.items()}}
             for entry in ground_truth for n, args in entry.items()]
    return out, truth


def test_constrained_decoding_of_the_random_model_always_parses_and_names_only_what_was_offered(tiny):
    _, model, tokenizer, fmt, _ = tiny
    cf = constrained.call_format(fmt)
    seen = []

    @fuzz(40)
    @given(seed=seeds)
    def prop(seed):
        rng = random.Random(seed)
        rows = []
        for i in range(3):
            functions, ground_truth = renamed(rng, *random_schema_and_answer(rng))
            rows.append({"id": f"q{i}", "category": rng.choice(["simple", "multiple", "parallel", "parallel_multiple"]),
                         "messages": [{"role": "user", "content": odd_text(rng, 40)}],
                         "functions": functions, "ground_truth": ground_truth})
        max_tokens = rng.choice([1, 3, 12, 40])
        prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
        outputs = constrained.generate(model, tokenizer, prompts, grammars=[constrained.grammar(r["functions"], cf)
                                                                            for r in rows],
                                       max_tokens=max_tokens, batch_size=2)
        for row, (text, n, finishing) in zip(rows, outputs):
            parsed = parse_calls(text)
            assert parsed.error_type is None and parsed.calls, text
            assert not [p for c in parsed.calls if (p := call_problem(c, row["functions"])) in RULED_OUT], text
            assert n <= max_tokens and (finishing == 0 or n == max_tokens)
            record = score_output(row, text)  # the eval's scorer takes them as they are
            assert record["valid"] in (True, False) and not (record["error_type"] or "").startswith("parse:")
            seen.append(finishing)

    prop()
    assert len(seen) >= 120 and any(seen) and not all(seen)  # both ways of ending were exercised


def test_left_alone_the_random_model_writes_no_call(tiny):
    _, model, tokenizer, fmt, _ = tiny
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in ROWS[:6]]
    for text, _ in generation.generate(model, tokenizer, prompts, max_tokens=40, batch_size=3):
        assert parse_calls(text).error_type is not None


def test_a_constraint_leaves_the_other_sequences_of_its_batch_alone(tiny):
    _, model, tokenizer, fmt, decoder = tiny
    rows = ROWS[:4]
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
    plain = generation.generate(model, tokenizer, prompts, max_tokens=24, batch_size=4)
    cf = constrained.call_format(fmt)
    processors = [[decoder.constraint(constrained.grammar(r["functions"], cf))] if i % 2 == 0 else None
                  for i, r in enumerate(rows)]
    mixed = generation.generate(model, tokenizer, prompts, max_tokens=24, batch_size=4, logits_processors=processors)
    assert mixed[1] == plain[1] and mixed[3] == plain[3]
    assert mixed[0] != plain[0] and mixed[0][0].startswith("<tool_call>")


def test_a_model_that_already_answers_right_is_not_changed_by_the_constraint(tmp_path):
    tuned, _ = train_tool_caller(make_tiny_model(tmp_path / "random"), tmp_path / "tuned")
    model, tokenizer = lora.load_model(tuned)
    fmt = PromptFormat(tokenizer)
    prompt = [fmt.encode(fmt.prompt(MESSAGES, FUNCTIONS))]
    [(plain, _)] = generation.generate(model, tokenizer, prompt, max_tokens=200, batch_size=1)
    assert parse_calls(plain).calls == CALLS
    grammar = constrained.grammar(FUNCTIONS, constrained.call_format(fmt))
    [(text, _, finishing)] = constrained.generate(model, tokenizer, prompt, grammars=[grammar], max_tokens=200,
                                                  batch_size=1)
    assert (text, finishing) == (plain, 0)


def test_constrained_decoding_split_over_processes_gives_the_in_process_outputs(tiny):
    base, model, tokenizer, fmt, _ = tiny
    rows = ROWS[::6]
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
    cf = constrained.call_format(fmt)
    grammars = [constrained.grammar(r["functions"], cf) for r in rows]
    one = constrained.generate(model, tokenizer, prompts, grammars=grammars, max_tokens=16, batch_size=4)
    assert generate_sharded(base, None, prompts, workers=2, generator=constrained.generate,
                            per_prompt={"grammars": grammars}, max_tokens=16, batch_size=4) == one


def test_constrained_summary_and_its_report_row():
    rows = [{"id": f"q{i}", "category": "simple", "functions": WEATHER,
             "ground_truth": [{"get_weather": {"city": ["Paris"]}}]} for i in range(3)]
    right = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    wrong = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    records = scaffold.constrained_records(rows, [(right, 20, 0), (wrong, 30, 0), (right, 40, 5)])
    greedy = [{"id": "q0", "raw": "x", "valid": False}, {"id": "q1", "raw": "y", "valid": True},
              {"id": "q2", "raw": "z", "valid": False}]
    m = scaffold.constrained_summary(rows, records, greedy, [("x", 7), ("other", 8), ("z", 9)])
    assert m["overall"]["correct"] == 2 and m["paired"] == {"before": "greedy", "after": "constrained",
                                                            "both_correct": 0, "only_before": 1, "only_after": 2,
                                                            "both_wrong": 0}
    assert m["constrained"] == {"finished_at_max_tokens": 1, "unparseable": 0, "unoffered_names": 0,
                                "generated_tokens": 90, "unconstrained_tokens": 24, "unconstrained_same_as_greedy": 2}
    # The main study's column runs no baseline: its keys are left out, the rest is the same.
    assert scaffold.constrained_summary(rows, records, greedy) == {
        **m, "constrained": {"finished_at_max_tokens": 1, "unparseable": 0, "unoffered_names": 0, "generated_tokens": 90}}
    lines = scaffold_section({"constrained": {"sft": m}}, {"sft": m},
                                    ReportConfig(equivalence_margin=0.05, alpha=0.05, power=0.8))
    assert any(line.startswith("| SFT |") and line.endswith("| +33.3 pts |") for line in lines)
    assert any(isinstance(c, Claim) and c.label == "SFT, constrained decoding" for c in lines)


def test_the_stage_pairs_with_the_greedy_eval_and_decodes_the_baseline_only_when_asked(tmp_path):
    """stages.eval_constrained as DVC runs it, after stages.eval on the same items: the main study's column
    (no --baseline) and the ablation's arm (--baseline) write the same constrained predictions."""
    from test_errors import PARAMS, stage

    base = make_tiny_model(tmp_path / "tiny")
    rows = ROWS[::6]
    write_jsonl(tmp_path / "test.jsonl", rows)
    params = {"eval": {**PARAMS["eval"], "max_tokens": 8, "batch_size": 4, "workers": 1}}
    proc = stage("eval", "base", "--model", base, "--test", "test.jsonl", "--metrics", "greedy.json",
                 "--predictions", "greedy.jsonl", cwd=tmp_path, params=params)
    assert proc.returncode == 0, proc.stderr[-2000:]
    greedy = read_jsonl(tmp_path / "greedy.jsonl")
    out = {}
    for arm, flags in (("column", []), ("ablation", ["--baseline"])):
        proc = stage("eval_constrained", "base", "--model", base, "--test", "test.jsonl", "--greedy", "greedy.jsonl",
                     "--metrics", f"m/{arm}.json", "--predictions", f"p/{arm}.jsonl", *flags, cwd=tmp_path,
                     params=params)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[arm] = (read_json(tmp_path / f"m/{arm}.json"), read_jsonl(tmp_path / f"p/{arm}.jsonl"),
                    read_json(tmp_path / f"m/{arm}.timings.json"))
    (column, column_records, column_timings), (ablation, ablation_records, ablation_timings) = out.values()
    assert column_records == ablation_records and [r["id"] for r in column_records] == [r["id"] for r in rows]
    assert all(g["error_type"].startswith("parse:") for g in greedy)  # left alone, the random model writes no call
    for r in column_records:  # held to the grammar it always does
        assert not (r["error_type"] or "").startswith("parse:") and r["generated_tokens"] <= 8
    n = len(rows)
    assert column["overall"]["n"] == sum(record_table(column["paired"])) == n
    assert column["paired"]["only_before"] + column["paired"]["both_correct"] == sum(g["valid"] for g in greedy)
    assert set(column["constrained"]) == {"finished_at_max_tokens", "unparseable", "unoffered_names",
                                          "generated_tokens"}
    assert column["constrained"]["unparseable"] == column["constrained"]["unoffered_names"] == 0
    # The ablation's metrics are the column's plus the baseline's: it redecodes the greedy eval exactly.
    baseline = {k: v for k, v in ablation["constrained"].items() if k not in column["constrained"]}
    assert ablation == {**column, "constrained": {**column["constrained"], **baseline}}
    assert baseline["unconstrained_same_as_greedy"] == n and 0 < baseline["unconstrained_tokens"] <= 8 * n
    assert set(baseline) == {"unconstrained_same_as_greedy", "unconstrained_tokens"}
    assert set(column_timings) == {"workers", "constrained"}
    assert set(ablation_timings) == {"workers", "unconstrained", "constrained"}
