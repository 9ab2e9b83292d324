"""Statistics an auditor can defend: exact rank p-values (against all non-member users, or only
those of the user's class), Clopper–Pearson intervals, Benjamini–Hochberg decisions for many users
at once, and the binomial limits a calibrated null must stay inside.

Scores follow the convention "higher = more likely a member" (for the paper's score, the negated
mean loss). A user's p-value is their rank among M null scores, p = (1 + #{null >= score}) / (M + 1):
exact (valid at every level) whenever the user's score and the M null scores are exchangeable under
the null hypothesis "the model never trained on this user's images".

Across repeated runs (seeds), a table row's spread is a Student-t interval of its mean, and its
effect against a baseline row the t-interval of the differences paired by seed (each seed gives
both rows the same plan where the rows do not change it).
"""

from __future__ import annotations

import math

import numpy as np


def rank_p_values(scores: np.ndarray, null_scores: np.ndarray) -> np.ndarray:
    """p = (1 + #{null >= s}) / (M + 1) for each score s; ties count against the user."""
    null_sorted = np.sort(np.asarray(null_scores, dtype=np.float64))
    at_least = len(null_sorted) - np.searchsorted(null_sorted, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + at_least) / (len(null_sorted) + 1.0)


EARLY_SPEND = 0.1  # the share of the level an early look spends (it raises every other p-value by that much)


def sequential_stop(level: float, draws: int) -> int:
    """How many null draws at least as extreme as the observed score stop a sequential test of
    `draws` draws at `level` (`sequential_p_value`): the smallest h with h / draws > level, so a test
    that stops reports p > level, and one that does not has seen every draw. Its verdict at `level`
    is then always that of the full test on the same draws."""
    h = max(1, math.floor(level * draws))
    while h / draws <= level:
        h += 1
    return h


def sequential_design(level: float, draws: int) -> tuple[int, int | None]:
    """(stop, early) for a sequential test of `draws` draws at `level`, which ends as soon as its verdict
    is clear either way. `early` is the n with 1 / (n + 1) <= level / 10: if none of the first n draws
    is at least as extreme as the observed score, the test ends there with p = 1 / (n + 1), which a
    model that memorised the owner's images reaches after a fifth of 999 draws at level 0.05 instead of
    all of them. That look raises every other p-value by 1 / (n + 1), so `stop` is Besag and Clifford's
    at the level less it. No early look (None) where n would not come before the last draw."""
    early = math.ceil(1 / (EARLY_SPEND * level) - 1e-9) - 1
    if early >= draws:
        return sequential_stop(level, draws), None
    return sequential_stop(level - 1 / (early + 1), draws), early


def sequential_p_value(
    as_extreme: np.ndarray, draws: int, stop: int | None, early: int | None = None
) -> tuple[float, int] | None:
    """Besag & Clifford's (1991) sequential Monte-Carlo p-value, from the draws scored so far (in
    draw order; True where a draw is at least as extreme as the observed score): once `stop` of them
    are, p = stop / (draws used) and no more are needed; otherwise, after all `draws`, the usual
    p = (1 + count) / (draws + 1). With an `early` look (`sequential_design`), a score that none of the
    first `early` draws reached ends the test at p = 1 / (early + 1), and every other p is raised by
    that much. Valid at every level either way (P(p <= u) <= u under exchangeability: the early look
    has probability at most 1 / (early + 1), so raising the rest by it is a union bound), and a
    never-trained-on owner stops after about stop * (1 + ln(draws / stop)) draws instead of all.
    Returns (p, draws used), or None while no rule has decided (score more draws)."""
    hits = np.cumsum(np.asarray(as_extreme, dtype=bool))
    raised = 0.0
    if early is not None:
        if hits.size >= early and hits[early - 1] == 0:
            return 1.0 / (early + 1), early
        raised = 1.0 / (early + 1)
    if stop is not None and hits.size and hits[-1] >= stop:
        used = int(np.argmax(hits >= stop)) + 1
        return min(1.0, raised + stop / used), used
    if hits.size < draws:
        return None
    return min(1.0, raised + (1.0 + float(hits[draws - 1])) / (draws + 1)), draws


def leave_one_out_p_values(null_scores: np.ndarray) -> np.ndarray:
    """Each null score's p-value against the other M - 1: what a never-trained-on user would get.
    Under the null these are uniform on {1/M, ..., 1}, which the report shows as a check."""
    null = np.asarray(null_scores, dtype=np.float64)
    null_sorted = np.sort(null)
    at_least = len(null) - np.searchsorted(null_sorted, null, side="left") - 1  # minus itself
    return (1.0 + at_least) / len(null)


def class_rank_p_values(
    scores: np.ndarray, classes: np.ndarray, null_scores: np.ndarray, null_classes: np.ndarray
) -> np.ndarray:
    """Each score's rank p-value among the null scores of its own class only (1 when the class has
    none): exact when a user is exchangeable with the non-member users of its class, which removes
    the confound of classes that are easy whether trained on or not."""
    scores, classes, null_classes = np.asarray(scores, np.float64), np.asarray(classes), np.asarray(null_classes)
    out = np.empty(len(scores))
    for c in np.unique(classes):
        mine = classes == c
        out[mine] = rank_p_values(scores[mine], np.asarray(null_scores)[null_classes == c])
    return out


def class_leave_one_out_p_values(null_scores: np.ndarray, null_classes: np.ndarray) -> np.ndarray:
    """Leave-one-out p-values of the null users, each against the others of its class."""
    null, null_classes = np.asarray(null_scores, np.float64), np.asarray(null_classes)
    out = np.empty(len(null))
    for c in np.unique(null_classes):
        mine = null_classes == c
        out[mine] = leave_one_out_p_values(null[mine])
    return out


def bh_smallest_null_size(n_members: int, n_hypotheses: int, fdr: float) -> int:
    """The fewest null users M for which Benjamini–Hochberg at `fdr` over `n_hypotheses` p-values
    could flag all `n_members` members: even perfectly separated, a rank p-value is at least
    1/(M+1), and BH needs the n-th smallest p-value at most fdr * n / n_hypotheses."""
    return max(math.ceil(n_hypotheses / (fdr * n_members) - 1e-9) - 1, 1)


def binomial_limits(n: int, rate: float, confidence: float = 0.95) -> tuple[float, float]:
    """Central `confidence` range of the observed rate k/n when k ~ Binomial(n, rate): where the
    share of null users with p <= rate should fall if their p-values are calibrated."""
    from scipy.stats import binom  # scipy.stats takes half a second to import: only where it is used

    tail = (1 - confidence) / 2
    return float(binom.ppf(tail, n, rate)) / n, float(binom.ppf(1 - tail, n, rate)) / n


def null_calibration(p_null: np.ndarray, classes: np.ndarray, level: float = 0.05) -> dict[str, dict[str, object]]:
    """Per class, the share of null users with p <= level and its binomial limits if calibrated."""
    p_null, classes = np.asarray(p_null), np.asarray(classes)
    return {
        str(c): {
            "n": int((classes == c).sum()),
            "rate": float((p_null[classes == c] <= level).mean()),
            "limits": binomial_limits(int((classes == c).sum()), level),
        }
        for c in np.unique(classes)
    }


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    from scipy.stats import beta

    tail = (1.0 - confidence) / 2
    lo = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return lo, hi


def benjamini_hochberg(p_values: np.ndarray, fdr: float) -> np.ndarray:
    """Reject (flag as member) the hypotheses BH selects at false-discovery rate `fdr`."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    passed = p[order] <= fdr * np.arange(1, m + 1) / m
    reject = np.zeros(m, dtype=bool)
    if passed.any():
        reject[order[: np.flatnonzero(passed).max() + 1]] = True
    return reject


def t_interval(
    values: list[float] | np.ndarray, confidence: float = 0.95, within: tuple[float, float] | None = None
) -> tuple[float, float] | None:
    """Student-t interval for the mean of `values` (seeds as independent repetitions); None with
    fewer than two values. Equal values give the point itself: no spread was observed. `within`:
    the range the mean cannot leave (e.g. 0 to 1 for a rate); the interval is cut to it, which keeps
    its coverage (the true mean lies inside the range) and spares a reader a TPR interval up to 1.4."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return None
    mean, half = float(x.mean()), 0.0
    if np.ptp(x) > 0:
        from scipy.stats import t

        half = float(t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    low, high = within if within is not None else (-math.inf, math.inf)
    return max(mean - half, low), min(mean + half, high)


def paired_difference(
    row: dict[int, float], baseline: dict[int, float], confidence: float = 0.95, span: float = math.inf
) -> dict[str, object] | None:
    """A row's difference from the baseline over the seeds both ran ({seed: value} each): the mean
    difference, its t-interval (cut to ±`span`, the width of the numbers' range), and whether that
    interval excludes 0 (an effect beyond seed noise; cutting never changes it). None with fewer
    than two common seeds."""
    common = sorted(set(row) & set(baseline))
    if len(common) < 2:
        return None
    differences = [row[s] - baseline[s] for s in common]
    lo, hi = t_interval(differences, confidence, within=(-span, span))  # type: ignore[misc]
    return {
        "difference": float(np.mean(differences)),
        "interval": [lo, hi],
        "seeds_paired": len(common),
        "beyond_noise": bool(lo > 0 or hi < 0),
    }
