"""The statistics of the parity bench, without scipy: a Welch confidence interval for a
difference of means, and the Mann-Whitney rank test (exact for small samples, ties handled by
enumerating every split of the pooled ranks). Checked by `python3 tests/twin/stats.py`, which
compares them with values from published tables."""

import itertools
import math
import statistics


def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a, b, x):
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """Student's t distribution function."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p, df):
    """The p-quantile of Student's t (bisection on the distribution function)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def welch(a, b, level=0.95):
    """Difference of means a - b with its confidence interval (Welch: unequal variances).
    Returns (difference, low, high, degrees of freedom)."""
    na, nb = len(a), len(b)
    va, vb = statistics.variance(a), statistics.variance(b)
    se2 = va / na + vb / nb
    diff = statistics.mean(a) - statistics.mean(b)
    if se2 == 0:
        return diff, diff, diff, math.inf
    df = se2 * se2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(se2)
    return diff, diff - half, diff + half, df


def _ranks(values):
    """Ranks 1..n, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mann_whitney(a, b, exact_limit=200_000):
    """Mann-Whitney U of sample a against b and its two-sided p-value: exact (every split of
    the pooled ranks, ties included) when there are at most `exact_limit` splits, else the
    normal approximation with the tie correction. Returns (U, p, 'exact' or 'normal')."""
    na, nb = len(a), len(b)
    ranks = _ranks(list(a) + list(b))
    u = sum(ranks[:na]) - na * (na + 1) / 2
    mean = na * nb / 2
    n = na + nb
    if math.comb(n, na) <= exact_limit:
        observed = abs(u - mean) - 1e-9
        extreme = total = 0
        for pick in itertools.combinations(range(n), na):
            total += 1
            ui = sum(ranks[i] for i in pick) - na * (na + 1) / 2
            extreme += abs(ui - mean) >= observed
        return u, extreme / total, "exact"
    counts = {}
    for r in ranks:
        counts[r] = counts.get(r, 0) + 1
    ties = sum(c ** 3 - c for c in counts.values())
    var = na * nb / 12 * ((n + 1) - ties / (n * (n - 1)))
    z = (abs(u - mean) - 0.5) / math.sqrt(var) if var > 0 else 0.0
    return u, math.erfc(z / math.sqrt(2)), "normal"


if __name__ == "__main__":
    # Student's t quantiles (any table): t(0.975, 10) = 2.228, t(0.975, 3) = 3.182.
    assert abs(t_quantile(0.975, 10) - 2.2281) < 1e-3, t_quantile(0.975, 10)
    assert abs(t_quantile(0.975, 3) - 3.1824) < 1e-3, t_quantile(0.975, 3)
    # Mann-Whitney, no overlap at 4 vs 4: the exact two-sided p is 2 / C(8, 4) = 0.0286.
    u, p, how = mann_whitney([1, 2, 3, 4], [5, 6, 7, 8])
    assert (u, how) == (0.0, "exact") and abs(p - 2 / 70) < 1e-12, (u, p)
    # Identical samples: U at its mean, p = 1.
    assert mann_whitney([1, 2, 3], [1, 2, 3])[1] == 1.0
    # Welch on two samples with equal variances and n: df = 2n - 2.
    d, lo, hi, df = welch([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert d == -1.0 and abs(df - 4) < 1e-12 and abs(hi - lo - 2 * 2.7764 * math.sqrt(2 / 3)) < 1e-3
    print("stats: ok")
