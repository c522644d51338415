"""Confidence intervals and paired tests for accuracies on a few hundred items."""

import math


def wilson(k, n, z=1.959964):
    """Wilson score 95% interval for k successes out of n (well-behaved near 0 and 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value from the discordant counts.

    ``b``: items right under A and wrong under B; ``c``: the reverse. Under the
    null each discordant item is a fair coin, so p = P(Binomial(b+c, 1/2) as
    extreme as observed), doubled and capped at 1.
    """
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(base, other):
    """Compare two ``{id: correct}`` maps on their shared ids."""
    ids = sorted(set(base) & set(other))
    b = sum(1 for i in ids if base[i] and not other[i])
    c = sum(1 for i in ids if other[i] and not base[i])
    n = len(ids)
    delta = (sum(other[i] for i in ids) - sum(base[i] for i in ids)) / n if n else 0.0
    return {"n": n, "delta": round(delta, 4), "only_base": b, "only_other": c,
            "p_value": round(mcnemar_exact(b, c), 4)}
