"""Prompts and targets, always rendered by a chat template from structured calls.

If the model's own template renders ``tools=`` and assistant ``tool_calls``
(Qwen2.5 and most recent instruct models), it is used as is: the model then sees
the format it was trained on. If the template ignores tools (SmolLM2's plain
ChatML), the project's ``TOOL_TEMPLATE`` is used: the tools listed in the system
turn, each call written as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
fetch_model writes that template into the model directory (``install_tool_template``),
so ``mlx_lm.load`` and ``mlx_lm.server`` render exactly what training and eval do.

Targets are never hand-built strings (the second seed's run 1 failed that way):
they are the template's rendering of a structured assistant ``tool_calls``
message, cut at the end-of-turn token. The one exception is the format
ablation's ``content`` arm, which exists to measure exactly that mistake.
"""

import json

from toolcall.calls.schema import to_json_schema

# What closes a call in TOOL_TEMPLATE's rendering (and in Qwen2.5-style native templates): the token after
# it is where the model chooses between another call and the end of its answer (``decision_tokens``).
CALL_END = "</tool_call>"

TOOL_TEMPLATE = """\
{%- if messages[0].role == 'system' %}{% set system = messages[0].content %}{% set messages = messages[1:] %}\
{%- else %}{% set system = 'You are a helpful assistant.' %}{% endif -%}
<|im_start|>system
{{ system }}
{%- if tools %}{{ '\\n\\n' }}You can call these functions:
<tools>
{% for tool in tools %}{{ (tool.function if tool.function is defined else tool) | tojson }}
{% endfor %}</tools>
To call functions, reply only with one <tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call> per call.
{%- endif %}<|im_end|>
{% for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}{% if not loop.first %}{{ '\\n' }}{% endif %}<tool_call>{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def tool_specs(functions):
    """BFCL function schemas as OpenAI-style tool specs for ``tools=``."""
    return [
        {
            "type": "function",
            "function": {
                "name": fn["name"],
                "description": fn.get("description", ""),
                "parameters": to_json_schema(fn.get("parameters", {"type": "dict", "properties": {}})),
            },
        }
        for fn in functions
    ]


def tool_call_message(calls):
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ],
    }


def content_call_message(calls):
    """The hand-built alternative the format ablation measures: calls as plain text."""
    text = "\n".join(
        "<tool_call>" + json.dumps({"name": c["name"], "arguments": c["arguments"]}) + "</tool_call>"
        for c in calls
    )
    return {"role": "assistant", "content": text}


# mlx-lm's parser for TOOL_TEMPLATE's calls (mlx_lm/tool_parsers/json_tools.py: the JSON
# between <tool_call> and </tool_call>). mlx-lm infers a parser from a template only
# when it spells ``tool_call.name``, which ours does not, so the key must be written.
TOOL_PARSER = "json_tools"

_PROBE = "probe_function_7f3a"


def template_supports_tools(tokenizer):
    """True if the tokenizer's own chat template renders ``tools=``."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    tools = [{"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {}}}]
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=tools, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that chokes on tools does not support them
        return False
    return _PROBE in text


def install_tool_template(tokenizer):
    """Give ``tokenizer`` the template PromptFormat renders with, so that saving it
    carries that template to ``mlx_lm.load`` and ``mlx_lm.server``.

    A template that renders ``tools=`` is kept; otherwise TOOL_TEMPLATE replaces it,
    with the ``tool_parser_type`` mlx-lm needs to turn the replies into ``tool_calls``.
    """
    if not template_supports_tools(tokenizer):
        tokenizer.chat_template = TOOL_TEMPLATE
    # Also when TOOL_TEMPLATE came in with the model (e.g. re-importing our own GGUF export).
    if tokenizer.chat_template == TOOL_TEMPLATE:
        tokenizer.init_kwargs["tool_parser_type"] = TOOL_PARSER  # save_pretrained writes init_kwargs
    return tokenizer


class PromptFormat:
    """Renders prompts and completions for one tokenizer.

    ``style``: ``structured`` (targets from ``tool_calls``, the default) or
    ``content`` (hand-built call text in assistant content).
    """

    def __init__(self, tokenizer, style="structured"):
        if style not in ("structured", "content"):
            raise ValueError(f"unknown prompt style {style!r}: expected structured or content")
        self.tokenizer = tokenizer
        self.style = style
        self.native = template_supports_tools(tokenizer)
        self.template = None if self.native else TOOL_TEMPLATE
        # "project" whether TOOL_TEMPLATE is the fallback or was written into the
        # model directory by fetch_model (install_tool_template); "native" for the model's own.
        self.template_source = "project" if (self.template or tokenizer.chat_template) == TOOL_TEMPLATE else "native"
        self.eos = tokenizer.eos_token

    def _render(self, messages, functions, add_generation_prompt):
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tool_specs(functions),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def prompt(self, messages, functions):
        return self._render(messages, functions, add_generation_prompt=True)

    def completion(self, messages, functions, calls):
        """Text the model should produce after ``prompt``, up to end-of-turn."""
        make = tool_call_message if self.style == "structured" else content_call_message
        prompt = self.prompt(messages, functions)
        full = self._render(messages + [make(calls)], functions, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("chat template renders the prompt differently with an assistant turn")
        completion = full[len(prompt):]
        end = completion.find(self.eos)
        if end < 0:
            raise ValueError(f"chat template does not end the assistant turn with {self.eos!r}")
        return completion[: end + len(self.eos)]

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def example(self, row, calls, decision_weight=1.0):
        """Token ids ``(prompt + completion, prompt_length)`` for one training row.

        Prompt and completion are tokenized separately so the prompt tokens are
        exactly those the model sees at generation time. With a
        ``decision_weight`` other than 1 a third item, each completion token's
        loss weight: ``decision_weight`` on the ``decision_tokens``, 1 elsewhere.
        """
        prompt = self.encode(self.prompt(row["messages"], row["functions"]))
        text = self.completion(row["messages"], row["functions"], calls)
        completion = self.encode(text)
        if decision_weight == 1:
            return prompt + completion, len(prompt)
        weights = [1.0] * len(completion)
        for i in self.decision_tokens(text, completion):
            weights[i] = float(decision_weight)
        return prompt + completion, len(prompt), weights

    def decision_tokens(self, text, ids):
        """Indices into ``ids`` (the tokens of completion ``text``) of the token after each ``CALL_END``.

        There the model chooses between another call and the end of its answer:
        the choice behind answering a 3-call question with 2 calls. The indices
        are counted by tokenizing the text up to each tag, which must give a
        prefix of ``ids`` (a token spanning the tag and what follows has no
        position of its own: refused).
        """
        found, start = [], 0
        while (end := text.find(CALL_END, start)) >= 0:
            start = end + len(CALL_END)
            head = self.encode(text[:start])
            if len(head) >= len(ids) or ids[:len(head)] != head:
                raise ValueError(f"the tokens of {text[:start][-40:]!r} are not a prefix of the completion's: "
                                 f"a token joins {CALL_END!r} to what follows it")
            found.append(len(head))
        if not found:
            raise ValueError(f"no {CALL_END!r} in the completion {text[:80]!r}: this template closes calls otherwise")
        return found
