from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import RunConfig
from pipeline.data.sources import load_source
from pipeline.stages.plan import make_plan
from pipeline.store import StageError


def _cfg(**plan: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "seed": 5,
            "data": {
                "source": "synthetic",
                "image_size": 16,
                "n_train": 400,
                "synthetic_per_class": 150,
                "synthetic_classes": 4,
            },
            "plan": {"n_member_users": 6, "n_nonmember_users": 30, "samples_per_user": 5, **plan},
        }
    )


@pytest.fixture(scope="module")
def data():
    return load_source(_cfg().data)


def test_users_are_disjoint_single_class_and_well_placed(data) -> None:
    body, train_ids = make_plan(_cfg(), data)
    users = body["users"]
    assert sum(u["role"] == "member" for u in users) == 6
    assert sum(u["role"] == "nonmember" for u in users) == 30
    all_ids = [i for u in users for i in u["sample_ids"]]
    assert len(all_ids) == len(set(all_ids)), "a sample is shared between users"
    train = set(train_ids.tolist())
    for u in users:
        assert len(u["sample_ids"]) == 5
        assert {int(data.train_labels[i]) for i in u["sample_ids"]} == {u["class"]}
        inside = [i in train for i in u["sample_ids"]]
        assert all(inside) if u["role"] == "member" else not any(inside)
    assert len({u["pattern_seed"] for u in users}) == len(users)
    assert len({u["user_id"] for u in users}) == len(users)


def test_plan_is_deterministic_for_a_seed(data) -> None:
    a, ta = make_plan(_cfg(), data)
    b, tb = make_plan(_cfg(), data)
    assert a == b and np.array_equal(ta, tb)
    other = RunConfig.model_validate({**_cfg().model_dump(), "seed": 6})
    c, _ = make_plan(other, data)
    assert c["users"] != a["users"]


def test_class_too_small_is_a_clear_error(data) -> None:
    with pytest.raises(StageError, match="samples_per_user"):
        make_plan(_cfg(n_nonmember_users=200, samples_per_user=60), data)


def test_member_classes_pin_members_to_target_classes(data) -> None:
    body, _ = make_plan(_cfg(n_member_users=1, member_classes=(3,)), data)
    members = [u for u in body["users"] if u["role"] == "member"]
    assert [u["class"] for u in members] == [3]
    nonmember_classes = {u["class"] for u in body["users"] if u["role"] == "nonmember"}
    assert nonmember_classes == {0, 1, 2, 3}, "non-members still come from every class"
    body, _ = make_plan(_cfg(n_member_users=4, member_classes=(1, 2)), data)
    assert [u["class"] for u in body["users"] if u["role"] == "member"] == [1, 2, 1, 2]
    with pytest.raises(StageError, match=r"plan.member_classes \[4\].*0..3"):
        make_plan(_cfg(member_classes=(4,)), data)
