"""Training rows composed from the training side's own rows: more calls per row, more functions offered.

The tuned model answers BFCL's parallel items with two calls where gold has
three or four, and no tool-calling corpus installs offline; so these rows are
composed from the training rows alone (issue 31), three kinds, each a normalized
row (``toolcall.bfcl.rows``) of category ``<kind>`` and ``source``
``composed_<kind>``:

* ``parallel``: a single-call row whose question states a required
  argument's value (once, literally) asks for 2 or more calls of its
  function, that argument enumerated over other values: those of the same
  function's parameter in other training rows first, then (numbers) values
  near the stated one or (names) other training values of a parameter of the
  same name and type; only the schema's ``enum`` where it has one; never a
  value another argument has, nor one an answer accepts as the same. The
  values are listed in place of the stated one ("... in Paris, London and
  Tokyo") or asked for after the question ("Then do the same for city London
  and Tokyo."); the gold calls follow the question's order.
* ``parallel_multiple``: 2-3 questions over different functions (single-call
  rows and the training parallel rows) joined into one; offered the union of
  their functions, gold the concatenation of their calls.
* ``multiple``: a single-call row offered 1-3 more functions of other training
  rows, as BFCL's multiple rows offer 2-4.

A single-call row is a training row answered by one call, with one user
message: the simple rows, and the multiple rows offering only their answered
function. A parallel kind's rows have their call counts in the shares of
``compose.call_weights`` exactly (largest remainder). Only training rows are
read, so every function offered is a training function: the split stays
function-disjoint. A row is kept only when it is new (no training or composed
row has its question, functions and answer) and ``problem(row)`` finds none
(stage compose passes validate's ``row_problem``: the gold calls pass the
scorer's check, and the template round-trips them within validate.max_seq_len);
others are counted by reason, and each planned row is tried again from other
draws, ``ATTEMPTS`` times at most.
"""

import json
import random
import re
from collections import Counter, defaultdict

from toolcall.errors import DataError

KINDS = ("parallel", "parallel_multiple", "multiple")
# Draws per planned row before giving up: on BFCL's training side a draw fails
# (a duplicate, a row past the length cap) far less than one time in ten, so
# running out means the training side cannot give the row, not bad luck.
ATTEMPTS = 50
DISTRACTORS = (1, 2, 3)  # extra functions of a multiple row: BFCL's offer 2-4 functions in all
PARTS = (2, 3)  # questions joined into a parallel_multiple row
SCALAR = {"integer": int, "float": float, "string": str}
MAX_STRING = 40  # a longer value is a sentence or a path, not something to list
# Words a question may start with that stay correct when lower-cased mid-sentence ("Also, find ...");
# a question starting otherwise (a name, "I") is joined without a lower-cased connector.
STARTS = {"find", "what", "calculate", "can", "could", "get", "what's", "how", "who", "give", "book", "predict",
          "create", "retrieve", "provide", "check", "fetch", "generate", "search", "convert", "analyze", "run",
          "perform", "solve", "look", "locate", "when", "determine", "translate", "identify", "estimate", "where",
          "which", "tell", "show", "list", "compute", "please", "would", "is", "are", "do", "does", "order",
          "send", "plan", "recommend", "suggest", "compare", "evaluate", "measure", "make", "set", "update"}
# Asking for the other values after the question: {list} is "London and Tokyo"; the last one names the
# parameter before each value.
APPEND = ("Then do the same for {param} {list}.", "Repeat this with {param} {list} as well.",
          "Also do it for {param} {list}.", "Do this for {param} {list} too.",
          "Then do it again with {param} {each}.")


def _first(allowed):
    values = [v for v in allowed if v != ""]
    return values[0] if values else None


def _norm(value):
    """What makes two listed values the same (the scorer ignores case and punctuation in strings)."""
    return re.sub(r"\W", "", value.casefold()) if isinstance(value, str) else value


def _bare(text):
    """A question without the quotes some BFCL questions are wrapped in, ending as a sentence does."""
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" and text.count(text[0]) == 2:
        text = text[1:-1].strip()
    return text if text[-1:] in ".?!" else text + "."


def _lower(text):
    """``text`` with its first word lower-cased, or None where that could be wrong (see ``STARTS``)."""
    word = text.split(maxsplit=1)[0]
    if word[0].islower():
        return text
    return text[0].lower() + text[1:] if word.lower() in STARTS and word[1:] == word[1:].lower() else None


def _join(items, rng):
    items = [str(i) for i in items]
    if len(items) < 3:
        return " and ".join(items)
    return ", ".join(items[:-1]) + rng.choice((" and ", ", and ")) + items[-1]


def _key(row):
    return json.dumps([row["messages"], [f["name"] for f in row["functions"]], row["ground_truth"]], sort_keys=True)


class Sources:
    """What the composers draw on: the training rows' questions, functions and argument values."""

    def __init__(self, rows):
        self.singles, self.parts, self.functions = [], [], {}
        self.by_function, self.by_name = defaultdict(set), defaultdict(set)
        # Strings one answer accepts together ("USA", "United States"): the same value when listing others.
        self.synonyms = defaultdict(set)
        for row in rows:
            for fn in row["functions"]:
                self.functions.setdefault(fn["name"], fn)
            for entry in row["ground_truth"]:
                ((name, params),) = entry.items()
                fn = self.functions.get(name, {})
                props = fn.get("parameters", {}).get("properties", {})
                for param, allowed in params.items():
                    same = {_norm(a) for a in allowed if isinstance(a, str) and a}
                    for norm in same:
                        self.synonyms[norm] |= same
                    value, type_name = _first(allowed), props.get(param, {}).get("type")
                    if type_name in SCALAR and type(value) is SCALAR[type_name]:
                        self.by_function[name, param].add(value)
                        self.by_name[param, type_name].add(value)
            if len(row["messages"]) != 1 or row["messages"][0]["role"] != "user" or row["category"] == "parallel_multiple":
                continue
            names = {name for entry in row["ground_truth"] for name in entry}
            part = {"id": row["id"], "question": _bare(row["messages"][0]["content"]),
                    "functions": [fn for fn in row["functions"] if fn["name"] in names],
                    "ground_truth": row["ground_truth"]}
            if len(names) == 1 and len(part["functions"]) == 1:
                self.parts.append(part)
                if len(row["ground_truth"]) == 1:
                    self.singles.append(part)
        self.seen = {_key(row) for row in rows}
        self.listable = [(single, options) for single in self.singles if (options := self.enumerable(single))]
        self.by_calls = defaultdict(list)
        for part in self.parts:
            self.by_calls[len(part["ground_truth"])].append(part)
        self.names = sorted(self.functions)

    # ---------------------------------------------------------------- parallel

    def enumerable(self, single):
        """``[(param, value, (start, end))]``: the arguments of ``single``'s call stated once in its question."""
        ((_, params),) = single["ground_truth"][0].items()
        props = single["functions"][0]["parameters"].get("properties", {})
        firsts = {p: _first(a) for p, a in params.items()}
        found = []
        for param, value in firsts.items():
            type_name = props.get(param, {}).get("type")
            # An argument that may be left out ("" allowed) is a default, not something the question asks for.
            if (type_name not in SCALAR or type(value) is not SCALAR[type_name] or "" in params[param]
                    or list(firsts.values()).count(value) > 1):
                continue
            if isinstance(value, str) and not 2 <= len(value) <= MAX_STRING:
                continue
            forms = [value] if isinstance(value, str) else [repr(value)] + (
                [str(int(value))] if isinstance(value, float) and value.is_integer() else [])
            spans = [m.span() for form in dict.fromkeys(forms)
                     for m in re.finditer(rf"(?<![\w.]){re.escape(str(form))}(?!\w|\.\d)", single["question"],
                                          re.IGNORECASE if isinstance(value, str) else 0)]
            if len(spans) == 1:
                found.append((param, value, spans[0]))
        return found

    def candidates(self, name, param, params, schema, rng):
        """Other values for ``param`` of function ``name`` in a call of arguments ``params``, best first (see the
        module's docstring), shuffled within each tier; none the same as another argument's."""
        value = _first(params[param])
        if "enum" in schema:
            tiers = [[v for v in schema["enum"] if type(v) is type(value)]]
        elif isinstance(value, str):
            # Names ("Paris", "Lakers") stand in for each other across functions; common words and codes
            # ("cm", "all") mean something else in another function.
            tiers = [self.by_function[name, param],
                     [v for v in self.by_name[param, schema["type"]] if v[:1].isupper() and value[:1].isupper()]]
        else:
            tiers = [self.by_function[name, param], _near(value)]
        out, taken = [], set().union(*(self.same(_first(a)) for a in params.values()))
        for tier in tiers:
            tier = sorted(tier, key=repr)
            rng.shuffle(tier)
            for v in tier:
                if type(v) is type(value) and not self.same(v) & taken and not (isinstance(v, str) and len(v) > MAX_STRING):
                    taken |= self.same(v)
                    out.append(v)
        return out

    def same(self, value):
        """What ``value`` counts as when listed: its normal form and its synonyms' (none for lists, dicts,
        booleans, which are never listed)."""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return set()
        return {_norm(value)} | self.synonyms.get(_norm(value), set())

    def parallel(self, calls, rng):
        """A parallel row of ``calls`` calls from a random single-call row, or None if the draw cannot give one."""
        single, options = rng.choice(self.listable)
        param, value, (start, end) = rng.choice(options)
        fn = single["functions"][0]
        ((name, params),) = single["ground_truth"][0].items()
        others = self.candidates(name, param, params, fn["parameters"]["properties"][param], rng)[:calls - 1]
        if len(others) < calls - 1:
            return None
        q, words = single["question"], param.replace("_", " ")
        stated = q[start:end]
        values = [value, *others]

        def text(v):
            return stated if v is value else _text(v, stated)

        # A value inside a range ("between 1 and 10") or quotes cannot become a list in place.
        fixed = re.search(r"(\b(between|from|and|to)\s+|['\"])$", q[max(0, start - 9):start].lower()) or re.match(
            r"\s*(and\b|to\b|-)", q[end:end + 5].lower())
        if not fixed and rng.random() < 0.5:
            rng.shuffle(values)
            listed = _join([text(v) for v in values], rng)
            question = q[:start] + listed + q[end:]
        else:
            rest = [text(v) for v in others]
            question = q + " " + rng.choice(APPEND).format(param=words, list=_join(rest, rng),
                                                           each=f", and again with {words} ".join(rest))
        gold = [{name: params} if v is value else {name: {**params, param: [v]}} for v in values]
        return {"question": question, "functions": [fn], "ground_truth": gold, "used": [single["id"]]}

    # ---------------------------------------------------------------- parallel_multiple, multiple

    def parallel_multiple(self, calls, rng):
        """A parallel_multiple row of ``calls`` calls joined from 2-3 rows of different functions, or None."""
        splits = _splits(calls, sorted(self.by_calls))
        if not splits:
            return None
        parts = [rng.choice(self.by_calls[n]) for n in rng.choice(splits)]
        names = [part["functions"][0]["name"] for part in parts]
        if len(set(names)) < len(parts):
            return None
        functions = [part["functions"][0] for part in parts]
        rng.shuffle(functions)
        return {"question": _connect([part["question"] for part in parts], rng), "functions": functions,
                "ground_truth": [entry for part in parts for entry in part["ground_truth"]],
                "used": [part["id"] for part in parts]}

    def multiple(self, calls, rng):
        """A multiple row: a random single-call row offered other training functions too."""
        single = rng.choice(self.singles)
        name = single["functions"][0]["name"]
        others = rng.sample([n for n in self.names if n != name], rng.choice(DISTRACTORS))
        functions = [self.functions[n] for n in others]
        functions.insert(rng.randrange(len(functions) + 1), single["functions"][0])
        return {"question": single["question"], "functions": functions, "ground_truth": single["ground_truth"],
                "used": [single["id"]]}


def _near(value):
    """Numbers near ``value``, of its type and sign (floats at its precision, at least one decimal; below 1 if it is:
    a rate or a probability)."""
    if not value:
        return {1, 2, 5, 10} if isinstance(value, int) else {0.5, 1.0, 1.5, 2.0}
    if isinstance(value, int):
        near = {value + 1, value + 2, value + 5, value + 10, value * 2, value * 3, value - 1, value // 2}
    else:
        decimals = min(4, max(1, len(repr(value).partition(".")[2])))
        near = {round(value * f, decimals) for f in (0.5, 1.5, 2, 2.5, 3)} | {round(value + 1, decimals)}
    return {v for v in near if v != value and (v > 0) == (value > 0) and (v < 1 or not 0 < value < 1)}


def _text(value, stated):
    """``value`` written as the question wrote the value it replaces (``6`` for 6.0 if it wrote "6")."""
    if isinstance(value, float) and value.is_integer() and "." not in stated:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _splits(calls, sizes):
    """Every way to write ``calls`` as 2-3 parts of the available call counts ``sizes`` (ordered)."""
    out = []

    def grow(prefix, left):
        if left == 0 and len(prefix) in PARTS:
            out.append(prefix)
        if len(prefix) < max(PARTS):
            for n in sizes:
                if n <= left:
                    grow(prefix + [n], left - n)

    grow([], calls)
    return out


def _connect(questions, rng):
    """One question asking all of ``questions``, in order, with connecting words where they read right."""
    tail = [_lower(q) for q in questions[1:]]
    style = rng.randrange(3) if all(tail) else 0
    if style == 0:
        return " ".join(questions)
    if style == 1:
        middle = ["Also, " + t for t in tail[:-1]]
        last = rng.choice(("Also, ", "Finally, ") if len(questions) > 2 else ("Also, ", "After that, "))
        return " ".join([questions[0], *middle, last + tail[-1]])
    head = _lower(questions[0])
    if head is None:
        return " ".join(questions)
    words = ["First, ", *["Then, "] * (len(questions) - 2), "Finally, " if len(questions) > 2 else "Then, "]
    return " ".join(w + q for w, q in zip(words, [head, *tail]))


def plan_calls(n, weights):
    """``n`` call counts (2, 3, ... by ``weights``' positions) in exactly ``weights``' shares: each count gets
    its floor, the largest remainders one more (ties: the smaller count)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[:n - sum(counts)]:
        counts[i] += 1
    return [calls for calls, c in enumerate(counts, 2) for _ in range(c)]


def compose(rows, p, problem):
    """``(composed, metrics)``: rows composed from the training ``rows`` by params ``p`` ([compose]).

    ``problem(row)`` returns why a row must not be trained on, or None. Raises
    a ``DataError`` naming the key when a planned row cannot be composed.
    """
    sources = Sources(rows)
    rng = random.Random(p.seed)
    composed, metrics = [], {"n": 0, "by_kind": {}, "calls": Counter(), "n_dropped": 0}
    for kind in KINDS:
        n = getattr(p, f"n_{kind}")
        if n and not (sources.listable if kind == "parallel" else sources.singles):
            raise DataError(f"compose.n_{kind}={n}, but no training row has a single call and one user message to "
                            "compose from" + (", one of whose argument values its question states once"
                                              if kind == "parallel" else "") + ": set it to 0")
        plan = [1] * n if kind == "multiple" else plan_calls(n, p.call_weights)
        rng.shuffle(plan)
        made, dropped, used = [], Counter(), set()
        for calls in plan:
            for _ in range(ATTEMPTS):
                draft = getattr(sources, kind)(calls, rng)
                if draft is None:
                    continue  # this draw cannot give the row (no value to list, a function twice): not a row
                row = {"id": f"composed_{kind}_{len(made)}", "category": kind,
                       "messages": [{"role": "user", "content": draft["question"]}],
                       "functions": draft["functions"], "ground_truth": draft["ground_truth"],
                       "source": f"composed_{kind}"}
                reason = "duplicate" if _key(row) in sources.seen else problem(row)
                if reason:
                    dropped[reason] += 1
                    continue
                sources.seen.add(_key(row))
                made.append(row)
                used.update(draft["used"])
                break
            else:
                raise DataError(f"compose.n_{kind}={n}: no new {kind} row of {calls} call(s) after {ATTEMPTS} draws "
                                f"from the {len(rows)} training rows (dropped so far: {dict(dropped)}); lower "
                                f"compose.n_{kind}" + ("" if kind == "multiple" else " or the weight of "
                                                       f"{calls} calls in compose.call_weights"))
        hist = Counter(len(row["ground_truth"]) for row in made)
        metrics["by_kind"][kind] = {"n": len(made), "calls": {str(k): hist[k] for k in sorted(hist)},
                                    "training_rows_used": len(used), "n_dropped": sum(dropped.values()),
                                    "dropped": dict(sorted(dropped.items()))}
        metrics["calls"].update(hist)
        metrics["n"] += len(made)
        metrics["n_dropped"] += sum(dropped.values())
        composed += made
    metrics["calls"] = {str(k): metrics["calls"][k] for k in sorted(metrics["calls"])}
    return composed, metrics
