"""Statistics an auditor can defend: exact rank p-values, Clopper–Pearson intervals, and
Benjamini–Hochberg decisions for many users at once.

Scores follow the convention "higher = more likely a member" (for the paper's score, the negated
mean loss). A user's p-value is their rank among M null scores, p = (1 + #{null >= score}) / (M + 1):
exact (valid at every level) whenever the user's score and the M null scores are exchangeable under
the null hypothesis "the model never trained on this user's images".
"""
from __future__ import annotations

import numpy as np
from scipy.stats import beta


def rank_p_values(scores: np.ndarray, null_scores: np.ndarray) -> np.ndarray:
    """p = (1 + #{null >= s}) / (M + 1) for each score s; ties count against the user."""
    null_sorted = np.sort(np.asarray(null_scores, dtype=np.float64))
    at_least = len(null_sorted) - np.searchsorted(null_sorted, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + at_least) / (len(null_sorted) + 1.0)


def leave_one_out_p_values(null_scores: np.ndarray) -> np.ndarray:
    """Each null score's p-value against the other M - 1: what a never-trained-on user would get.
    Under the null these are uniform on {1/M, ..., 1}, which the report shows as a check."""
    null = np.asarray(null_scores, dtype=np.float64)
    null_sorted = np.sort(null)
    at_least = len(null) - np.searchsorted(null_sorted, null, side="left") - 1  # minus itself
    return (1.0 + at_least) / len(null)


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
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
