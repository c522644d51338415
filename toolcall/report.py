"""The study's report: our numbers with n and 95% intervals, beside the papers', with a verdict per comparison.

The main study's runs (every scored item of base, and of SFT, SFT + DPO and
SFT + RL under each seed) are one pandas DataFrame, one row per (variant,
run, item); accuracies, seed spreads, error shares and the items x seeds
matrices of the paired comparisons are group-bys and pivots of it.
"""

import dataclasses
import math
from pathlib import Path
from typing import Optional

import pandas as pd

from .data import CATEGORIES
from .errors import DataError
from .io import TIMINGS_SUFFIX, read_json, read_jsonl, run_path
from .paired import (Comparison, adjusted_verdict, compare, compare_seeds, compare_table, family_holm)

# "What Actually Improves LLM Tool Calling?" Table 1 (overall accuracy, %).
PAPER_TABLE1 = {"base": 9.7, "sft": 57.0, "sft_dpo": 57.7, "sft_rl": 58.0}
VARIANT_NAMES = {"base": "Base model", "sft": "SFT", "sft_dpo": "SFT + DPO", "sft_rl": "SFT + RL"}
# BFCL's leaderboard, non-live AST accuracy (%) per category (python simple, multiple, parallel,
# parallel_multiple), full test sets: data_non_live.csv of the gorilla repo's gh-pages branch,
# 2025-12 snapshot. FC: the model's native function calling; prompted: tools in the prompt.
LEADERBOARD = {
    "Granite-4.0-350m (FC)": (83.0, 84.5, 70.0, 55.5),
    "Hammer2.1-0.5b (FC)": (83.25, 81.0, 69.0, 51.5),
    "Qwen2.5-0.5B-Instruct (FC)": (81.5, 78.0, 60.0, 50.0),
    "Llama-3.2-1B-Instruct (FC)": (75.0, 50.5, 44.0, 15.0),
    "Gemma-3-1b-it (prompted)": (64.0, 36.0, 0.0, 1.5),
}


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


def method_note(cfg, family, seeds=1):
    """What every verdict in a report means, and the multiplicity of its ``family`` of paired comparisons.

    ``seeds``: how many seeds the report's trained variants replicate over (1: single runs).
    """
    margin = 100 * cfg.equivalence_margin
    level, level_eq = f"{100 * (1 - cfg.alpha):g}%", f"{100 * (1 - 2 * cfg.alpha):g}%"
    if seeds > 1:
        interval_text = (
            f"Each trained variant ran once per seed ({seeds} seeds), DPO and RL continuing their own seed's SFT, "
            f"and every run answers the same items: Δ is the mean over items and seeds, and its {level} interval "
            f"comes from a two-way random-effects analysis of the paired differences (items x seeds, both "
            f"random: Var(Δ) = σ²_item/n + σ²_seed/S + σ²_res/(nS) from the ANOVA mean squares, t with "
            f"Satterthwaite's degrees of freedom; `toolcall/paired.py` crossed_difference), so it widens with "
            f"the seed-to-seed spread as well as with the items. p is that t-test's.")
        mde_text = "(t quantiles at the same degrees of freedom, times the standard error of Δ)"
    else:
        interval_text = (f"Paired comparisons on the same items, Δ = the second accuracy minus the first, with its "
                         f"{level} interval by Newcombe's hybrid score method for paired data (1998, method 10); "
                         f"p is the exact McNemar test.")
        mde_text = ("(Connor 1987: McNemar's test at the observed discordance rate, or at the rate the difference "
                    "itself needs where that is higher)")
    return (f"{interval_text} Verdict: **better** / **worse** when that interval excludes 0; else **equivalent** "
            f"when the {level_eq} interval lies within ±{margin:g} pts (TOST at α={cfg.alpha:g}: its p is below α "
            f"exactly then); else **inconclusive**. A difference that is also within the margin reads \"better, by "
            f"less than ±{margin:g} pts\". A claimed change is reproduced by its size, not its sign: a claim of "
            f"more than ±{margin:g} pts holds when our interval includes the claimed value, a smaller one (\"< 1 "
            f"point\") is a claim of no effect and holds when equivalence is shown. MDE: the smallest difference "
            f"the comparison could detect with {100 * cfg.power:g}% power at two-sided α={cfg.alpha:g} {mde_text}. "
            f"Multiplicity: this report makes {family} paired comparison{'s' if family != 1 else ''}, each with a "
            f"difference test and an equivalence test; Holm p adjusts each over all {2 * family} (Holm 1979), "
            f"and \"after Holm\" is the verdict those adjusted p-values support (family-wise α={cfg.alpha:g}).")


@dataclasses.dataclass(frozen=True)
class Claim:
    """A comparison to render once the whole report's family is known (for Holm)."""

    label: str
    comparison: Comparison
    claimed: Optional[float]  # the source's change in points; None: no number given
    source: str = "paper"


def holm_text(c, adjusted, cfg):
    """``Holm p=0.003, TOST Holm p=1.000; after Holm: better`` from ``(p, p_equivalence)`` adjusted."""
    word = adjusted_verdict(c, *adjusted, cfg.alpha)
    return f"Holm p={adjusted[0]:.3f}, TOST Holm p={adjusted[1]:.3f}; after Holm: {word}"


def claim_line(claim, adjusted, cfg):
    """``- label: **verdict**: ours Δ [CI] ...; paper ...: relation``; ``adjusted``: its Holm p-values."""
    c = claim.comparison
    return (f"- {claim.label}: **{verdict_text(c, cfg)}**: ours {points(c.delta)} pts {interval(c.ci)} on n={c.n} "
            f"paired items ({c.only_base} vs {c.only_other} discordant; exact McNemar p={c.p_value:.3f}, "
            f"TOST p={c.p_equivalence:.3f}; {holm_text(c, adjusted, cfg)}; MDE {detectable(c)}); "
            f"{claim_relation(c, claim.claimed, cfg, claim.source)}")


def render_claims(parts, cfg):
    """Markdown lines from sections' lines and ``Claim``s, Holm-adjusted over every claim's two tests."""
    adjusted = iter(family_holm([p.comparison for p in parts if isinstance(p, Claim)]))
    return [claim_line(p, next(adjusted), cfg) if isinstance(p, Claim) else p for p in parts]


# ---------------------------------------------------------------- the main study's runs

# Evaluated once, greedily, with no training: no seed (stage eval_base). Every other variant runs per seed.
SEEDLESS = ("base",)
GREEDY = "greedy"  # the run label of a seedless variant; a seed's run is "s<seed>"
FIELDS = ("id", "category", "valid", "error_type")


def run_label(seed):
    return GREEDY if seed is None else f"s{seed}"


def load_runs(predictions_dir, variants, seeds):
    """Every scored item of every run: a DataFrame with columns variant, run, id, category, valid, error_type.

    Base is read from ``<dir>/base.jsonl``, every other variant from
    ``<dir>/<variant>/s<seed>.jsonl`` for each of ``seeds`` (io.run_path):
    exactly the seeds asked for, so a file left by a seed since removed from
    ``study.seeds`` is not read.
    """
    parts = []
    for v in variants:
        for seed in [None] if v in SEEDLESS else seeds:
            path = run_path(predictions_dir, v, seed, ".jsonl")
            records = read_jsonl(path)
            if not records:
                raise DataError(f"{path}: no predictions; rerun its eval stage (dvc repro)")
            frame = pd.DataFrame.from_records(records, columns=list(FIELDS))
            parts.append(frame.assign(variant=v, run=run_label(seed)))
    return pd.concat(parts, ignore_index=True)


def run_accuracy(runs):
    """Accuracy of each run, overall and per category: index (variant, run), columns overall + categories."""
    keys = ["variant", "run"]
    overall = runs.groupby(keys, sort=False)["valid"].mean().rename("overall")
    by_category = runs.pivot_table(index=keys, columns="category", values="valid", aggfunc="mean")
    return pd.concat([overall, by_category[[c for c in CATEGORIES if c in by_category]]], axis=1)


def load_scores(metrics_dir, variants, seeds):
    """The eval metrics of every run (as ``load_runs``): one row per (variant, run, scope), scope "overall" or a
    category, with that block's keys (accuracy, n, correct, wrong_count, wrong_count_share, ...)."""
    rows = []
    for v in variants:
        for seed in [None] if v in SEEDLESS else seeds:
            m = read_json(run_path(metrics_dir, v, seed, ".json"))
            for scope, block in [("overall", m["overall"]), *m["by_category"].items()]:
                rows.append({"variant": v, "run": run_label(seed), "scope": scope, **block})
    return pd.DataFrame(rows)


def variants_in(runs):
    return [v for v in VARIANT_NAMES if v in set(runs["variant"])]


def spread_cell(values, sd=False):
    """``26.2% (25.5–27.0)`` over a variant's runs: mean and min–max (``sd``: ``sd 0.8;`` first); one run: ``25.5%``."""
    values = values.dropna()
    if values.empty:
        return "—"
    if len(values) == 1:
        return pct(values.iloc[0])
    sd_text = f"sd {100 * values.std(ddof=1):.1f}; " if sd else ""
    return f"{pct(values.mean())} ({sd_text}{100 * values.min():.1f}–{100 * values.max():.1f})"


def main_table(runs):
    """Table 1: each method's mean over its runs with the spread (sd; min–max), the paper beside, per category."""
    acc = run_accuracy(runs)
    cats = [c for c in CATEGORIES if c in acc]
    counts = runs.drop_duplicates("id")["category"].value_counts()
    n = counts.sum()
    lines = ["| Method | runs | Ours, overall (n=" + f"{n}): mean (sd; min–max) | Paper | "
             + " | ".join(f"{c} (n={counts[c]})" for c in cats) + " |",
             "|---" * (len(cats) + 4) + "|"]
    for v in variants_in(runs):
        a = acc.loc[v]
        which = "1 greedy" if v in SEEDLESS else f"{len(a)} seed{'s' * (len(a) > 1)}"
        paper = f"{PAPER_TABLE1[v]:.1f}%" if v in PAPER_TABLE1 else "—"
        lines.append(f"| {VARIANT_NAMES[v]} | {which} | {spread_cell(a['overall'], sd=True)} | {paper} | "
                     + " | ".join(spread_cell(a[c]) for c in cats) + " |")
    return "\n".join(lines)


def leaderboard_table(runs):
    """Our methods (mean over runs) beside BFCL's leaderboard anchors, per category and their unweighted mean."""
    acc = run_accuracy(runs).groupby(level=0).mean()
    lines = ["| Model | test items | " + " | ".join(CATEGORIES) + " | mean of the four |", "|---" * 7 + "|"]
    for v in variants_in(runs):
        cats = [100 * acc.loc[v, c] if c in acc else math.nan for c in CATEGORIES]
        lines.append(f"| SmolLM2-135M-Instruct, {VARIANT_NAMES[v]} (ours) | function-disjoint split | "
                     + " | ".join("—" if math.isnan(x) else f"{x:.1f}" for x in cats)
                     + (" | — |" if any(map(math.isnan, cats)) else f" | {sum(cats) / len(cats):.1f} |"))
    for name, cats in LEADERBOARD.items():
        mean = math.floor(10 * sum(cats) / len(cats) + 0.5) / 10  # half up, as the leaderboard rounds
        lines.append(f"| {name} | full BFCL sets | " + " | ".join(f"{x:g}" for x in cats) + f" | {mean:.1f} |")
    return "\n".join(lines)


def wrong_count_table(scores):
    """The dominant failure per method (eval metrics' wrong_count_share): of the wrong answers, the share with
    fewer or more calls than asked, overall and per category, mean over the runs (min–max)."""
    share = scores.pivot(index=["variant", "run"], columns="scope", values="wrong_count_share").astype(float)
    wrong = scores[scores["scope"] == "overall"].set_index(["variant", "run"])
    wrong = (wrong["n"] - wrong["correct"]).groupby(level=0).mean()
    cats = [c for c in CATEGORIES if c in share]
    lines = ["| Method | wrong answers (of n, mean per run) | wrong_count share, overall | " + " | ".join(cats) + " |",
             "|---" * (len(cats) + 3) + "|"]
    for v in [v for v in VARIANT_NAMES if v in wrong.index]:
        s = share.loc[v]
        lines.append(f"| {VARIANT_NAMES[v]} | {count(wrong[v])} | {spread_cell(s['overall'])} | "
                     + " | ".join(spread_cell(s[c]) for c in cats) + " |")
    return "\n".join(lines)


def correctness(runs, variant):
    """Items x runs booleans of one variant (one column for a seedless variant), rows sorted by id."""
    table = runs[runs["variant"] == variant].pivot(index="id", columns="run", values="valid").sort_index()
    missing = table.columns[table.isna().any()].tolist()
    if missing:  # a run scored other items than its siblings: not the same test split
        raise DataError(f"{variant}'s runs {missing} lack items the other runs scored "
                        f"({table.isna().sum().sum()} missing); rerun their eval stages on the same test split")
    return table.astype(bool)


def paired_runs(runs, before, after):
    """``(before, after)`` items x seeds matrices on the shared items, each seed's run against its own start.

    A seedless start (base) is the same run for every seed: its column repeats.
    """
    b, a = correctness(runs, before), correctness(runs, after)
    ids = b.index.intersection(a.index)
    if list(b.columns) == [GREEDY]:
        b = pd.concat([b[GREEDY]] * len(a.columns), axis=1, keys=a.columns)
    elif list(b.columns) != list(a.columns):
        raise DataError(f"{after}'s runs {list(a.columns)} do not match {before}'s {list(b.columns)}: each seed "
                        f"continues its own seed's {before}")
    return b.loc[ids, a.columns], a.loc[ids]


# Each post-training step against the model it starts from (DPO and RL continue SFT).
STEPS = (("base", "sft"), ("sft", "sft_dpo"), ("sft", "sft_rl"))


@dataclasses.dataclass(frozen=True)
class Step:
    """One step's comparison and the seed-to-seed spread of the model it starts from."""

    before: str
    after: str
    comparison: Comparison
    start_runs: tuple  # the start's overall accuracy per run


def step_comparisons(runs, cfg):
    """A ``Step`` for each step in STEPS with runs on both sides."""
    present = set(runs["variant"])
    acc = run_accuracy(runs)["overall"]
    return [Step(before, after, compare_seeds(*paired_runs(runs, before, after), cfg.equivalence_margin, cfg.alpha,
                                              cfg.power), tuple(acc.loc[before]))
            for before, after in STEPS if before in present and after in present]


def seed_spread_text(step):
    """The step's |Δ| against the seed-to-seed spread of its start's accuracy."""
    start, d = VARIANT_NAMES[step.before], abs(step.comparison.delta)
    if len(step.start_runs) < 2:
        return f"{start}: one run, no seed spread"
    s = pd.Series(step.start_runs)
    sd, lo, hi = s.std(ddof=1), s.min(), s.max()
    where = "inside" if d <= hi - lo else "beyond"
    ratio = f"{d / sd:.1f}× its sd" if sd > 0 else "its seeds agree exactly"
    return (f"|Δ| {100 * d:.1f} pts {where} {start}'s seed range ({100 * lo:.1f}–{100 * hi:.1f}%, sd "
            f"{100 * sd:.1f}); {ratio}")


def step_table(steps, cfg):
    """Each step: Δ and interval, per-seed Δ, p and TOST p with Holm, MDE, verdicts, the start's seed spread."""
    level = f"{100 * (1 - cfg.alpha):g}% CI"
    margin = f"±{100 * cfg.equivalence_margin:g} pts"
    lines = [f"| Step | items × seeds | Δ accuracy [{level}] | Δ per seed | p (Holm) | TOST p, {margin} (Holm) "
             f"| MDE ({100 * cfg.power:g}% power) | verdict | after Holm | against the start's seed spread |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for step, adjusted in zip(steps, family_holm([s.comparison for s in steps])):
        c = step.comparison
        per_seed = ", ".join(points((t[2] - t[1]) / sum(t)) for t in c.tables)
        lines.append(f"| {VARIANT_NAMES[step.after]} vs {VARIANT_NAMES[step.before]} | {c.n} × {c.seeds} | "
                     f"{points(c.delta)} pts {interval(c.ci)} | {per_seed} | {c.p_value:.3f} ({adjusted[0]:.3f}) | "
                     f"{c.p_equivalence:.3f} ({adjusted[1]:.3f}) | {detectable(c)} | {verdict_text(c, cfg)} | "
                     f"{adjusted_verdict(c, *adjusted, cfg.alpha)} | {seed_spread_text(step)} |")
    return "\n".join(lines)


def paper_claims(steps, cfg):
    """Each step against the paper's Table 1 change: its size, or equivalence for a "< 1 point" claim."""
    lines = []
    for step, adjusted in zip(steps, family_holm([s.comparison for s in steps])):
        claimed = PAPER_TABLE1[step.after] - PAPER_TABLE1[step.before]
        c = step.comparison
        lines.append(f"- {VARIANT_NAMES[step.after]} vs {VARIANT_NAMES[step.before]}: "
                     f"{claim_relation(c, claimed, cfg)}; after Holm: {adjusted_verdict(c, *adjusted, cfg.alpha)}")
    return "\n".join(lines)


def count(x):
    """A count that may be a mean over runs: ``59`` or ``59.3``."""
    return f"{x:.1f}".removesuffix(".0")


def error_table(runs, top=6):
    """Each method's most frequent errors, counted per run (mean over its runs)."""
    lines = ["| Method | most frequent errors (count per run) |", "|---|---|"]
    for v in variants_in(runs):
        rows = runs[(runs["variant"] == v) & ~runs["valid"].astype(bool)]
        n_runs = runs.loc[runs["variant"] == v, "run"].nunique()
        counts = rows["error_type"].value_counts().head(top) / n_runs
        lines.append(f"| {VARIANT_NAMES[v]} | " + ", ".join(f"`{e}` {count(n)}" for e, n in counts.items()) + " |")
    return "\n".join(lines)


def bar_chart(runs, path):
    """Grouped bars per category: the mean over each method's runs, the min–max over its seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = run_accuracy(runs)
    variants = variants_in(runs)
    groups = ["overall"] + [c for c in CATEGORIES if c in acc]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, v in enumerate(variants):
        a = acc.loc[v, groups]
        mean = a.mean()
        ax.bar([x + i * width for x in range(len(groups))], mean, width, yerr=[mean - a.min(), a.max() - mean],
               capsize=3, label=VARIANT_NAMES[v])
    ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(groups))], groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AST accuracy (mean; bars: min–max over seeds)")
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
    "extra_main": "The main SFT: the paper's rows + data.extra", "extra_with": "The paper's rows + ablations.extra.sources",
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
