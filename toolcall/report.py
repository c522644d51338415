"""The study's report: our numbers with n and 95% intervals, beside the papers', with a verdict per comparison."""

import dataclasses
import math
from pathlib import Path
from typing import Optional

from .data import CATEGORIES
from .io import TIMINGS_SUFFIX, read_json, read_jsonl
from .paired import Comparison, compare, compare_table, holm

# "What Actually Improves LLM Tool Calling?" Table 1 (overall accuracy, %).
PAPER_TABLE1 = {"base": 9.7, "sft": 57.0, "sft_dpo": 57.7, "sft_rl": 58.0}
VARIANT_NAMES = {"base": "Base model", "sft": "SFT", "sft_dpo": "SFT + DPO", "sft_rl": "SFT + RL"}


def pct(x):
    return f"{100 * x:.1f}%"


def cell(m):
    """``57.0% [50.1–63.7] (n=200)``: accuracy, Wilson 95% interval, n."""
    lo, hi = m["ci95"]
    return f"{pct(m['accuracy'])} [{100 * lo:.1f}–{100 * hi:.1f}] (n={m['n']})"


def points(x):
    """An accuracy difference in points: ``+3.0``."""
    return f"{100 * x:+.1f}"


def interval(ci):
    """``[-1.1, +7.1]``: an interval of differences, in points."""
    return f"[{points(ci[0])}, {points(ci[1])}]"


def detectable(c):
    """The minimum detectable difference, in points, or why there is none."""
    return f"{100 * c.mde:.1f} pts" if math.isfinite(c.mde) else "none (too few items)"


def verdict_text(c, cfg):
    """The four-way verdict as the reports print it; a difference smaller than the margin says so."""
    margin = f"±{100 * cfg.equivalence_margin:g} pts"
    if c.verdict == "equivalent":
        return f"equivalent within {margin}"
    if c.verdict in ("better", "worse") and c.within_margin:
        return f"{c.verdict}, by less than {margin}"
    return c.verdict


def claim_relation(c, claimed, cfg, source="paper"):
    """Our comparison against a claimed change (points; None: the source gives no number).

    A claimed change smaller than the equivalence margin (the paper's "< 1
    point" for DPO and RL, "no benefit" for scaffolding) is a claim of no
    relevant effect and is tested as equivalence. A larger one is checked for
    direction and size: is the claimed value inside our interval?
    """
    if claimed is None:
        return f"{source}: no number given"
    margin = 100 * cfg.equivalence_margin
    level = f"{100 * (1 - cfg.alpha):g}% CI"
    if abs(claimed) < margin:
        head = f"{source} {claimed:+.1f} pts, a claim of no effect beyond ±{margin:g} pts: "
        if c.verdict == "equivalent":
            return head + "holds (equivalent)"
        if c.within_margin:
            return head + f"holds up to the margin (a difference, but smaller than ±{margin:g} pts)"
        if c.verdict in ("better", "worse"):
            return head + (f"not reproduced: it {'helps' if c.verdict == 'better' else 'hurts'} and is not shown "
                           f"to stay within ±{margin:g} pts")
        return head + f"undecided at this n: neither a difference nor equivalence shown (MDE {detectable(c)})"
    sign = 1 if claimed > 0 else -1
    lo, hi = sorted((sign * c.ci[0], sign * c.ci[1]))
    target = abs(claimed) / 100
    tail = f"{source} {claimed:+.1f} pts"
    if lo <= target <= hi:
        return f"{tail}: consistent with the claimed size ({level} includes it)"
    same, opposite = ("better", "worse") if sign > 0 else ("worse", "better")
    if c.verdict == opposite:
        return f"{tail}: opposite direction ({level} excludes it)"
    size = "smaller" if hi < target else "larger"
    direction = {same: "same direction, ", "equivalent": f"no effect beyond ±{margin:g} pts, "}.get(
        c.verdict, "direction not shown, ")
    return f"{tail}: {direction}{size} than claimed ({level} excludes it)"


def method_note(cfg, family):
    """What every verdict in a report means, and the multiplicity of its ``family`` of paired tests."""
    margin = 100 * cfg.equivalence_margin
    return (f"Paired comparisons on the same items, Δ = the second accuracy minus the first, with its "
            f"{100 * (1 - cfg.alpha):g}% interval by Newcombe's hybrid score method for paired data (1998, method "
            f"10). Verdict: **better** / **worse** when that interval excludes 0; else **equivalent** when the "
            f"{100 * (1 - 2 * cfg.alpha):g}% interval lies within ±{margin:g} pts (TOST at α={cfg.alpha:g}: its p "
            f"is below α exactly then); else **inconclusive**. A difference that is also within the margin reads "
            f"\"better, by less than ±{margin:g} pts\". MDE: the smallest difference the comparison could detect "
            f"with {100 * cfg.power:g}% power at two-sided α={cfg.alpha:g} (Connor 1987: McNemar's test at the "
            f"observed discordance rate, or at the rate the difference itself needs where that is higher); it is "
            f"about detecting a difference, while equivalence is read from the interval. Multiplicity: this report "
            f"makes {family} paired comparison{'s' if family != 1 else ''}; Holm p is each exact McNemar p adjusted "
            f"over all of them (Holm 1979). Verdicts are per comparison and unadjusted: a better/worse whose Holm p "
            f"is ≥ {cfg.alpha:g} does not survive the correction.")


@dataclasses.dataclass(frozen=True)
class Claim:
    """A comparison to render once the whole report's family is known (for Holm)."""

    label: str
    comparison: Comparison
    claimed: Optional[float]  # the source's change in points; None: no number given
    source: str = "paper"


def claim_line(claim, holm_p, cfg):
    """``- label: **verdict**: ours Δ [CI] ...; paper ...: relation``."""
    c = claim.comparison
    return (f"- {claim.label}: **{verdict_text(c, cfg)}**: ours {points(c.delta)} pts {interval(c.ci)} on n={c.n} "
            f"paired items ({c.only_base} vs {c.only_other} discordant; exact McNemar p={c.p_value:.3f}, "
            f"Holm p={holm_p:.3f}, TOST p={c.p_equivalence:.3f}; MDE {detectable(c)}); "
            f"{claim_relation(c, claim.claimed, cfg, claim.source)}")


def render_claims(parts, cfg):
    """Markdown lines from sections' lines and ``Claim``s, Holm-adjusted over every claim among them."""
    adjusted = iter(holm([p.comparison.p_value for p in parts if isinstance(p, Claim)]))
    return [claim_line(p, next(adjusted), cfg) if isinstance(p, Claim) else p for p in parts]


def main_table(metrics, predictions, cfg, baseline="base"):
    """Table 1 layout: overall and per category, the paper beside us, each variant's paired Δ against the baseline."""
    variants = [v for v in VARIANT_NAMES if v in metrics]
    cats = [c for c in CATEGORIES if any(c in metrics[v]["by_category"] for v in variants)]
    level = f"{100 * (1 - cfg.alpha):g}%"
    lines = [
        "| Method | Ours, overall | Paper | " + " | ".join(cats) + " | Δ vs " + VARIANT_NAMES.get(baseline, baseline)
        + f", paired {level} CI |",
        "|---" * (len(cats) + 4) + "|",
    ]
    for v in variants:
        m = metrics[v]
        per_cat = [cell(m["by_category"][c]) if c in m["by_category"] else "—" for c in cats]
        delta = "—"
        if v != baseline and baseline in predictions and v in predictions:
            c = compare(predictions[baseline], predictions[v], cfg.equivalence_margin, cfg.alpha, cfg.power)
            delta = f"{points(c.delta)} pts {interval(c.ci)}"
        paper = f"{PAPER_TABLE1[v]:.1f}%" if v in PAPER_TABLE1 else "—"
        lines.append(f"| {VARIANT_NAMES[v]} | {cell(m['overall'])} | {paper} | " + " | ".join(per_cat)
                     + f" | {delta} |")
    return "\n".join(lines)


# Each post-training step against the model it starts from (DPO and RL continue SFT).
STEPS = (("base", "sft"), ("sft", "sft_dpo"), ("sft", "sft_rl"))


def step_comparisons(predictions, cfg):
    """``[(before, after, Comparison)]`` for each step in STEPS with predictions on both sides."""
    return [(before, after, compare(predictions[before], predictions[after], cfg.equivalence_margin, cfg.alpha,
                                    cfg.power))
            for before, after in STEPS if before in predictions and after in predictions]


def step_table(steps, cfg):
    """Each step's paired comparison: Δ and interval, McNemar, Holm and TOST p, MDE, verdict, the paper's claim."""
    level = f"{100 * (1 - cfg.alpha):g}% CI"
    lines = [f"| Step | n | Δ accuracy [{level}] | discordant (only before / only after) | exact McNemar p | Holm p "
             f"| TOST p (±{100 * cfg.equivalence_margin:g} pts) | MDE ({100 * cfg.power:g}% power) | verdict "
             f"| vs the paper |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    adjusted = holm([c.p_value for _, _, c in steps])
    for (before, after, c), holm_p in zip(steps, adjusted):
        claimed = PAPER_TABLE1[after] - PAPER_TABLE1[before]
        lines.append(f"| {VARIANT_NAMES[after]} vs {VARIANT_NAMES[before]} | {c.n} | {points(c.delta)} pts "
                     f"{interval(c.ci)} | {c.only_base} / {c.only_other} | {c.p_value:.3f} | {holm_p:.3f} | "
                     f"{c.p_equivalence:.3f} | {detectable(c)} | {verdict_text(c, cfg)} | "
                     f"{claim_relation(c, claimed, cfg)} |")
    return "\n".join(lines)


def error_table(metrics, top=6):
    variants = [v for v in VARIANT_NAMES if v in metrics]
    lines = ["| Method | most frequent errors (count) |", "|---|---|"]
    for v in variants:
        errs = list(metrics[v].get("errors", {}).items())[:top]
        lines.append(f"| {VARIANT_NAMES[v]} | " + ", ".join(f"`{e}` {n}" for e, n in errs) + " |")
    return "\n".join(lines)


def bar_chart(metrics, path):
    """Grouped bars per category with Wilson intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANT_NAMES if v in metrics]
    groups = ["overall"] + [c for c in CATEGORIES if c in metrics[variants[0]]["by_category"]]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, v in enumerate(variants):
        ms = [metrics[v]["overall"] if g == "overall" else metrics[v]["by_category"][g] for g in groups]
        acc = [m["accuracy"] for m in ms]
        err = [[a - m["ci95"][0] for a, m in zip(acc, ms)], [m["ci95"][1] - a for a, m in zip(acc, ms)]]
        ax.bar([x + i * width for x in range(len(groups))], acc, width, yerr=err, capsize=3,
               label=VARIANT_NAMES[v])
    ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(groups))], groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AST accuracy (95% Wilson CI)")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- ablations

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
    "extra_without": "Without the extra sources", "extra_with": "With the extra sources (data.extra)",
}


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
    """The paired table of a scaffolding arm against its greedy outputs, from its metrics.

    ``vs_greedy`` keeps the discordant counts; the items both get right are
    the arm's correct ones less those only it gets right.
    """
    vs = m["vs_greedy"]
    if vs["n"] != m["overall"]["n"]:
        raise ValueError(f"vs_greedy covers {vs['n']} items, the arm's metrics {m['overall']['n']}")
    both = m["overall"]["correct"] - vs["only_other"]
    return both, vs["only_base"], vs["only_other"], vs["n"] - both - vs["only_base"] - vs["only_other"]


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
        if b:
            s = b["settings"]
            row += [f"{cell(b['overall'])} N={s['n']}, T={s['temperature']}",
                    f"{points(b['vs_greedy']['delta'])} pts", cell(b["oracle"])]
        else:
            row += ["—"] * 3
        row += [cell(k["overall"]), f"{points(k['vs_greedy']['delta'])} pts"] if k else ["—"] * 2
        lines.append("| " + " | ".join(row) + " |")
        # The paper claims no benefit for its two scaffolds; it did not try constrained decoding.
        for kind, m, claimed in (("JSON repair", r, 0.0), ("best-of-N", b, 0.0), ("constrained decoding", k, None)):
            if m:
                c = compare_table(scaffold_table(m), cfg.equivalence_margin, cfg.alpha, cfg.power)
                verdicts.append(Claim(f"{_label(v)}, {kind}", c, claimed))
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


def extra_section(kinds, predictions, cfg):
    """Issue 16: SFT on the training split without vs with the extra sources, same settings, same test items."""
    ev, train = kinds.get("eval", {}), kinds.get("train", {})
    arms = [a for a in ("extra_without", "extra_with") if a in ev]
    if not arms:
        return []
    lines = ["## Extra training sources (BFCL live_* / exec_* rows from the same wheel)", "",
             "SFT with the `sft` LoRA settings and `ablations.sft` steps on the training split less the extra "
             "sources' rows, and on all of it; both scored on the main test split (the paper's four "
             "categories, function-disjoint from every training row).", "",
             "| Training data | Ours, overall | " + " | ".join(CATEGORIES) + " | training rows |",
             "|---" * (len(CATEGORIES) + 3) + "|"]
    for a in arms:
        per_cat = [cell(ev[a]["by_category"][c]) if c in ev[a]["by_category"] else "—" for c in CATEGORIES]
        rows = str(train.get(a, {}).get("examples", "—"))
        lines.append("| " + " | ".join([ARM_NAMES[a], cell(ev[a]["overall"]), *per_cat, rows]) + " |")
    return lines + ["", _compare(predictions, "extra_without", "extra_with", None, "without → with the extra sources",
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


def ablation_sections(metrics_dir, ablation_predictions_dir, metrics, predictions, cfg):
    """Every ablation section that has results, as markdown lines (main ``metrics``/``predictions`` for base/sft).

    Every claim in them is one family for Holm's adjustment.
    """
    kinds, abl_predictions = load_ablations(metrics_dir, ablation_predictions_dir)
    predictions = {**predictions, **abl_predictions}
    parts = (scaffold_section(kinds, metrics, cfg) + generalization_section(kinds, predictions, cfg)
             + diversity_section(kinds, predictions, cfg) + extra_section(kinds, predictions, cfg)
             + format_section(kinds, metrics, predictions, cfg))
    family = sum(isinstance(p, Claim) for p in parts)
    return [method_note(cfg, family), ""] + render_claims(parts, cfg)
