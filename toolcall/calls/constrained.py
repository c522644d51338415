"""Schema-constrained decoding: each item's offered functions as a grammar, enforced token by token.

The grammar (``grammar``) is llguidance's Lark dialect and describes exactly the
completion PromptFormat trains on and ``parsing.parse_calls`` reads: one or
more calls in the chat template's frame (``call_format`` reads the frame and
the JSON separators off the template by rendering two probe calls), each
``{"name": <an offered name>, "arguments": {...}}``. The arguments are the
function's own parameters, each at most once and in any order (training
targets follow the answer's order, which is not always the schema's: a
parametric rule keeps a bit per parameter), the required ones required. Each
value has its parameter's BFCL type (``schema``: "float" is a JSON number,
"tuple" an array, "any" a string, as the scorer reads them), an ``enum`` where
the schema gives one, and may be ``null`` for an optional parameter (a Python
default of None; BFCL's answers list it, e.g. parallel_152). No string value
may hold the parser's ``<tool_call>`` / ``</tool_call>`` tags (``avoiding``). Values are
llguidance's own JSON Schema compiler (``%json``). A "dict" without properties
takes scalar values or lists of them, which covers every BFCL answer and keeps
nesting bounded. The grammar reads the schema only, never the answer: of the
989 validated rows, 3 training rows have an answer typed unlike its schema
(e.g. a string for an array) that it therefore refuses.

Decoding (``generate``): one mlx-lm logits processor per sequence
(``BatchGenerator.insert``'s ``logits_processors``) feeds the matcher the token
sampled last and masks every token the grammar forbids (llguidance fills a
bitmask on the CPU; llguidance.mlx's helper is a Metal kernel). A sequence that
reaches ``max_tokens`` before the grammar is complete is finished by the
grammar alone (``Constraint.finish``: close the open string, array or object
first, else the longest allowed token) so that every constrained output parses;
those tokens are not the model's and are counted apart.
"""

import itertools
import json
import re
from dataclasses import dataclass

import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance import LLMatcher
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from toolcall.calls.parsing import CLOSE, OPEN
from toolcall.evaluate import generation

# The JSON separators a chat template may write calls with (item, key); both are
# also valid regexes, which is how llguidance's %json reads them.
SEPARATORS = ((", ", ": "), (",", ":"))
_PROBE = ({"name": "probe_a", "arguments": {"k": [1, 2], "é": {"j": "x"}}}, {"name": "probe_b", "arguments": {}})
# Parameters per function the parametric rule can track: one bit each in llguidance's 64-bit parameter.
MAX_PARAMETERS = 64


def avoiding(words):
    """A regex (no look-around: llguidance has none) of the strings in which no word of ``words`` occurs.

    Each word starts with ``<`` and holds no other ``<``, as the parser's tags
    do. Outside a ``<`` anything goes; a ``<`` starts a run of chunks ``<`` +
    a proper prefix of a word (less its ``<``), each cut short by the next
    ``<`` or, for the last, by a character no word continues that prefix with,
    or by the end of the string.
    """
    tails = [w[1:] for w in words]
    if any(not w.startswith("<") or "<" in t for w, t in zip(words, tails)):
        raise ValueError(f"each word must start with '<' and hold no other: {words}")
    prefixes = sorted({t[:i] for t in tails for i in range(len(t))})
    chunk = "<(?:" + "|".join(map(re.escape, prefixes)) + ")"
    diverged = []
    for p in prefixes:
        follows = {t[len(p)] for t in tails if t.startswith(p) and len(t) > len(p)}
        diverged.append(re.escape(p) + "[^<" + "".join(re.escape(c) for c in sorted(follows)) + "]")
    return f"^(?:[^<]|(?:{chunk})*<(?:{'|'.join(diverged)}))*(?:{chunk})*$"


# String values may not hold the parser's tags: a "</tool_call>" inside a value would end the
# block early for our parser and every client's (simple_python_53 on the base model, once).
_STRING = {"type": "string", "pattern": avoiding((OPEN, CLOSE))}
# Free-form values of a "dict" without properties: scalars or lists of them.
_SCALARS = [_STRING, {"type": "number"}, {"type": "boolean"}]
_FREE_VALUE = {"anyOf": _SCALARS + [{"type": "array", "items": {"anyOf": _SCALARS}}]}
# Finishing a cut sequence takes a few dozen tokens; far more means a bug, not a long schema.
_FINISH_LIMIT = 4096


@dataclass(frozen=True)
class CallFormat:
    """How the chat template writes a list of calls: the frame around them and the JSON inside."""

    opening: str  # before the first call
    separator: str  # between two calls
    closing: str  # after the last call, up to end-of-turn
    item_sep: str
    key_sep: str
    ensure_ascii: bool

    def dumps(self, value):
        return json.dumps(value, separators=(self.item_sep, self.key_sep), ensure_ascii=self.ensure_ascii)


def call_format(fmt):
    """The ``CallFormat`` of a ``prompts.PromptFormat``, read off its rendering of one and two probe calls."""
    messages = [{"role": "user", "content": "probe"}]
    functions = [{"name": c["name"], "description": "", "parameters": {"type": "dict", "properties": {}}}
                 for c in _PROBE]
    one = fmt.completion(messages, functions, list(_PROBE[:1]))[: -len(fmt.eos)]
    two = fmt.completion(messages, functions, list(_PROBE))[: -len(fmt.eos)]
    for (item_sep, key_sep), ensure_ascii in itertools.product(SEPARATORS, (False, True)):
        cf = CallFormat("", "", "", item_sep, key_sep, ensure_ascii)
        a, b = (cf.dumps(c) for c in _PROBE)
        if one.count(a) == 1 and two.count(a) == 1 and b in two:
            opening, closing = one.split(a)
            separator = two[len(opening) + len(a): two.index(b)]
            if two == opening + a + separator + b + closing:
                return CallFormat(opening, separator, closing, item_sep, key_sep, ensure_ascii)
    raise ValueError(f"the chat template writes calls in a form constrained decoding does not know: {one!r}")


def value_schema(spec):
    """JSON Schema of the values a BFCL parameter spec allows (``schema.PYTHON_TYPES``' vocabulary)."""
    if "enum" in spec:
        return {"enum": spec["enum"]}
    kind = spec.get("type")
    if kind in ("string", "any"):
        return _STRING
    if kind == "integer":
        return {"type": "integer"}
    if kind == "float":
        return {"type": "number"}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind in ("array", "tuple"):
        return {"type": "array", "items": value_schema(spec["items"])}
    if kind == "dict":
        out = {"type": "object", "required": spec.get("required", [])}
        if spec.get("properties"):
            return {**out, "properties": {k: value_schema(v) for k, v in spec["properties"].items()},
                    "additionalProperties": False}
        return {**out, "additionalProperties": _FREE_VALUE}
    raise ValueError(f"unsupported BFCL parameter type {kind!r}")


def _literal(text):
    """A Lark string literal matching ``text`` exactly."""
    return json.dumps(text, ensure_ascii=False)


def _sequence(*texts):
    return " ".join(_literal(t) for t in texts if t)


def grammar(functions, cf):
    """The Lark grammar of one completion: one or more calls of ``functions`` written as ``cf`` writes them.

    ValueError names what cannot be expressed (an unknown type, too many parameters).
    """
    if not functions:
        raise ValueError("no function offered")
    xg = {"item_separator": cf.item_sep, "key_separator": cf.key_sep, "whitespace_flexible": False}
    lines = [f"start: {_sequence(cf.opening)} call ({_sequence(cf.separator)} call)* {_sequence(cf.closing)}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
    for i, fn in enumerate(functions):
        params = fn.get("parameters", {})
        props, required = params.get("properties", {}), params.get("required", [])
        if len(props) > MAX_PARAMETERS:
            raise ValueError(f"function {fn['name']!r} has {len(props)} parameters; at most {MAX_PARAMETERS}")
        head = ("{" + cf.dumps("name") + cf.key_sep + cf.dumps(fn["name"]) + cf.item_sep
                + cf.dumps("arguments") + cf.key_sep)
        lines.append(f"call_{i}: {_sequence(head)} args_{i} {_sequence('}')}")
        # Required parameters take the low bits, so "all required given" is one range test.
        names = [p for p in props if p in required] + [p for p in props if p not in required]
        alternatives = ([_literal("{}")] if not required else []) + ([f'"{{" param_{i}::0x0'] if names else [])
        lines.append(f"args_{i}: " + " | ".join(alternatives))
        if not names:
            continue
        pairs = []
        for b, p in enumerate(names):
            schema = value_schema(props[p])
            if p not in required:
                schema = {"anyOf": [schema, {"type": "null"}]}
            lines.append(f"value_{i}_{b}: %json " + json.dumps({**schema, "x-guidance": xg}, ensure_ascii=False))
            key = _literal(cf.dumps(p) + cf.key_sep)
            pairs.append(f"{key} value_{i}_{b} next_{i}::set_bit({b}) %if bit_clear({b})")
        lines.append(f"param_{i}::_: " + "\n    | ".join(pairs))
        # Close once every required parameter is given; go on only while one is left (else a dead end).
        done = f" %if is_ones([0:{len(required)}])" if required else ""
        lines.append(f'next_{i}::_: "}}"{done}\n    | {_literal(cf.item_sep)} param_{i}::_'
                     f' %if not(is_ones([0:{len(names)}]))')
    text = "\n".join(lines)
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(text))
    if error:
        raise ValueError(f"llguidance rejects the grammar: {error}")
    return text


class Decoder:
    """llguidance's view of one tokenizer (built once per process: ~1 s for SmolLM2) and constraints for it."""

    def __init__(self, tokenizer):
        # mlx-lm's wrapper holds the Hugging Face tokenizer llguidance reads; every
        # stop token of generation counts as end of sequence for the grammar too.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer._tokenizer, eos_token=sorted(tokenizer.eos_token_ids))
        self.vocab = self.tokenizer.vocab_size
        texts = [self.tokenizer.decode_bytes([t]) for t in range(self.vocab)]
        self.lengths = np.array([len(b) for b in texts])
        # Tokens that can only follow a finished JSON string: a separator or a closer.
        self.after_string = np.array([b[:1] in (b",", b":", b"]", b"}") for b in texts])
        single = {c: self.tokenizer.tokenize_str(c) for c in '"]},'}
        self.single = {c: ids[0] if len(ids) == 1 else None for c, ids in single.items()}

    def constraint(self, grammar_text):
        return Constraint(self, grammar_text)


class Constraint:
    """One sequence's grammar state, as an mlx-lm logits processor ``(tokens, logits) -> logits``."""

    def __init__(self, decoder, grammar_text):
        self.decoder = decoder
        self.matcher = LLMatcher(decoder.tokenizer, grammar_text, log_level=0)
        self._check()
        self.bitmask = allocate_token_bitmask(1, decoder.vocab)
        self.prompt_length = None
        self.consumed = 0

    def _check(self):
        if self.matcher.is_error():
            raise RuntimeError(f"constrained decoding: {self.matcher.get_error()}")

    def _consume(self, tokens):
        for t in tokens:
            self.matcher.consume_token(int(t))
            self._check()  # only a token the mask allowed is ever sampled: an error here is a bug
        self.consumed += len(tokens)

    def allowed(self, matcher=None):
        """The tokens the grammar allows next, a bool per token id of the tokenizer."""
        fill_next_token_bitmask(matcher or self.matcher, self.bitmask)
        return np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.decoder.vocab].astype(bool)

    def __call__(self, tokens, logits):
        # ``tokens`` is the prompt and every token sampled so far; the last one is new from the second call on.
        if self.prompt_length is None:
            self.prompt_length = tokens.size
        else:
            self._consume(tokens[self.prompt_length + self.consumed:].tolist())
        allowed = self.allowed()
        if not allowed.any():
            raise RuntimeError("constrained decoding: the grammar allows no token (not even end of sequence)")
        width = logits.shape[-1]  # the model's vocabulary may be padded past the tokenizer's
        allowed = np.pad(allowed, (0, max(0, width - allowed.size)))[:width]
        return mx.where(mx.array(allowed), logits, -mx.inf)

    def finish(self, generated):
        """Tokens that complete the grammar after ``generated`` (the sequence's sampled tokens); [] if complete.

        The grammar alone picks them, the model is not asked: close an open
        string (a quote after which no quote may follow), else an array or an
        object, else open what must come, else the longest allowed token. Each
        step closes something or writes a part that must come, so it ends.
        """
        self._consume(generated[self.consumed:])
        out = []
        while not self.matcher.is_accepting():
            if len(out) >= _FINISH_LIMIT:
                raise RuntimeError(f"constrained decoding: no way to finish the grammar in {_FINISH_LIMIT} tokens")
            token = self._finishing_token()
            self._consume([token])
            out.append(token)
        return out

    def _finishing_token(self):
        allowed = self.allowed()
        s = {c: t for c, t in self.decoder.single.items() if t is not None and allowed[t]}
        if '"' in s and self._closes_string(s['"']):
            return s['"']
        for c in ']}",':
            if c in s:
                return s[c]
        return int(np.argmax(np.where(allowed, self.decoder.lengths, -1)))

    def _closes_string(self, quote):
        """Whether ``quote`` ends a string here: after it, no quote and only a separator or closer may follow.

        (After an opening quote string text or a key's letters follow; forced
        text after a closing one comes as whole tokens, e.g. ``}}``.)
        """
        after = self.matcher.deep_copy()
        after.consume_token(quote)
        allowed = self.allowed(after)
        return not allowed[quote] and allowed.any() and bool(self.decoder.after_string[allowed].all())


def generate(model, tokenizer, prompts, *, grammars, max_tokens, batch_size, progress=None, reference=False):
    """Greedy ``generation.generate`` with prompt ``i`` held to ``grammars[i]``.

    Returns ``[(text, n_generated, n_finishing)]`` in input order: the text
    includes the ``n_finishing`` tokens ``Constraint.finish`` added to a
    sequence cut at ``max_tokens``; ``n_generated`` counts the model's only.
    ``reference``: ``generation.generate``'s (mlx-lm's own decode step).
    """
    decoder = Decoder(tokenizer)
    constraints = [decoder.constraint(g) for g in grammars]
    outputs = generation.generate(model, tokenizer, prompts, max_tokens=max_tokens, batch_size=batch_size,
                                  progress=progress, return_tokens=True, logits_processors=[[c] for c in constraints],
                                  reference=reference)
    out = []
    for c, (_, n, tokens) in zip(constraints, outputs):
        extra = c.finish(tokens)
        out.append((tokenizer.decode(tokens + extra), n, len(extra)))
    return out
