import torch

from archer.rollout.base import Completion
from archer.rollout.batch import collate_rollout

PAD = 0


def test_collate_lays_prompts_left_and_responses_right():
    prompts = [[5, 6, 7], [8]]
    completions = [
        Completion(token_ids=[11, 12], logprobs=[-0.5, -1.0], finish_reason="stop"),
        Completion(token_ids=[13, 14, 15], logprobs=[-0.1, -0.2, -0.3], finish_reason="length"),
    ]
    batch = collate_rollout(prompts, completions, PAD)
    # P = 3 (longest prompt), R = 3 (longest response)
    assert batch.prompt_len == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 11, 12, PAD], [PAD, PAD, 8, 13, 14, 15]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # positions count real tokens only, so the left-padded row starts at 0 on its first prompt token
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch.response_ids.tolist() == [[11, 12, PAD], [13, 14, 15]]
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    torch.testing.assert_close(batch.engine_logprobs, torch.tensor([[-0.5, -1.0, 0.0], [-0.1, -0.2, -0.3]]))
    assert batch.truncated.tolist() == [False, True]
    assert batch.response_lengths.tolist() == [2, 3]


def test_collate_keeps_one_column_for_empty_responses_and_drops_missing_logprobs():
    batch = collate_rollout([[1, 2]], [Completion(token_ids=[], logprobs=None, finish_reason="stop")], PAD)
    assert batch.response_ids.shape == (1, 1)
    assert batch.response_mask.sum() == 0
    assert batch.engine_logprobs is None


def test_select_keeps_layout():
    prompts = [[1], [2], [3]]
    completions = [Completion(token_ids=[i + 10], logprobs=[-1.0], finish_reason="stop") for i in range(3)]
    batch = collate_rollout(prompts, completions, PAD)
    sub = batch.select(torch.tensor([2, 0]))
    assert sub.response_ids.tolist() == [[12], [10]]
    assert sub.prompt_len == batch.prompt_len
