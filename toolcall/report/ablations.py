"""The ablation sections of the report: scaffolds, generalization, diversity, extra sources, format."""

from pathlib import Path

from toolcall.bfcl import CATEGORIES
from toolcall.io import TIMINGS_SUFFIX, read_json, read_jsonl
from toolcall.report.paired import compare, compare_table
from toolcall.report.verdicts import Claim, VARIANT_NAMES, cell, method_note, points, render_claims
from toolcall.stats import record_table


# The paper's ablations (accuracy, %): Table 2 base -> SFT, Table 3 low vs high diversity.
PAPER_TABLE2 = {"unseen_tools": (30.0, 79.0), "unseen_patterns": (0.0, 42.0)}
PAPER_TABLE3 = {"diversity_low": 27.0, "diversity_high": 53.0}
# The second seed's runs (accuracy, %): its base model and runs 1-3.
SEED_FORMAT = {"base": 90.0, "format_content": 30.0, "format_structured": 60.0, "format_masked": 72.5}
ARM_NAMES = {
    "unseen_tools": "Unseen tools", "unseen_patterns": "Unseen patterns (parallel_multiple)",
    "diversity_low": "Low diversity (simple only)", "diversity_high": "High diversity (equal share of 4)",
    "format_content": "Run 1: calls as text in assistant content",
    "format_structured": "Run 2: structured `tool_calls`, loss on every token",
    "format_masked": "Run 3: structured `tool_calls`, loss on the completion only",
    "extra_main": "The main SFT: the paper's rows + data.extra", "extra_with": "The paper's rows + ablations.extra.sources",
}
# Each scaffold's claimed change (points): the paper claims no benefit for its two; it did not try the third.
SCAFFOLD_CLAIMS = {"JSON repair": 0.0, "best-of-N": 0.0, "constrained decoding": None}


def load_ablations(metrics_dir, predictions_dir):
    """``({kind: {arm: metrics}}, {arm: {id: valid}})`` from metrics/ablations/<kind>/ and the arms' predictions."""
    root = Path(metrics_dir, "ablations")
    # Wall-clock numbers beside the metrics (io.timings_path) are not arms.
    kinds = {d.name: {p.stem: read_json(p) for p in sorted(d.glob("*.json")) if not p.name.endswith(TIMINGS_SUFFIX)}
             for d in sorted(root.iterdir()) if d.is_dir()} if root.is_dir() else {}
    predictions = {p.stem: {r["id"]: r["valid"] for r in read_jsonl(p)}
                   for p in sorted(Path(predictions_dir).glob("*.jsonl"))}
    return kinds, predictions


def _compare(predictions, a, b, claimed, label, cfg, source="paper"):
    """A ``Claim`` for arm ``b`` against arm ``a`` on their shared items, or a "not run" line."""
    if a in predictions and b in predictions:
        c = compare(predictions[a], predictions[b], cfg.equivalence_margin, cfg.alpha, cfg.power)
        return Claim(label, c, claimed, source)
    return f"- {label}: not run"


def scaffold_table(m):
    """``(both, only_greedy, only_arm, neither)``: a scaffolding arm's paired table against its greedy outputs,
    as the stage stored it (``paired``, ``stats.table_record``), checked against the arm's own counts."""
    overall, table = m["overall"], record_table(m["paired"])
    if sum(table) != overall["n"] or table[0] + table[2] != overall["correct"] or min(table) < 0:
        raise ValueError(f"paired table {table} against greedy does not fit the arm's {overall['correct']} "
                         f"correct of {overall['n']}")
    return table


def _label(variant):
    """``unseen_tools_sft`` -> ``SFT, unseen tools``; main variants by their own names."""
    split, _, v = variant.rpartition("_")
    if split in ARM_NAMES and v in VARIANT_NAMES:
        return f"{VARIANT_NAMES[v]}, {ARM_NAMES[split].lower()}"
    return VARIANT_NAMES.get(variant, variant)


def scaffold_section(kinds, metrics, cfg):
    """JSON repair, best-of-N and constrained decoding per variant, each against its own greedy outputs."""
    repair, best, cons = kinds.get("repair", {}), kinds.get("best_of_n", {}), kinds.get("constrained", {})
    names = sorted(set(repair) | set(best) | set(cons), key=lambda v: (v not in VARIANT_NAMES, v))
    if not names:
        return []
    lines = ["## Scaffolding: JSON repair, best-of-N, constrained decoding (paper: 0 benefit when outputs are "
             "already valid JSON)", "",
             "Best-of-N keeps the first sample that parses and fits the offered schemas, else the most frequent; "
             "it never reads the answer. Oracle pass@N: any sample correct (needs the answer: an upper bound). "
             "Constrained: greedy decoding held to a grammar of each item's offered functions (only their names "
             "and parameters, values of their types), on the greedy eval's items; its speed against "
             "unconstrained is in `metrics/ablations/constrained/*.timings.json`.", "",
             "| Variant | Greedy | Malformed JSON (greedy) | + JSON repair | Changed / now correct | Best-of-N "
             "| Greedy → best-of-N, same items | Oracle pass@N | Constrained | Greedy → constrained |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for v in names:
        greedy = kinds.get("eval", {}).get(v) or metrics.get(v)
        r, b, k = repair.get(v), best.get(v), cons.get(v)
        row = [_label(v), cell(greedy["overall"]) if greedy else "—"]
        row += [str(r["repair"]["malformed_json_before"]), cell(r["overall"]),
                f"{r['repair']['changed']} / {r['repair']['changed_and_correct']}"] if r else ["—"] * 3
        judged = {kind: compare_table(scaffold_table(m), cfg.equivalence_margin, cfg.alpha, cfg.power)
                  for kind, m in zip(SCAFFOLD_CLAIMS, (r, b, k)) if m}
        if b:
            s = b["settings"]
            row += [f"{cell(b['overall'])} N={s['n']}, T={s['temperature']}",
                    f"{points(judged['best-of-N'].delta)} pts", cell(b["oracle"])]
        else:
            row += ["—"] * 3
        row += [cell(k["overall"]), f"{points(judged['constrained decoding'].delta)} pts"] if k else ["—"] * 2
        lines.append("| " + " | ".join(row) + " |")
        verdicts += [Claim(f"{_label(v)}, {kind}", c, SCAFFOLD_CLAIMS[kind]) for kind, c in judged.items()]
    return lines + [""] + verdicts + [""]


def generalization_section(kinds, predictions, cfg):
    """Paper Table 2: base vs SFT (vs SFT + scaffolding, vs RL) on splits whose tools or pattern are unseen."""
    ev, repair, best = (kinds.get(k, {}) for k in ("eval", "repair", "best_of_n"))
    splits = [s for s in PAPER_TABLE2 if f"{s}_base" in ev or f"{s}_sft" in ev]
    if not splits:
        return []
    lines = ["## Table 2: generalization (paper: unseen tools base 30% → SFT 79%; unseen patterns 0% → 42%)", "",
             "SFT here is trained on the split's own training side with the `sft` LoRA settings and "
             "`ablations.sft` steps.", "",
             "| Split | Base | SFT | SFT + JSON repair | SFT + best-of-N | SFT + RL | Paper: base → SFT |",
             "|---|---|---|---|---|---|---|"]
    verdicts = []
    for s in splits:
        found = [ev.get(f"{s}_base"), ev.get(f"{s}_sft"), repair.get(f"{s}_sft"), best.get(f"{s}_sft"), ev.get(f"{s}_rl")]
        cells = [cell(m["overall"]) if m else "not run" for m in found]
        base, sft = PAPER_TABLE2[s]
        lines.append(f"| {ARM_NAMES[s]} | " + " | ".join(cells) + f" | {base:.0f}% → {sft:.0f}% |")
        verdicts.append(_compare(predictions, f"{s}_base", f"{s}_sft", sft - base, f"{ARM_NAMES[s]}, base → SFT",
                                 cfg))
        if f"{s}_rl" in predictions and f"{s}_sft" in predictions:
            verdicts.append(_compare(predictions, f"{s}_sft", f"{s}_rl", None,
                                     f"{ARM_NAMES[s]}, SFT → RL (does RL generalize better?)", cfg))
        else:
            verdicts.append(f"- {ARM_NAMES[s]}, SFT → RL: not run (stages ablation_train_rl@{s}, "
                            f"ablation_eval@{s}_rl)")
    return lines + [""] + verdicts + [""]


def _arm_row(name, m, paper, cats, extra=()):
    per_cat = [cell(m["by_category"][c]) if c in m["by_category"] else "—" for c in cats]
    return "| " + " | ".join([name, cell(m["overall"]), paper, *per_cat, *extra]) + " |"


def diversity_section(kinds, predictions, cfg):
    """Paper Table 3: the same budget from simple only vs an equal share of every category."""
    ev, train = kinds.get("eval", {}), kinds.get("train", {})
    arms = [a for a in PAPER_TABLE3 if a in ev]
    if not arms:
        return []
    budget = train[arms[0]]["examples"] if arms[0] in train else "?"
    lines = ["## Table 3: diversity vs quantity (paper, 500 examples: low 27% vs high 53%)", "",
             f"Budget: {budget} training rows per arm, scored on the main test split.", "",
             "| Training data | Ours, overall | Paper | " + " | ".join(CATEGORIES) + " | epochs |",
             "|---" * (len(CATEGORIES) + 4) + "|"]
    for a in arms:
        epochs = str(train[a]["epochs"]) if a in train else "—"
        lines.append(_arm_row(ARM_NAMES[a], ev[a], f"{PAPER_TABLE3[a]:.1f}%", CATEGORIES, [epochs]))
    delta = PAPER_TABLE3["diversity_high"] - PAPER_TABLE3["diversity_low"]
    return lines + ["", _compare(predictions, "diversity_low", "diversity_high", delta, "low → high diversity", cfg),
                     ""]


def extra_section(kinds, metrics, predictions, sft_train, cfg):
    """Issue 16: SFT on the paper's rows plus chosen extra sources (an ablation arm) vs the main study's SFT.

    Both train with all of [sft] at the same seed, so the training rows are the one difference.
    """
    arm = kinds.get("eval", {}).get("extra_with")
    if not arm or "sft" not in metrics:
        return []
    lines = ["## Extra training sources (BFCL live_* / exec_* rows from the same wheel)", "",
             "SFT with all of `[sft]` (its steps, validation and early stopping) and the same seed on the paper's "
             "training rows plus the extra sources of `ablations.extra.sources` (`ablation_train_extra`), against "
             "the main study's SFT of that seed (the paper's rows plus those of `data.extra`); both scored on the "
             "main test split (the paper's four categories, function-disjoint from every training row).", "",
             "| Training data | Ours, overall | " + " | ".join(CATEGORIES) + " | training rows | steps trained |",
             "|---" * (len(CATEGORIES) + 4) + "|"]
    for name, m, t in ((ARM_NAMES["extra_main"], metrics["sft"], sft_train or {}),
                       (ARM_NAMES["extra_with"], arm, kinds.get("train", {}).get("extra_with", {}))):
        per_cat = [cell(m["by_category"][c]) if c in m["by_category"] else "—" for c in CATEGORIES]
        train = [str(t.get(k, "—")) for k in ("examples", "steps_trained")]
        lines.append("| " + " | ".join([name, cell(m["overall"]), *per_cat, *train]) + " |")
    return lines + ["", _compare(predictions, "sft", "extra_with", None, "main SFT → + ablations.extra.sources",
                                 cfg, "this study"), ""]


def format_section(kinds, metrics, predictions, cfg):
    """The second seed's format runs on the same data, steps and max length."""
    ev, train = kinds.get("eval", {}), kinds.get("train", {})
    arms = [a for a in SEED_FORMAT if a.startswith("format_") and a in ev]
    if not arms:
        return []
    lines = ["## The second seed's format lessons (seed: base 90%, run 1 ~30%, run 2 ~60%, run 3 72.5%)", "",
             "Same training rows, steps and max_seq_len in every run; no example exceeds max_seq_len (the stage "
             "refuses to cut a target). A template that ignores `tools` (SmolLM2's) gets the project template, "
             "which writes `tool_calls` as the same `<tool_call>` text run 1 builds by hand, so runs 1 and 2 "
             "differ only where the two renderings do: the last column counts the training examples whose "
             "tokens differ.", "",
             "| Run | Ours, overall | Seed | " + " | ".join(CATEGORIES)
             + " | examples | max_seq_len | longest example | targets unlike structured |",
             "|---" * (len(CATEGORIES) + 7) + "|"]
    if "base" in metrics:
        lines.append(_arm_row("Base model", metrics["base"], f"{SEED_FORMAT['base']:.1f}%", CATEGORIES,
                              ["—"] * 4))
    for a in arms:
        t = train.get(a, {})
        extra = [str(t.get(k, "—")) for k in ("examples", "max_seq_len", "tokens_max", "targets_unlike_structured")]
        lines.append(_arm_row(ARM_NAMES[a], ev[a], f"{SEED_FORMAT[a]:.1f}%", CATEGORIES, extra))
    seed = SEED_FORMAT
    return lines + [
        "",
        _compare(predictions, "format_content", "format_structured", seed["format_structured"] - seed["format_content"],
                 "run 1 → run 2 (structured targets)", cfg, "seed"),
        _compare(predictions, "format_structured", "format_masked", seed["format_masked"] - seed["format_structured"],
                 "run 2 → run 3 (completion-only loss; the seed's gain came from a larger max_length, "
                 "its loss flag was a no-op)", cfg, "seed"),
        "",
    ]


def ablation_sections(metrics_dir, ablation_predictions_dir, metrics, predictions, cfg, sft_train=None):
    """Every ablation section that has results, as markdown lines (main ``metrics``/``predictions`` for base/sft,
    ``sft_train``: the main SFT's training metrics).

    Every claim in them is one family for Holm's adjustment.
    """
    kinds, abl_predictions = load_ablations(metrics_dir, ablation_predictions_dir)
    predictions = {**predictions, **abl_predictions}
    parts = (scaffold_section(kinds, metrics, cfg) + generalization_section(kinds, predictions, cfg)
             + diversity_section(kinds, predictions, cfg)
             + extra_section(kinds, metrics, predictions, sft_train, cfg)
             + format_section(kinds, metrics, predictions, cfg))
    family = sum(isinstance(p, Claim) for p in parts)
    return [method_note(cfg, family), ""] + render_claims(parts, cfg)
