import pytest

from archer.rewards import ExactMatchReward, Reward


def test_exact_match_strips_by_default():
    reward = ExactMatchReward()
    assert isinstance(reward, Reward)
    assert reward("cba\n", {"answer": "cba"}) == 1.0
    assert reward("cb", {"answer": "cba"}) == 0.0
    assert ExactMatchReward(strip=False)("cba\n", {"answer": "cba"}) == 0.0


def test_exact_match_names_missing_answer():
    with pytest.raises(KeyError, match="answer"):
        ExactMatchReward()("x", {"prompt": "p"})
