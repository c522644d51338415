"""mlx_lm.server on a model directory as fetch_model writes it, called with the openai client.

Real parts only: the tiny model is fine-tuned (tiny_adapter.train_tool_caller)
until it answers one request with two ``<tool_call>`` blocks, fetched with
``source: local`` like the pipeline test's model, and served by mlx-lm's own
server in a child process. What the model saw is checked through the server's
own numbers: the prompt length it reports and the log-probabilities of the
tokens it generated, which depend on every prompt token; we recompute them on
the prompt PromptFormat renders (with tools) and on the source's tool-less one.
The same model behind toolcall.serve.constrained_server (mlx-lm's server, each
request held to the grammar of the tools it offers) answers requests for
functions it was never tuned on with calls of those functions only.
"""

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
import pytest
from tiny_adapter import CALLS, FUNCTIONS, MESSAGES, train_tool_caller
from tiny_model import make_tiny_model

from toolcall.calls.parsing import parse_calls
from toolcall.calls.prompts import PromptFormat, tool_specs
from toolcall.calls.schema import call_problem
from toolcall.evaluate import generation
from toolcall.model import lora
from toolcall.model.fetch import fetch_model
from test_constrained import RULED_OUT
from test_fuzz import ROWS
from test_modelio import model_config
from toolcall.serve.constrained_server import functions_of
from toolcall.serve.server import ServerError, ask, client, mlx_server, response_calls


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    source, _ = train_tool_caller(make_tiny_model(tmp / "random"), tmp / "tuned")
    model_dir = fetch_model(model_config(source="local", path=str(source)), tmp / "base")
    with mlx_server(model_dir, log_path=tmp / "server.log") as url:
        response = ask(client(url, timeout=60), {"messages": MESSAGES, "functions": FUNCTIONS}, 120, logprobs=True)
    return source, model_dir, response


def logprobs_of(model, prompt_ids, ids):
    """log p(ids[i] | prompt, ids[:i]) by one teacher-forced forward pass."""
    logits = model(mx.array([prompt_ids + ids[:-1]]))[0, len(prompt_ids) - 1:]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logp, mx.array(ids)[:, None], axis=-1)[:, 0]


def test_tool_call_reply_comes_back_as_tool_calls(served):
    _, _, response = served
    choice = response.choices[0]
    assert response_calls(response) == CALLS
    assert choice.finish_reason == "tool_calls"
    assert not (choice.message.content or "").strip()  # only the newline between the two calls


def test_model_saw_the_prompt_with_tools_rendered(served):
    from mlx_lm import load
    from mlx_lm.utils import load_tokenizer

    source, model_dir, response = served
    model, tokenizer = load(str(model_dir))
    prompt = PromptFormat(tokenizer).prompt(MESSAGES, FUNCTIONS)
    assert "get_weather" in prompt and "<tools>" in prompt
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert response.usage.prompt_tokens == len(prompt_ids)

    content = response.choices[0].logprobs.content
    ids = [t.model_extra["id"] for t in content]
    served_logprobs = mx.array([t.logprob for t in content])
    assert mx.allclose(served_logprobs, logprobs_of(model, prompt_ids, ids), atol=2e-3)
    # The tool-less ChatML the source directory carried (what the server rendered) gives other numbers.
    chatml = load_tokenizer(source).apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert "get_weather" not in chatml
    other = logprobs_of(model, tokenizer.encode(chatml, add_special_tokens=False), ids)
    assert mx.abs(other - served_logprobs).max().item() > 1.0


def test_server_failure_is_reported_with_its_log(tmp_path):
    with pytest.raises(ServerError, match="unhealthy(.|\n)*no_such_model"):
        with mlx_server(tmp_path / "no_such_model", timeout=30):
            pass


# Requests for functions the tiny model was never tuned on: a few rows of each category.
OTHER_ROWS = ROWS[::8]


@pytest.fixture(scope="module")
def constrained_replies(served, tmp_path_factory):
    """toolcall.serve.constrained_server on the served model: the request it was tuned on, OTHER_ROWS's,
    and one whose schema the grammar cannot express (the error's text)."""
    from openai import APIStatusError

    _, model_dir, _ = served
    unsupported = [{"name": "f", "parameters": {"type": "dict", "properties": {"p": {"type": "set"}}}}]
    with mlx_server(model_dir, log_path=tmp_path_factory.mktemp("constrained") / "server.log",
                    constrained=True) as url:
        c = client(url, timeout=60)
        tuned = ask(c, {"messages": MESSAGES, "functions": FUNCTIONS}, 120)
        others = [ask(c, row, 200) for row in OTHER_ROWS]
        with pytest.raises(APIStatusError) as error:
            ask(c, {"messages": MESSAGES, "functions": unsupported}, 20)
    return model_dir, tuned, others, error.value.body


def test_constrained_server_leaves_a_right_answer_as_it_is(constrained_replies):
    _, tuned, _, _ = constrained_replies
    assert response_calls(tuned) == CALLS and tuned.choices[0].finish_reason == "tool_calls"


def test_constrained_server_replies_with_calls_of_the_offered_functions_only(constrained_replies):
    model_dir, _, others, _ = constrained_replies
    for row, response in zip(OTHER_ROWS, others):
        calls = response_calls(response)  # JSON arguments, parsed
        assert calls and response.choices[0].finish_reason == "tool_calls", row["id"]
        assert not [p for c in calls if (p := call_problem(c, row["functions"])) in RULED_OUT], (row["id"], calls)
    # Left alone, the same model writes no call that parses for any of them (it was tuned on one request).
    model, tokenizer = lora.load_model(model_dir)
    fmt = PromptFormat(tokenizer)
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in OTHER_ROWS]
    for text, _ in generation.generate(model, tokenizer, prompts, max_tokens=200, batch_size=3):
        assert parse_calls(text).error_type is not None, text


def test_constrained_server_says_which_schema_it_cannot_express(constrained_replies):
    assert constrained_replies[3] == "unsupported BFCL parameter type 'set'"


def test_a_requests_tools_give_back_the_functions_they_were_made_from():
    """The grammar of ``functions_of(tools)`` is that of the BFCL functions ``tools=`` was written from:
    JSON Schema's type names map back wherever the grammar tells them apart."""
    from toolcall.calls import constrained

    cf = constrained.CallFormat("<tool_call>", "</tool_call>\n<tool_call>", "</tool_call>", ", ", ": ", False)
    for row in ROWS:
        assert constrained.grammar(functions_of(tool_specs(row["functions"])), cf) == constrained.grammar(
            row["functions"], cf), row["id"]
