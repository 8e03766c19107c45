"""Per-response entropy-quantile token typing: hand-computed thresholds and every degenerate case."""

import pytest
import torch

from archer.algorithms import classify_tokens, entropy_threshold


def _typing(entropy, mask, rho):
    return classify_tokens(torch.tensor(entropy), torch.tensor(mask, dtype=torch.bool), rho).tolist()


def test_quantile_is_linear_interpolation_per_response():
    # Row 0: sorted [1,2,3,4,5], position 0.8·(5−1) = 3.2 → q = 4 + 0.2·(5−4) = 4.2 → only 5 is above.
    # Row 1: [10..50] → q = 42 → only 50. A batch-level threshold would type all of row 1 and none of row 0.
    entropy = [[1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0]]
    assert _typing(entropy, [[1] * 5, [1] * 5], 0.8) == [[False, False, False, False, True], [False, False, False, False, True]]
    threshold = entropy_threshold(torch.tensor(entropy), torch.ones(2, 5), 0.8)
    torch.testing.assert_close(threshold, torch.tensor([[4.2], [42.0]], dtype=torch.float64))


def test_padding_is_excluded_before_the_quantile_and_never_typed():
    # Valid [0.1, 0.9, 0.5] → sorted [0.1, 0.5, 0.9], position 0.8·2 = 1.6 → q = 0.5 + 0.6·0.4 = 0.74 → {0.9}.
    # Had the padded 100 been included: position 0.8·3 = 2.4 → q = 0.9 + 0.4·99.1 = 40.54 → nothing typed.
    assert _typing([[0.1, 0.9, 0.5, 100.0]], [[1, 1, 1, 0]], 0.8) == [[False, True, False, False]]


def test_threshold_comparison_is_strict():
    # [1, 2, 2, 2], ρ = 0.5: position 1.5 → q = 2 + 0.5·0 = 2; no token is > 2 (">=" would type three).
    assert _typing([[1.0, 2.0, 2.0, 2.0]], [[1] * 4], 0.5) == [[False] * 4]
    # [1, 1, 2, 2], ρ = 0.5: q = 1 + 0.5·1 = 1.5 → the two 2s.
    assert _typing([[1.0, 1.0, 2.0, 2.0]], [[1] * 4], 0.5) == [[False, False, True, True]]


def test_degenerate_responses():
    assert _typing([[0.7]], [[1]], 0.8) == [[False]]  # 1 token: q = its entropy → knowledge
    assert _typing([[0.3, 0.3, 0.3]], [[1, 1, 1]], 0.8) == [[False] * 3]  # all equal → all knowledge
    assert _typing([[0.3, 5.0, 1.0]], [[0, 0, 0]], 0.8) == [[False] * 3]  # empty → nothing typed, no NaN error
    # ρ = 0: q = min = 1 → every token above the minimum; ρ = 1: q = max → none.
    assert _typing([[3.0, 1.0, 2.0, 1.0]], [[1] * 4], 0.0) == [[True, False, True, False]]
    assert _typing([[3.0, 1.0, 2.0, 1.0]], [[1] * 4], 1.0) == [[False] * 4]


def test_batch_level_threshold_pools_valid_tokens():
    # Valid tokens [1,2,3,4] ∪ [10] (padding 99 excluded) → sorted [1,2,3,4,10], position 3.2 → q = 4 + 0.2·6 = 5.2.
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 10.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(entropy_threshold(entropy, mask, 0.8, level="batch"), torch.tensor([[5.2]], dtype=torch.float64))


def test_invalid_rho_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="rho"):
        classify_tokens(torch.zeros(1, 2), torch.ones(1, 2), 1.5)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        classify_tokens(torch.zeros(1, 2), torch.ones(1, 3), 0.8)
