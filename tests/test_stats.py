"""Statistics: exact p-values, intervals and FDR control, checked by simulation under the null."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.core.stats import (
    benjamini_hochberg,
    bh_smallest_null_size,
    binomial_limits,
    class_leave_one_out_p_values,
    class_rank_p_values,
    clopper_pearson,
    leave_one_out_p_values,
    null_calibration,
    rank_p_values,
    sequential_design,
    sequential_p_value,
    sequential_stop,
)


def test_rank_p_value_by_hand() -> None:
    null = np.array([0.1, 0.5, 0.5, 0.9])
    # score 1.0 beats all: (1 + 0) / 5; score 0.5 ties two and is below one: (1 + 3) / 5
    assert rank_p_values(np.array([1.0, 0.5, 0.0]), null).tolist() == pytest.approx([0.2, 0.8, 1.0])
    assert leave_one_out_p_values(np.array([3.0, 1.0, 2.0])).tolist() == pytest.approx([1 / 3, 1.0, 2 / 3])


def test_p_values_are_valid_under_the_null() -> None:
    """A user exchangeable with the M null users gets P(p <= a) <= a at every level."""
    rng = np.random.default_rng(0)
    m, trials = 99, 4000
    p = np.array([rank_p_values(rng.normal(size=1), rng.normal(size=m))[0] for _ in range(trials)])
    for level in (0.01, 0.05, 0.1, 0.5):
        # p is uniform on {1/100, ..., 1}: P(p <= level) = level exactly at these levels
        assert binomtest(int((p <= level).sum()), trials, level).pvalue > 0.001
    loo = leave_one_out_p_values(rng.normal(size=500))
    assert np.allclose(np.sort(loo), np.arange(1, 501) / 500)


def test_sequential_p_value_by_hand() -> None:
    hits = np.array([False, True, False, True, True])
    assert sequential_p_value(hits, 10, 2) == (2 / 4, 4)  # stops at the second hit: p = h / draws used
    assert sequential_p_value(hits[:3], 10, 2) is None  # undecided: score more
    assert sequential_p_value(np.r_[hits, [False] * 5], 10, None) == ((1 + 3) / 11, 10)  # the full test
    assert sequential_p_value(np.zeros(10, bool), 10, 2) == (1 / 11, 10)  # never stopped: every draw scored
    assert [sequential_stop(a, b) for a, b in ((0.01, 999), (0.05, 999), (0.05, 19), (0.001, 999), (1.0, 9))] == [
        10,
        50,
        1,
        1,
        10,
    ]


def test_sequential_p_values_are_valid_and_decide_as_the_full_test() -> None:
    """Besag-Clifford p-values under the null: P(p <= u) = u at its attainable levels, at every level,
    not only the one that set the stop; members and non-members alike get the full test's verdict
    at that level, and its p-value wherever p <= level, after far fewer draws for non-members."""
    rng = np.random.default_rng(1)
    draws, level, trials = 99, 0.05, 4000
    stop = sequential_stop(level, draws)
    used, p = [], []
    for shift in (0.0, 3.0):  # never trained on, then trained on (the observed score stands out)
        for _ in range(trials if shift == 0 else 300):
            observed, null = rng.normal() - shift, rng.normal(size=draws)  # loss-like: lower = member-like
            sequential, n = sequential_p_value(null <= observed, draws, stop)
            full, _ = sequential_p_value(null <= observed, draws, None)
            assert (sequential <= level) == (full <= level) and (sequential == full or sequential > level)
            if shift == 0:
                used.append(n)
                p.append(sequential)
    p = np.array(p)
    for u in (1 / 100, 5 / 100, stop / 20, stop / 10, stop / 5):  # values the sequential p-value takes
        assert binomtest(int((p <= u + 1e-12).sum()), trials, u).pvalue > 0.001, u
    assert np.mean(used) < draws / 3


def test_sequential_design_by_hand() -> None:
    """The early look comes after n draws with 1 / (n + 1) <= level / 10, where it saves draws."""
    assert sequential_design(0.05, 999) == (45, 199)  # the stop at level 0.05 - 1/200
    assert sequential_design(0.05, 199) == (sequential_stop(0.05, 199), None)  # it would be the last draw
    assert sequential_design(0.01, 999) == (10, None)
    assert sequential_design(0.1, 999) == (sequential_stop(0.09, 999), 99)
    unbeaten = np.zeros(199, bool)
    assert sequential_p_value(unbeaten, 999, 45, 199) == (1 / 200, 199)  # the early look: p = 1 / (n + 1)
    assert sequential_p_value(unbeaten[:198], 999, 45, 199) is None  # not there yet
    once = np.r_[True, np.zeros(998, bool)]
    assert sequential_p_value(once[:199], 999, 45, 199) is None  # beaten once: score on
    assert sequential_p_value(once, 999, 45, 199) == (1 / 200 + 2 / 1000, 999)  # every other p raised by 1/200
    assert sequential_p_value(np.ones(60, bool), 999, 45, 199) == (1.0, 45)  # raised, capped at 1
    hits = np.r_[np.ones(44, bool), np.zeros(45, bool), True]
    assert sequential_p_value(hits, 999, 45, 199) == (1 / 200 + 45 / 90, 90)


@pytest.mark.parametrize(("level", "draws"), [(0.1, 199), (0.05, 999), (0.2, 60)])
def test_sequential_p_values_are_exact_at_every_level(level: float, draws: int) -> None:
    """The sequential p-value's exact distribution under the null, over every path of draws: given
    the observed score's quantile q ~ U(0, 1), draws are at least as extreme independently with
    probability q, so one path with s such draws among n has probability 1 / ((n + 1) C(n, s)).
    P(p <= u) <= u at every value p takes (the early look and the Besag-Clifford stops included)."""
    stop, early = sequential_design(level, draws)
    paths = {0: 1}  # s -> paths still scoring after n draws
    mass: dict[float, float] = {}
    for n in range(1, draws + 1):
        grown: dict[int, int] = {}
        for s, count in paths.items():
            grown[s] = grown.get(s, 0) + count
            grown[s + 1] = grown.get(s + 1, 0) + count
        paths = {}
        for s, count in grown.items():
            # one path standing for all that are here: its verdict depends only on n and s (a path with
            # s = stop got its stop-th hit at this draw; one with s = 0 past the early look has ended)
            last = int(s == stop)
            history = np.r_[np.ones(s - last, bool), np.zeros(n - s, bool), np.ones(last, bool)]
            decided = sequential_p_value(history, draws, stop, early)
            if decided is None:
                paths[s] = count
            else:
                assert decided[1] == n
                mass[decided[0]] = mass.get(decided[0], 0.0) + count / ((n + 1) * math.comb(n, s))
    assert not paths and sum(mass.values()) == pytest.approx(1.0)
    below = 0.0
    for u in sorted(mass):
        below += mass[u]
        assert below <= u + 1e-12, (u, below)
    if early is not None:
        assert mass[1 / (early + 1)] == pytest.approx(1 / (early + 1))


def test_sequential_p_values_with_an_early_look_are_valid_with_ties() -> None:
    """With ties (which count against the owner: label-only scores take few values) the p-value stays
    valid under the null, P(p <= u) <= u; a clearly memorised owner ends at the early look, and
    wherever the full test's p <= level - 1 / (n + 1) the sequential one is at most the level."""
    rng = np.random.default_rng(2)
    draws, level, trials = 199, 0.1, 6000
    stop, early = sequential_design(level, draws)
    assert early == 99

    def scores(size: Any) -> np.ndarray:
        return rng.integers(0, 40, size).astype(float)  # each value about 5 times among the draws

    p, used = [], []
    for _ in range(trials):
        observed, null = scores(None), scores(draws)
        sequential, n = sequential_p_value(null <= observed, draws, stop, early)
        full, _ = sequential_p_value(null <= observed, draws, None)
        assert full > level - 1 / (early + 1) or sequential <= level
        p.append(sequential)
        used.append(n)
    p = np.array(p)
    for u in (1 / 100, 0.02, 0.05, level, 0.2, 0.5):
        count = int((p <= u + 1e-12).sum())
        assert count <= trials * u or binomtest(count, trials, u).pvalue > 0.001, (u, count / trials)
    assert np.mean(used) < draws / 2
    memorised = [sequential_p_value(rng.normal(size=draws) <= -4.0, draws, stop, early) for _ in range(50)]
    assert all(m == (1 / 100, 99) for m in memorised)


def test_benjamini_hochberg_controls_fdr() -> None:
    rng = np.random.default_rng(1)
    fdp = []
    for _ in range(300):
        m_null, m_alt, null_size = 40, 10, 199
        null = rng.normal(size=null_size)
        scores = np.concatenate([rng.normal(size=m_null), rng.normal(3.0, 1.0, size=m_alt)])
        reject = benjamini_hochberg(rank_p_values(scores, null), fdr=0.1)
        fdp.append(reject[:m_null].sum() / max(reject.sum(), 1))
    assert np.mean(fdp) <= 0.1 + 0.03  # FDR = E[FDP] <= q (Monte Carlo slack)
    assert benjamini_hochberg(np.array([0.001, 0.2, 0.03, 0.04]), 0.05).tolist() == [True, False, False, False]
    assert benjamini_hochberg(np.array([0.01, 0.02, 0.03, 0.04]), 0.05).tolist() == [True] * 4


def test_clopper_pearson() -> None:
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    lo, hi = clopper_pearson(30, 100)
    assert lo < 0.3 < hi and hi - lo < 0.2


def test_class_conditional_p_values_by_hand() -> None:
    null, null_classes = np.array([5.0, 1.0, 2.0, 3.0, 9.0]), np.array([0, 0, 1, 1, 1])
    # class 0 null {5, 1}: 4.0 is beaten by one -> 2/3; class 1 null {2, 3, 9}: 4.0 is beaten by one -> 2/4
    p = class_rank_p_values(np.array([4.0, 4.0, 0.0]), np.array([0, 1, 2]), null, null_classes)
    assert p.tolist() == pytest.approx([2 / 3, 2 / 4, 1.0])  # class 2 has no null users: no evidence
    assert class_leave_one_out_p_values(null, null_classes).tolist() == pytest.approx([0.5, 1.0, 1.0, 2 / 3, 1 / 3])


def test_class_conditional_null_is_calibrated_where_the_pooled_one_is_not() -> None:
    """Null users of an easy class score high whether trained on or not: against the pooled null
    far more than 5% of them get p <= 0.05, against their own class 5% (inside binomial limits)."""
    rng = np.random.default_rng(3)
    classes = np.repeat(np.arange(4), 250)
    scores = rng.normal(size=len(classes)) + np.array([0.0, 0.0, 0.0, 3.0])[classes]  # class 3 is easy
    pooled = null_calibration(leave_one_out_p_values(scores), classes)
    within = null_calibration(class_leave_one_out_p_values(scores, classes), classes)
    lo, hi = within["3"]["limits"]
    assert pooled["3"]["rate"] > 2 * hi and pooled["0"]["rate"] < lo  # the easy class takes the pooled 5%
    for c in "0123":
        assert within[c]["limits"][0] <= within[c]["rate"] <= within[c]["limits"][1], c
        assert within[c]["n"] == 250


@pytest.mark.parametrize("n_members,n_audited,fdr", [(10, 100, 0.05), (10, 0, 0.05), (3, 40, 0.1)])
def test_bh_smallest_null_size_is_tight(n_members: int, n_audited: int, fdr: float) -> None:
    """With members perfectly separated, BH flags all of them at the smallest null size, not below it."""
    m = bh_smallest_null_size(n_members, n_members + n_audited, fdr)
    for size, flags_all in ((m, True), (m - 1, False)):
        null = np.linspace(0, 1, size)
        p = np.concatenate([rank_p_values(np.full(n_members, 2.0), null), leave_one_out_p_values(null)[:n_audited]])
        assert benjamini_hochberg(p, fdr)[:n_members].all() == flags_all, size


def test_binomial_limits_cover_the_null_rate() -> None:
    from scipy.stats import binom

    for n in (20, 100, 250):
        lo, hi = binomial_limits(n, 0.05)
        k = np.arange(n + 1)
        inside = (k / n >= lo) & (k / n <= hi)
        assert binom.pmf(k[inside], n, 0.05).sum() >= 0.95
        assert lo <= 0.05 <= hi < 0.05 + 3.5 * np.sqrt(0.05 * 0.95 / n)


def test_audit_bh_tests_members_and_a_hundred_never_trained_on_users() -> None:
    """Perfectly separated members are all flagged once M reaches the smallest null size, by both
    nulls when every class has that many; with every non-member user among the hypotheses (as
    before) none could be."""
    from pipeline.stages.audit import user_p_values, user_statistics

    for m, flagged in ((219, 10), (218, 0)):
        score = np.concatenate([np.full(10, 5.0), np.linspace(0, 1, m)])
        is_member = np.arange(10 + m) < 10
        classes = np.zeros(10 + m, np.int64)  # one class: both nulls alike
        pooled, by_class = user_p_values(is_member, score, classes)
        table = {
            "is_member": is_member,
            "mean_loss": -score,
            "class": classes,
            "p_value": pooled,
            "class_p_value": by_class,
        }
        stats = user_statistics(table, fdr_nonmembers=100)
        assert stats["fdr_hypotheses"] == {"members": 10, "nonmembers": 100}
        for null in (stats, stats["class_conditional"]):
            assert null["benjamini_hochberg"]["0.05"]["members_flagged"] == flagged
            assert null["benjamini_hochberg"]["0.05"]["smallest_null_size"] == 219
    every_user = benjamini_hochberg(
        np.concatenate([rank_p_values(score[:10], score[10:]), leave_one_out_p_values(score[10:])]), 0.05
    )
    assert not every_user.any()
