"""Fuzzing: the parser never raises on any text, the scorer never raises on parsed calls.

Hypothesis generates random text, valid model outputs mutated the ways
generation goes wrong (truncated, tags dropped or doubled, JSON edited,
unicode, deep nesting, huge integers), and schemas with ground truths. The
scorer raises ValueError by design on malformed *ground truth* (see
``toolcall.calls.scoring``), so the ground truths here are always well formed; the
calls are whatever the parser returns. Derandomized: CI runs the same cases
every time. Each test counts its cases: 11,000 in all.
"""

import json
import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import section
from toolcall.bfcl.rows import gold_calls
from toolcall.bfcl.sources import normalize, read_source
from toolcall.calls.parsing import parse_calls
from toolcall.calls.scoring import check

FIXTURE = Path(__file__).parent / "fixtures" / "bfcl"
FILES = section("data")["files"]
ROWS = [r for cat, (q, a) in read_source("local", FILES, local_dir=FIXTURE).items()
        for r in normalize(cat, q, a)]
CATEGORIES = list(FILES)


def fuzz(n):
    """Deterministic settings for ``n`` cases (no example database: nothing carries over between runs)."""
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def render(calls):
    """Model output in the project's format (toolcall.calls.prompts), one block per call."""
    return "".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls)


def assert_well_formed(result):
    # The contract the scorer relies on: calls are {"name": str, "arguments": dict}; none on any error.
    assert (result.error_type is None) == bool(result.calls)
    for c in result.calls:
        assert isinstance(c["name"], str) and isinstance(c["arguments"], dict)


def random_json(rng, depth=2):
    """A JSON-like value: scalars of every kind, lists and dicts nested up to ``depth``."""
    kind = rng.randrange(8 if depth else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**63, -(10**30), rng.randint(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, float("inf"), float("nan"), rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return random_text(rng)
    if kind == 6:
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {random_text(rng): random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))}


def random_text(rng, size=6):
    alphabet = rng.choice(["abcxyz_.", " ,./-_*^'\"\\", "é日本🙂\u0000\ud800"])
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, size)))


def random_calls(rng, names=("f", "g", "a.b")):
    """Calls of offered or made-up names with arbitrary arguments; sometimes not call-shaped at all."""
    calls = []
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(names) if rng.random() < 0.7 else random_text(rng)
        arguments = {rng.choice("pqrs") if rng.random() < 0.7 else random_text(rng, 3): random_json(rng)
                     for _ in range(rng.randint(0, 4))}
        calls.append({"name": name, "arguments": arguments} if rng.random() < 0.9 else random_json(rng))
    return calls


MUTATIONS = ("truncate", "drop_tag", "dup_tag", "delete", "insert", "replace", "unicode", "nest", "huge_int",
             "swap_quotes")


def mutate(text, rng):
    """Apply 1-4 edits of the kinds generation gets wrong, chosen by ``rng``."""
    for _ in range(rng.randint(1, 4)):
        kind, n = rng.choice(MUTATIONS), len(text)
        i = rng.randint(0, n)
        j = rng.randint(i, n)
        if kind == "truncate":
            text = text[:i]
        elif kind in ("drop_tag", "dup_tag"):
            tag = rng.choice(["<tool_call>", "</tool_call>"])
            at = text.find(tag, i)
            if at >= 0:
                text = text[:at] + (tag * 2 if kind == "dup_tag" else "") + text[at + len(tag):]
        elif kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + rng.choice(['{', '}', '[', ']', '"', ',', ':', '\\', ' ', '-', 'e', '.', '\n', 'null',
                                          '"name"', '"arguments"']) + text[i:]
        elif kind == "replace":
            text = text[:i] + "".join(chr(rng.randint(0, 0x7F)) for _ in range(rng.randint(0, 5))) + text[j:]
        elif kind == "unicode":  # any code point, surrogates and control characters included
            text = text[:i] + "".join(chr(rng.randint(0x80, 0x10FFFF)) for _ in range(rng.randint(1, 4))) + text[i:]
        elif kind == "nest":
            depth = rng.choice([50, 2000, 100_000])  # past the recursion limit too
            text = text[:i] + rng.choice("[{") * depth + text[i:j] + "]" * rng.choice([0, depth]) + text[j:]
        elif kind == "huge_int":
            text = text[:i] + "9" * rng.choice([20, 5000]) + text[i:]  # Python's int-string limit is 4300 digits
        else:
            text = text[:i] + text[i:j].replace('"', "'") + text[j:]
    return text


# Hypothesis draws a seed per case and the generators above build the case from
# it with random.Random: the same kinds of cases as one Hypothesis draw per
# choice, ~15x more per second, and a failure still reports the seed that
# reproduces it.
seeds = st.integers(0, 2**32 - 1)


def test_parser_never_raises_on_any_text():
    seen = []

    @fuzz(3000)
    @given(text=st.text() | st.text(st.sampled_from(list('<>/tool_call{}[]":,\\ \nnamearguments01'))))
    def prop(text):
        seen.append(1)
        assert_well_formed(parse_calls(text))

    prop()
    assert len(seen) >= 3000


def test_parser_never_raises_on_mutated_outputs():
    seen = []

    @fuzz(3000)
    @given(seed=seeds)
    def prop(seed):
        seen.append(1)
        rng = random.Random(seed)
        assert_well_formed(parse_calls(mutate(render(random_calls(rng)), rng)))

    prop()
    assert len(seen) >= 3000


def test_scorer_never_raises_on_parsed_outputs_for_real_rows():
    seen = []

    @fuzz(2500)
    @given(row=st.sampled_from(ROWS), seed=seeds, category=st.sampled_from(CATEGORIES + [None]))
    def prop(row, seed, category):
        seen.append(1)
        parsed = parse_calls(mutate(render(gold_calls(row["ground_truth"])), random.Random(seed)))
        result = check(row["functions"], parsed.calls, row["ground_truth"], category or row["category"])
        assert result.valid in (True, False)

    prop()
    assert len(seen) >= 2500


# ---- generated schemas with well-formed ground truths

SCALARS = {
    "string": random_text, "any": random_text, "integer": lambda rng: rng.randint(-5, 5),
    "float": lambda rng: rng.choice([0.5, 2.0, -1.25]), "boolean": lambda rng: rng.random() < 0.5,
}


def random_parameter(rng):
    """(schema of one parameter, its allowed values) as BFCL writes them: values of the declared type."""
    kind = rng.choice([*SCALARS, "array", "tuple", "dict", "array_of_dict"])
    if kind in SCALARS:
        spec, value = {"type": kind}, SCALARS[kind]
    elif kind in ("dict", "array_of_dict"):
        def value(rng):  # a dict answer is itself {key: [allowed values]}
            return {k: [rng.choice([random_text(rng), rng.randint(0, 3)]) for _ in range(rng.randint(1, 2))]
                    for k in rng.sample("xyz", rng.randint(1, 2))}
        spec = {"type": "dict", "properties": {}}
        if kind == "array_of_dict":
            def value(rng, one=value):
                return [one(rng) for _ in range(rng.randint(0, 2))]
            spec = {"type": "array", "items": {"type": "dict"}}
    else:
        item = rng.choice(list(SCALARS))
        spec = {"type": kind, "items": {"type": item}}

        def value(rng):
            return [SCALARS[item](rng) for _ in range(rng.randint(0, 3))]
    allowed = [value(rng) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.5:
        allowed.insert(rng.randint(0, len(allowed)), "")  # may be omitted
    return spec, allowed


def random_schema_and_answer(rng):
    functions, ground_truth = [], []
    for name in rng.sample(["f", "g", "a.b"], rng.randint(1, 3)):
        params = {p: random_parameter(rng) for p in rng.sample("pqrs", rng.randint(0, 4))}
        functions.append({"name": name, "description": "", "parameters": {
            "type": "dict", "properties": {p: spec for p, (spec, _) in params.items()},
            "required": [p for p in params if rng.random() < 0.5]}})
        if rng.random() < 0.5 or not ground_truth:
            ground_truth.append({name: {p: allowed for p, (_, allowed) in params.items()}})
    return functions, ground_truth


def test_scorer_never_raises_on_generated_schemas():
    seen = []

    @fuzz(2500)
    @given(seed=seeds, category=st.sampled_from(CATEGORIES))
    def prop(seed, category):
        seen.append(1)
        rng = random.Random(seed)
        functions, ground_truth = random_schema_and_answer(rng)
        gold = gold_calls(ground_truth)
        calls = rng.choice([gold, gold[::-1], gold * 2, [], random_calls(rng)])
        parsed = parse_calls(render(calls) if rng.random() < 0.3 else mutate(render(calls), rng))
        assert check(functions, parsed.calls, ground_truth, category).valid in (True, False)
        assert check(functions, gold, ground_truth, category).valid in (True, False)

    prop()
    assert len(seen) >= 2500
