"""PassAtK / AvgAtK against float64 ``math.comb`` references, hand-computed cases and a 2-process sync."""

from __future__ import annotations

import datetime
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from archer.metrics import AvgAtK, PassAtK, pass_at_k


def reference_pass_at_k(correct: torch.Tensor, k: int) -> float:
    """Mean over prompts of 1 − C(n−c, k)/C(n, k), with exact integer binomials then float64."""
    n = correct.shape[1]
    values = [1.0 - math.comb(n - int(c), k) / math.comb(n, k) for c in correct.sum(dim=1).tolist()]
    return sum(values) / len(values)


@pytest.mark.parametrize("n,k", [(1, 1), (4, 1), (8, 3), (16, 8), (16, 16), (64, 10)])
def test_pass_at_k_matches_math_comb_on_random_inputs(n: int, k: int) -> None:
    generator = torch.Generator().manual_seed(n * 100 + k)
    # Per-prompt success probabilities spread over [0, 1], so c covers 0 .. n.
    probs = torch.rand(50, 1, generator=generator)
    correct = torch.rand(50, n, generator=generator) < probs
    metric = PassAtK(k)
    metric.update(correct[:20])
    metric.update(correct[20:])
    result = metric.compute()
    assert result.dtype == torch.float64
    assert result.item() == pytest.approx(reference_pass_at_k(correct, k), rel=1e-12, abs=1e-14)


def test_pass_at_k_hand_computed() -> None:
    # n=4, k=2. Prompt A: c=1 → 1 − C(3,2)/C(4,2) = 1 − 3/6 = 0.5.
    # Prompt B: c=0 → 0.  Prompt C: c=3 → n−c=1 < k → 1.  Mean = (0.5 + 0 + 1)/3 = 0.5.
    correct = torch.tensor(
        [[True, False, False, False], [False, False, False, False], [True, True, False, True]]
    )
    metric = PassAtK(2)
    metric.update(correct)
    assert metric.compute().item() == pytest.approx(0.5, abs=1e-15)
    # k=1 is the fraction correct: (1/4 + 0 + 3/4)/3 = 1/3.
    metric1 = PassAtK(1)
    metric1.update(correct)
    assert metric1.compute().item() == pytest.approx(1 / 3, abs=1e-15)
    # n=5, c=2, k=3: 1 − C(3,3)/C(5,3) = 1 − 1/10 = 0.9.
    values = pass_at_k(5, torch.tensor([2]), 3)
    assert values.item() == pytest.approx(0.9, abs=1e-15)


def test_pass_at_k_large_n_does_not_overflow() -> None:
    # C(2000, 1000) overflows float64; the product form must still match the exact integer ratio.
    n, k, c = 2000, 1000, 3
    exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)  # Python ints → exact, then one division
    assert pass_at_k(n, torch.tensor([c]), k).item() == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_error_when_fewer_samples_than_k() -> None:
    metric = PassAtK(8)
    with pytest.raises(ValueError, match=r"n=4.*k=8"):
        metric.update(torch.zeros(3, 4, dtype=torch.bool))


def test_update_rejects_non_bool_and_wrong_rank() -> None:
    with pytest.raises(TypeError, match="bool"):
        PassAtK(1).update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[num_prompts, n\]"):
        PassAtK(1).update(torch.zeros(3, dtype=torch.bool))


def test_avg_at_k_hand_computed_and_checks_n() -> None:
    # Prompt A: 1/4 correct, prompt B: 4/4 → avg@4 = (0.25 + 1)/2 = 0.625.
    correct = torch.tensor([[False, True, False, False], [True, True, True, True]])
    metric = AvgAtK(4)
    metric.update(correct)
    assert metric.compute().item() == pytest.approx(0.625, abs=1e-15)
    with pytest.raises(ValueError, match=r"n=3.*k=4"):
        metric.update(correct[:, :3])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_run(rank: int, world_size: int, port: int, correct: torch.Tensor, k: int) -> tuple[float, float]:
    """Update with this rank's share of the prompts, return the synced (pass@k, avg@n)."""
    # A timeout so a rank whose partner died fails the test instead of hanging it.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=90),
    )
    try:
        metric, avg = PassAtK(k), AvgAtK(correct.shape[1])
        # Unequal shares (3 vs 7 prompts): a mean of per-rank means would differ from the global mean.
        mine = correct[:3] if rank == 0 else correct[3:]
        metric.update(mine)
        avg.update(mine)
        return metric.compute().item(), avg.compute().item()
    finally:
        dist.destroy_process_group()


def _child(rank: int, port: int, correct: torch.Tensor, k: int, out_file: str) -> None:
    torch.save(_sync_run(rank, 2, port, correct, k), out_file)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_sync_equals_single_process(tmp_path) -> None:
    generator = torch.Generator().manual_seed(7)
    correct = torch.rand(10, 6, generator=generator) < torch.rand(10, 1, generator=generator)
    k = 3
    single, single_avg = PassAtK(k), AvgAtK(6)
    single.update(correct)
    single_avg.update(correct)
    assert single.compute().item() == pytest.approx(reference_pass_at_k(correct, k), rel=1e-12)

    # Both ranks in spawned processes: this one may hold a default process group already (an
    # in-process vLLM engine of an earlier test initialises one and leaves it).
    port = _free_port()
    children = [mp.get_context("spawn").Process(target=_child, args=(rank, port, correct, k, str(tmp_path / f"rank{rank}.pt")))
                for rank in (0, 1)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=180)
    for child in children:  # a hung rank must not keep pytest from exiting (spawned children are not daemons)
        if child.is_alive():
            child.kill()
            child.join()
    results = {}
    for rank, child in enumerate(children):
        assert child.exitcode == 0, rank
        results[rank] = torch.load(tmp_path / f"rank{rank}.pt")
    for rank in (0, 1):
        pass_value, avg_value = results[rank]
        assert pass_value == pytest.approx(single.compute().item(), rel=1e-12), rank
        assert avg_value == pytest.approx(single_avg.compute().item(), rel=1e-12), rank
