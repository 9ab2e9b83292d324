from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from pipeline.core.metrics import per_user_mean, roc_metrics


def test_perfect_separation() -> None:
    m = roc_metrics(np.array([1, 1, 0, 0, 0]), np.array([5.0, 4.0, 3.0, 2.0, 1.0]))
    assert m["auc"] == 1.0
    assert m["fpr_at_tpr_1"] == 0.0
    assert all(v == 1.0 for v in m["tpr_at_fpr"].values())


def test_hand_made_case() -> None:
    # scores: members 0.9, 0.6, 0.3; non-members 0.8, 0.5, 0.2, 0.1
    is_member = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.6, 0.3, 0.8, 0.5, 0.2, 0.1])
    m = roc_metrics(is_member, scores)
    # ranking: 0.9(m) 0.8(n) 0.6(m) 0.5(n) 0.3(m) -> TPR 1 reached after 2 of 4 negatives
    assert m["fpr_at_tpr_1"] == pytest.approx(0.5)
    assert m["tpr_at_fpr"]["0"] == pytest.approx(1 / 3)
    assert m["tpr_at_fpr"]["0.01"] == pytest.approx(1 / 3)
    # AUC: pairs (m > n): 0.9 beats 4, 0.6 beats 3, 0.3 beats 2 -> 9 / 12
    assert m["auc"] == pytest.approx(9 / 12)
    assert m["auc"] == pytest.approx(roc_auc_score(is_member, scores))


def test_ties_do_not_count_as_detections() -> None:
    # a member tied with a non-member cannot be detected at FPR 0
    m = roc_metrics(np.array([1, 0, 0]), np.array([1.0, 1.0, 0.0]))
    assert m["tpr_at_fpr"]["0"] == 0.0
    assert m["fpr_at_tpr_1"] == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_on_random_cases(seed: int) -> None:
    rng = np.random.default_rng(seed)
    is_member = rng.random(300) < 0.2
    scores = rng.normal(size=300) + is_member
    m = roc_metrics(is_member, scores)
    fpr, tpr, _ = roc_curve(is_member, scores)
    assert m["auc"] == pytest.approx(roc_auc_score(is_member, scores))
    assert m["fpr_at_tpr_1"] == pytest.approx(fpr[np.argmax(tpr >= 1)])
    for t in ("0", "0.01"):
        assert m["tpr_at_fpr"][t] == pytest.approx(tpr[fpr <= float(t)].max())


def test_rejects_one_class_and_nan() -> None:
    with pytest.raises(ValueError):
        roc_metrics(np.array([1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        roc_metrics(np.array([1, 0]), np.array([np.nan, 0.2]))


def test_per_user_mean() -> None:
    values = np.array([1.0, 3.0, 10.0, 20.0, 5.0])
    users = np.array([7, 7, 3, 3, 9])
    assert per_user_mean(values, users, np.array([3, 7, 9])).tolist() == [15.0, 2.0, 5.0]
    with pytest.raises(ValueError, match="no audit samples"):
        per_user_mean(values, users, np.array([3, 7, 9, 11]))


def test_strict_and_inclusive_fpr_conventions_differ_at_one_false_positive() -> None:
    """With M = 100 negatives and one of them above a member, FPR = 0.01 exactly: the official code's
    strict convention (FPR < 0.01) does not count that member, FPR <= 0.01 does."""
    is_member = np.array([1, 1] + [0] * 100)
    scores = np.concatenate([[10.0, 5.0], [6.0], np.linspace(0, 1, 99)])
    m = roc_metrics(is_member, scores)
    assert m["tpr_at_fpr_below"]["0.01"] == pytest.approx(0.5)
    assert m["tpr_at_fpr"]["0.01"] == pytest.approx(1.0)
    assert m["tpr_at_fpr_below"]["0.001"] == m["tpr_at_fpr"]["0"] == pytest.approx(0.5)


def test_class_breakdown_counts_non_members_below_the_members_by_class() -> None:
    from pipeline.core.metrics import class_breakdown

    # members (classes 0, 1) have mean loss 0.1 and 0.3; non-members: class 1 at 0.05 and 0.2, class 0 at 0.5
    per_user = {
        "user_id": np.arange(5),
        "is_member": np.array([1, 1, 0, 0, 0], bool),
        "mean_loss": np.array([0.1, 0.3, 0.05, 0.2, 0.5]),
    }
    stats = {"member_p_values": [0.5, 0.75], "class_conditional": {"member_p_values": [0.5, 1.0]}}
    out = class_breakdown(per_user, np.array([0, 1, 1, 1, 0]), stats)
    assert out["per_class"]["1"]["nonmembers_below_worst_member"] == 2  # both below 0.3
    assert out["per_class"]["0"]["nonmembers_below_worst_member"] == 0
    assert out["per_class"]["1"]["nonmember_mean_loss"] == pytest.approx(0.125)
    assert [m["nonmembers_below"] for m in out["per_member"]] == [{"0": 0, "1": 1}, {"0": 0, "1": 2}]
