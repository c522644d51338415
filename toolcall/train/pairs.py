"""DPO's preference pairs: from the SFT model's own samples where it can, the gold calls where it cannot.

Each training prompt is sampled ``samples_per_prompt`` times and every sample
is scored with the AST check. With ``dpo.chosen: own`` the *chosen*
completion is one of the model's own passing samples (on-policy: DPO then
ranks two things the model itself says, not a gold rendering it may never
produce, whose likelihood DPO would otherwise pull around); only when no
sample passes is it the gold calls rendered by the SFT template
(``PromptFormat.example``, the SFT target). A passing sample cut at
``max_tokens`` never ended its turn and is not a chosen candidate.
``dpo.chosen: gold`` always takes the gold rendering (the committed arm).

The *rejected* completion is one of the model's failing samples (one pair per
distinct failing sample, each paired with the next of the prompt's passing
samples in a seeded order); a sample cut at ``max_tokens`` is rejected as it
was sampled, with no end-of-turn it never produced. When every sample passes,
a controlled corruption (``CORRUPTIONS``) of the chosen completion's calls
(its parsed calls, or the gold ones), rendered by the same template, takes
its place; each corruption is kept only if the AST check rejects it.

Each pair is classified by where its two completions first differ, in tokens
(``first_difference``): ``against_eos`` when the rejected one ends its turn
where the chosen one goes on (e.g. a dropped call), ``for_eos`` the reverse
(e.g. an extra call), else ``content``. ``dpo.eos_balance`` caps the
``against_eos`` pairs (``balance_eos``). ``summary`` counts pairs by the
source of each side and by that class, for the stage's metrics.
"""

import copy
import json
from collections import Counter

import numpy as np

from toolcall.bfcl.rows import gold_calls
from toolcall.calls.scoring import check
from toolcall.evaluate.score import score_output
from toolcall.train.rollouts import completion_ids, sample

CORRUPTIONS = ("wrong_value", "wrong_type", "missing_required", "wrong_function", "dropped_call", "extra_call")
FIRST_DIFFERENCES = ("against_eos", "for_eos", "content")


# ---------------------------------------------------------------- corruptions


def _other_value(value):
    """A value of the same type that differs from ``value`` (also after BFCL's string standardizing)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 7
    if isinstance(value, float):
        return value * 2 + 1.5
    if isinstance(value, str):
        return value + "zq"
    if isinstance(value, list):
        return value + value[:1] if value else ["zq"]
    if isinstance(value, dict) and value:
        key = next(iter(value))
        return {**value, key: _other_value(value[key])}
    return None


def _other_type(value):
    """``value`` as another JSON type: numbers and booleans as strings, strings as a number."""
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return 1
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return None


def _candidates(row, calls, kind):
    """Every way of applying corruption ``kind`` to ``calls`` (AST validity not yet checked)."""
    offered = [f["name"] for f in row["functions"]]
    required = {f["name"]: f["parameters"].get("required", []) for f in row["functions"]}
    for i, call in enumerate(calls):
        if kind in ("wrong_value", "wrong_type"):
            change = _other_value if kind == "wrong_value" else _other_type
            for param, value in call["arguments"].items():
                new = change(value)
                if new is not None:
                    out = copy.deepcopy(calls)
                    out[i]["arguments"][param] = new
                    yield out
        elif kind == "missing_required":
            for param in required.get(call["name"], []):
                if param in call["arguments"]:
                    out = copy.deepcopy(calls)
                    del out[i]["arguments"][param]
                    yield out
        elif kind == "wrong_function":
            for name in offered:
                if name != call["name"]:
                    out = copy.deepcopy(calls)
                    out[i]["name"] = name
                    yield out
        elif kind == "dropped_call" and len(calls) > 1:
            yield calls[:i] + calls[i + 1:]
        elif kind == "extra_call":
            yield calls + [copy.deepcopy(call)]


def corrupt(row, calls, kind, rng):
    """One AST-invalid corruption of ``calls`` of the given kind, or None if none applies."""
    options = list(_candidates(row, calls, kind))
    for j in rng.permutation(len(options)):
        if not check(row["functions"], options[j], row["ground_truth"], row["category"]).valid:
            return options[j]
    return None


def corruption(row, calls, rng):
    """``(kind, calls)``: a corruption of a randomly chosen applicable kind.

    ``extra_call`` always applies to calls that pass the AST check (every
    category wants an exact call count, at least one), so there is always one.
    """
    for k in rng.permutation(len(CORRUPTIONS)):
        out = corrupt(row, calls, CORRUPTIONS[k], rng)
        if out is not None:
            return CORRUPTIONS[k], out
    raise ValueError(f"{row['id']}: no corruption of the chosen calls fails the AST check")


# ---------------------------------------------------------------- pairs


def first_difference(chosen, rejected, eos):
    """Where completions ``chosen`` and ``rejected`` (token ids) first differ: one of ``FIRST_DIFFERENCES``.

    ``against_eos``: there the rejected one starts its end-of-turn ``eos`` and
    the chosen one goes on, so the pair teaches to lower the end-of-turn's
    probability at that point; ``for_eos`` the reverse; ``content`` anything
    else (a sample cut at ``max_tokens`` ends with no end-of-turn).
    """
    i = next((j for j, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
    chosen_ends, rejected_ends = chosen[i:i + len(eos)] == eos, rejected[i:i + len(eos)] == eos
    if rejected_ends and not chosen_ends:
        return "against_eos"
    if chosen_ends and not rejected_ends:
        return "for_eos"
    return "content"


def preference_pairs(model, tokenizer, fmt, rows, cfg, seed, label):
    """``(pairs, summary)`` from the SFT model's samples on ``rows``' prompts (``cfg``: a ``DpoConfig``)."""
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
    samples = sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.temperature, cfg.max_tokens,
                     seed, cfg.sample_batch, label=label)
    rng = np.random.default_rng(seed)
    built, verdicts = build_pairs(rows, samples, fmt, rng, cfg.max_tokens, cfg.chosen)
    pairs = balance_eos(built, rng) if cfg.eos_balance else built
    return pairs, summary(rows, verdicts, built, pairs)


def build_pairs(rows, samples, fmt, rng, max_tokens, chosen="own"):
    """Preference pairs from ``rows`` and the policy's ``samples`` of each.

    ``samples[i]`` is ``[(text, token_ids)]`` sampled for ``rows[i]``'s prompt
    with at most ``max_tokens`` tokens. ``chosen``: ``own`` (a passing sample,
    the gold rendering where none passes) or ``gold`` (always the gold
    rendering). Returns pairs ``{"id", "prompt_len", "chosen", "rejected"}``
    (token ids: prompt + completion) with ``chosen_source`` (own | gold),
    ``rejected_source`` (own | corruption), ``corruption`` (its kind, or None)
    and ``first_difference``, and the per-sample verdicts.
    """
    eos = fmt.encode(fmt.eos)
    pairs, verdicts = [], []
    for row, row_samples in zip(rows, samples, strict=True):
        gold = gold_calls(row["ground_truth"])
        gold_tokens, prompt_len = fmt.example(row, gold)
        prompt = gold_tokens[:prompt_len]
        # Distinct samples by text (the stop token is not part of the sampled text; the rendered
        # completion ends with it, so it is appended where the sample stopped): text -> (ids, calls).
        passing, failing = {}, {}
        for text, ids in row_samples:
            record = score_output(row, text)
            verdicts.append(record["valid"])
            ended = len(ids) < max_tokens
            key = text + fmt.eos if ended else text
            if not record["valid"]:
                failing.setdefault(key, (completion_ids(ids, eos, max_tokens), None))
            elif ended:  # a chosen completion ends its turn
                passing.setdefault(key, (completion_ids(ids, eos, max_tokens), record["calls"]))
        if chosen == "own" and passing:
            keys = list(passing)
            choices = [("own", keys[j], *passing[keys[j]]) for j in rng.permutation(len(keys))]
        else:
            text = fmt.completion(row["messages"], row["functions"], gold)
            choices = [("gold", text, gold_tokens[prompt_len:], gold)]
        rejected = [("own", None, ids) for ids, _ in failing.values()]
        if not rejected:
            _, chosen_text, _, calls = choices[0]
            kind, bad = corruption(row, calls, rng)
            text = fmt.completion(row["messages"], row["functions"], bad)
            if text != chosen_text:
                rejected.append(("corruption", kind, fmt.encode(text)))
        for i, (source, kind, ids) in enumerate(rejected):
            chosen_source, _, chosen_ids, _ = choices[i % len(choices)]
            pairs.append({"id": row["id"], "prompt_len": prompt_len, "chosen_source": chosen_source,
                          "rejected_source": source, "corruption": kind,
                          "first_difference": first_difference(chosen_ids, ids, eos),
                          "chosen": prompt + list(chosen_ids), "rejected": prompt + list(ids)})
    return pairs, verdicts


def balance_eos(pairs, rng):
    """``pairs`` with at most as many ``against_eos`` pairs as pairs of the other two classes.

    A pair whose rejected completion ends its turn where the chosen one goes
    on lowers the end-of-turn's probability there, and nothing in DPO keeps
    that from spreading to every point an answer could end: when such pairs
    are most of the data the policy learns not to stop (the committed run's
    answers repeated a call until ``max_tokens``). Capping them at the number
    of the other pairs keeps at most half of the pairs teaching against
    stopping, keeps the lesson they carry (do not drop a call), and discards
    no pair of another class. Which ``against_eos`` pairs stay is a draw of
    ``rng`` (seeded: the same pairs every run); the order is kept.
    """
    against = [i for i, p in enumerate(pairs) if p["first_difference"] == "against_eos"]
    keep = len(pairs) - len(against)
    if len(against) <= keep:
        return pairs
    kept = set(rng.choice(against, size=keep, replace=False).tolist())
    return [p for i, p in enumerate(pairs) if p["first_difference"] != "against_eos" or i in kept]


def _count(pairs, key, names):
    counts = Counter(p[key] for p in pairs)
    return {name: counts[name] for name in names}


def summary(rows, verdicts, built, pairs):
    """The metrics of one set of pairs: ``built`` from ``rows``' samples, ``pairs`` kept after balancing."""
    return {
        "prompts": len(rows),
        "samples": len(verdicts),
        "sample_pass_rate": round(float(np.mean(verdicts)), 4),
        "pairs": len(pairs),
        "pairs_by_source": {
            "chosen": _count(pairs, "chosen_source", ("own", "gold")),
            "rejected": _count(pairs, "rejected_source", ("own", "corruption")),
            "corruptions": dict(sorted(Counter(p["corruption"] for p in pairs if p["corruption"]).items())),
        },
        # Before eos_balance drops any: what the samples gave.
        "pairs_built": len(built),
        "built_by_first_difference": _count(built, "first_difference", FIRST_DIFFERENCES),
        "pairs_by_first_difference": _count(pairs, "first_difference", FIRST_DIFFERENCES),
    }
