"""mlx_lm.server on a model directory as fetch_model writes it, called with the openai client.

Real parts only: the tiny model is fine-tuned (tiny_adapter.train_tool_caller)
until it answers one request with two ``<tool_call>`` blocks, fetched with
``source: local`` like the pipeline test's model, and served by mlx-lm's own
server in a child process. What the model saw is checked through the server's
own numbers: the prompt length it reports and the log-probabilities of the
tokens it generated, which depend on every prompt token; we recompute them on
the prompt PromptFormat renders (with tools) and on the source's tool-less one.
"""

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
import pytest
from tiny_adapter import CALLS, FUNCTIONS, MESSAGES, train_tool_caller
from tiny_model import make_tiny_model

from toolcall.calls.prompts import PromptFormat
from toolcall.model.fetch import fetch_model
from test_modelio import model_config
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
