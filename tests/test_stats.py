"""Statistics: exact p-values, intervals and FDR control, checked by simulation under the null."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.core.stats import benjamini_hochberg, clopper_pearson, leave_one_out_p_values, rank_p_values


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
