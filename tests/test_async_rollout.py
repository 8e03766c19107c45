"""The asynchronous rollout producer: it runs ahead by at most the staleness bound, hands batches over
in order, records what it waited for, and hands its errors to the trainer."""

import threading
import time

import pytest
import torch

from archer.async_rollout import RolloutProducer


class Trainer:
    """The served step a real trainer advances with each weight sync, and the producer's calls."""

    def __init__(self, step: int = 0) -> None:
        self.served = step
        self.started: list[tuple[int, int, int]] = []  # (batch index, its step, served step at its start)
        self.lock = threading.Lock()

    def collect(self, index: int, step: int) -> str:
        with self.lock:
            self.started.append((index, step, self.served))
        return f"batch {index}"


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_each_batch_starts_within_the_staleness_bound_and_arrives_in_order(max_staleness):
    trainer = Trainer(step=5)  # resumed at step 5 on batch 9
    producer = RolloutProducer(trainer.collect, lambda: trainer.served, max_staleness=max_staleness)
    producer.start(index=9, step=5)
    for k in range(6):
        produced, _ = producer.take(9 + k)
        assert produced.scored == f"batch {9 + k}"
        assert produced.start_step >= 5 + k - max_staleness  # the bound, in steps
        trainer.served += 1  # the weight sync after the step
    producer.stop()
    for index, step, served in trainer.started:
        assert step == 5 + (index - 9) and served >= step - max_staleness
    # It runs exactly as far ahead as the bound allows: with K = 2 it had started batch 9 + 6 + 2 - 1.
    assert max(index for index, _, _ in trainer.started) <= 9 + 5 + max_staleness + 1


def test_the_producer_waits_for_the_sync_and_says_how_long():
    trainer = Trainer()
    producer = RolloutProducer(trainer.collect, lambda: trainer.served, max_staleness=0)
    producer.start(index=0, step=0)
    producer.take(0)
    time.sleep(0.3)  # batch 1 must wait for step 1's weights
    assert [index for index, _, _ in trainer.started] == [0]
    trainer.served = 1
    produced, _ = producer.take(1)
    assert produced.producer_idle_s >= 0.25
    producer.stop()


def test_an_error_in_the_producer_reaches_the_trainer():
    def collect(index, step):
        raise ValueError("server said no")

    producer = RolloutProducer(collect, lambda: 0, max_staleness=1)
    producer.start(index=0, step=0)
    with pytest.raises(RuntimeError, match="producer failed") as error:
        producer.take(0)
    assert isinstance(error.value.__cause__, ValueError)


def test_stop_ends_a_waiting_producer():
    producer = RolloutProducer(Trainer().collect, lambda: 0, max_staleness=0)
    producer.start(index=0, step=0)
    producer.take(0)  # batch 1 now waits for a sync that never comes
    producer.stop(timeout=5)
    assert not producer.running


def test_staleness_counts_from_the_oldest_span_or_the_start():
    from archer.async_rollout import ProducedBatch, staleness
    from archer.sampling import Samples, ScoredGroups
    from archer.rewards.runner import RewardResult
    from archer.rollout.base import Completion

    # Engine versions map to steps with offset 3 (version v = the weights of step v + 3). The batch
    # started while step 5 was served; step 6 trains on it.
    versions = [None, 2, 1, 4, -1]  # unknown; v2 = step 5; v1 = step 4 (a span older than the start); v4 newer; rolled back
    completions = [Completion([1], [0.0], "stop", weight_version=v) for v in versions]
    samples = Samples([[0]] * 5, completions, [{}] * 5, [""] * 5)
    produced = ProducedBatch(ScoredGroups(samples, torch.zeros(5), torch.ones(5, dtype=torch.bool), RewardResult([0.0] * 5)),
                             start_step=5, producer_idle_s=0.0)
    # steps: 5 (the start), 5, 4, 5 (not newer than the start), 2 → staleness 1, 1, 2, 1, 4
    assert staleness(produced, step=6, version_offset=3).tolist() == [1, 1, 2, 1, 4]


def test_async_rollouts_refuse_the_in_process_vllm_engine(tiny_model_dir):
    """VLLMEngine counts weight versions, but it is one engine that the training thread reloads in place:
    a producer thread generating on it meanwhile would sample half-copied weights."""
    import lightning as L
    import pytest

    from archer.config import AsyncRolloutConfig, DynamicSamplingConfig
    from archer.module import ArcherModule
    from archer.rewards import ExactMatchReward
    from archer.rollout import VLLMEngine

    module = ArcherModule(tiny_model_dir, reward=ExactMatchReward(), rollout=VLLMEngine(),
                          async_rollout=AsyncRolloutConfig(), dynamic_sampling=DynamicSamplingConfig(refill=False))
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"model.async_rollout needs an engine that serves while its weights are "
                                         r"replaced .* VLLMEngine does not"):
        module.setup("fit")
    module.teardown("fit")
