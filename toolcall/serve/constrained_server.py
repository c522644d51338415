"""mlx-lm's OpenAI-compatible server with each request that offers ``tools`` decoded under their grammar.

    python -m toolcall.serve.constrained_server --model models/export/sft --port 8080
    python -m toolcall.serve.constrained_server --model models/base --adapter-path models/sft/s0 --port 8080

It takes every flag of ``mlx_lm server`` and is that server: its HTTP API, the
chat template and tool-call parser stored in the model directory, batching and
the prompt cache. What it adds: a chat request with ``tools`` is decoded under
``toolcall.calls.constrained.grammar`` of those tools, the grammar the study's
constrained column (stages/eval_constrained.py) decodes under, so the reply is
one or more calls of offered functions, with only their parameters, the
required ones given, values of their types and enums; mlx-lm's parser returns
them as ``tool_calls``. A request without tools is served as ``mlx_lm server``
serves it. ``tool_choice`` is ignored, as mlx-lm's server ignores it (its
server.py never reads it): offering tools asks for calls.

How a request's tools reach the decoding: mlx-lm's server builds a request's
logits processors from its generation arguments alone
(``_make_logits_processors(args)``, mlx_lm/server.py:501 in 0.32.2, called at
:873 for a batched request and :1068 for one served alone), while the tools
travel on another object (``CompletionRequest.tools``, :298); the two meet in
``ResponseGenerator.generate`` (:1162) only, and ``run`` (:1915) builds that
ResponseGenerator itself. So ``ConstrainedResponseGenerator.generate`` compiles
the request's tools to a grammar and hands a fresh ``Constraint`` on with the
arguments, and ``main`` puts it and a ``_make_logits_processors`` that appends
the constraint in place of the server module's two names before running
mlx-lm's own ``main``. Nothing else of the server changes.

Limits: a reply cut at ``max_tokens`` is cut mid-call (the eval completes such
a sequence from the grammar, ``Constraint.finish``; a server streams only what
the model sampled): leave room. Only the ``--model`` is served with the
constraint (the grammar is built for its tokenizer and template). One process:
a constraint does not cross ``mlx.launch``'s ranks.
"""

import dataclasses
from typing import Optional

from mlx_lm import load, server

from toolcall.calls import constrained
from toolcall.calls.prompts import PromptFormat
from toolcall.calls.schema import retyped

# The request's JSON Schema type names -> BFCL's, which the grammar reads: schema.JSON_SCHEMA_TYPES the
# other way. "array" and "string" are BFCL names too (BFCL's "tuple" and "any" are held to the same values).
BFCL_TYPES = {"object": "dict", "number": "float"}
_plain_processors = server._make_logits_processors


def bfcl_schema(schema):
    """A tool's JSON Schema (recursively) with BFCL's type names: ``schema.to_json_schema`` undone."""
    return retyped(schema, BFCL_TYPES)


def functions_of(tools):
    """BFCL function schemas of a request's OpenAI ``tools`` (``{"type": "function", "function": {...}}``)."""
    out = []
    for tool in tools:
        fn = tool.get("function", tool)  # the chat template takes a bare function too
        out.append({"name": fn["name"], "description": fn.get("description", ""),
                    "parameters": bfcl_schema(fn.get("parameters") or {"type": "object", "properties": {}})})
    return out


@dataclasses.dataclass
class ConstrainedArguments(server.GenerationArguments):
    """mlx-lm's generation arguments plus the request's constraint (None: decoded as mlx-lm decodes)."""

    constraint: Optional[constrained.Constraint] = None


class ConstrainedResponseGenerator(server.ResponseGenerator):
    """mlx-lm's ResponseGenerator; a request with tools gets a ``Constraint`` of their grammar on its arguments."""

    def __init__(self, model_provider, prompt_cache):
        cli = model_provider.cli_args
        if cli.model is None:
            raise SystemExit("constrained_server: --model is required (the grammar is built for its tokenizer)")
        # The tokenizer as the server's ModelProvider loads it (its --chat-template, the config's
        # end-of-sequence ids), here and once: the model loads in the generation thread, and a request
        # may arrive before it has. Lazy: the weights are not read.
        _, tokenizer = load(cli.model, tokenizer_config=model_provider._tokenizer_config, lazy=True,
                            trust_remote_code=cli.trust_remote_code)
        try:
            self.call_format = constrained.call_format(PromptFormat(tokenizer))
        except ValueError as e:
            raise SystemExit(f"constrained_server: {cli.model}: {e}") from None
        self.decoder = constrained.Decoder(tokenizer)
        self.served = ("default_model", cli.model)
        super().__init__(model_provider, prompt_cache)

    def generate(self, request, generation_args, progress_callback=None):
        if request.tools:
            # Raised here, a message reaches the client as the server's error reply.
            if generation_args.model.model not in self.served:
                raise ValueError(f"the constrained server serves {self.served[1]} only (model: default_model)")
            grammar = constrained.grammar(functions_of(request.tools), self.call_format)
            fields = {f.name: getattr(generation_args, f.name) for f in dataclasses.fields(generation_args)}
            generation_args = ConstrainedArguments(**fields, constraint=self.decoder.constraint(grammar))
        return super().generate(request, generation_args, progress_callback)


def make_logits_processors(args):
    """mlx-lm's processors for ``args``, then the request's constraint: it masks what they leave."""
    constraint = getattr(args, "constraint", None)
    return _plain_processors(args) + ([constraint] if constraint is not None else [])


def main():
    server.ResponseGenerator = ConstrainedResponseGenerator
    server._make_logits_processors = make_logits_processors
    server.main()


if __name__ == "__main__":
    main()
