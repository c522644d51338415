"""How a paired comparison reads in a report: table cells, verdict words, claims beside a paper's
numbers, and the method note that says what every verdict means."""

import dataclasses
import math
from typing import Optional

from toolcall.report.paired import Comparison, adjusted_verdict, family_holm

VARIANT_NAMES = {"base": "Base model", "sft": "SFT", "sft_dpo": "SFT + DPO", "sft_rl": "SFT + RL",
                 "sft_grpo": "SFT + GRPO"}


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
            f"Satterthwaite's degrees of freedom; `toolcall/report/crossed.py` crossed_difference), so it widens with "
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
