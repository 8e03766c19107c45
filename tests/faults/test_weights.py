"""Never stale, never broken: weight versions, the log-prob canary, finite parameters.

Faults on real ``archer fit`` runs (tiny model, CPU):

* a weight sync skipped after step 1 (``VLLMEngine``): step 2 samples with version 1 while the trainer
  synced version 2 — the run stops at step 2 naming the engine;
* a sync that counts a version but leaves the engine's weights as they were (TRL #5312): the canary
  (engine log-probs vs the trainer's) stops the run at step 2 naming the engine;
* fault 10: an optimizer step that leaves inf in the weights — the run stops at that step, before they
  are checkpointed or synced.

The rules themselves (:mod:`archer.weight_check`) are checked against hand-made values.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import ROOT, RUN, args, in_process, override_file

from archer.config import WeightCheckConfig
from archer.distributed import Collectives
from archer.rewards.runner import RewardResult
from archer.rollout import Completion
from archer.sampling import Samples, ScoredGroups
from archer.nonfinite import nonfinite_parameters
from archer.weight_check import StaleWeightsError, WeightCheck, canary_limit, is_jump

QUICKSTART_VLLM = str(ROOT / "configs" / "quickstart_vllm.yaml")


class _Engine:
    endpoint = "a test engine"

    def __init__(self, version: int) -> None:
        self.version = version


def _scored(versions: list[int | None]) -> ScoredGroups:
    completions = [Completion([5], [-0.1], "stop", v) for v in versions]
    n = len(versions)
    samples = Samples([[1]] * n, completions, [{}] * n, ["x"] * n)
    return ScoredGroups(samples, torch.zeros(n), torch.ones(n, dtype=torch.bool), RewardResult([0.0] * n))


def _check(on_stale="auto", asynchronous=False, engine=None, **config) -> WeightCheck:
    return WeightCheck(WeightCheckConfig(on_stale=on_stale, **config), engine or _Engine(0), asynchronous=asynchronous,
                       trainer_dtype="float32", checkpoint_dtype="torch.float32", collectives=Collectives())


# --------------------------------------------------------------------------------- the rules

def test_the_limit_by_dtype_and_the_jump_rule_by_hand():
    config = WeightCheckConfig()
    assert canary_limit(config, {"float32"}) == 0.01
    assert canary_limit(config, {"float32", "bfloat16"}) == 0.1
    assert canary_limit(WeightCheckConfig(max_gap=0.5), {"float32"}) == 0.5
    history = [1e-3, 2e-3, 4e-3]  # median 2e-3: a jump is above 10 × 2e-3 = 0.02
    assert not is_jump(0.019, history, factor=10, floor=1e-3)
    assert is_jump(0.021, history, factor=10, floor=1e-3)
    assert not is_jump(0.021, history[:2], factor=10, floor=1e-3)  # fewer than 3 gaps: no median yet
    assert not is_jump(5e-7, [1e-8] * 3, factor=10, floor=1e-3)  # 50× a tiny median, but rounding noise


def test_a_sample_without_a_version_from_an_engine_that_counts_them_is_stale():
    """A server restarted from its checkpoint labels its samples "default" (no version): not known to hold
    the synced weights."""
    check = _check()
    check.versions(_scored([0, 0]), step=0, n=2)
    with pytest.raises(StaleWeightsError, match=r"weight version \['unlabelled'\]"):
        check.versions(_scored([None, None]), step=0, n=2)


class _ConfiguredEngine(_Engine):
    """An engine's settings as the canary reads them: ``dtype`` as configured, ``loaded_dtype`` once set up."""

    def __init__(self, dtype: str, loaded_dtype: str | None = None) -> None:
        super().__init__(0)
        self.dtype, self.loaded_dtype = dtype, loaded_dtype


def test_the_limit_follows_the_dtype_the_engine_runs():
    """vLLM's ``dtype: auto`` runs a float32 checkpoint in bfloat16 where supported: before its setup the
    limit assumes it may; after, the dtype vLLM reports decides."""
    assert _check(engine=_ConfiguredEngine("auto")).limit == 0.1
    assert _check(engine=_ConfiguredEngine("auto", loaded_dtype="float32")).limit == 0.01
    assert _check(engine=_ConfiguredEngine("auto", loaded_dtype="bfloat16")).limit == 0.1
    assert _check(engine=_ConfiguredEngine("float32")).limit == 0.01


def test_unlabelled_samples_name_their_cause():
    check = _check()
    check.versions(_scored([0, 0]), step=0, n=2)
    with pytest.raises(StaleWeightsError, match=r"labelled samples with no weight version \(a server restarted"):
        check.versions(_scored([None, None]), step=1, n=2)


def test_two_jumps_with_an_unchecked_step_between_are_not_in_a_row():
    check = _check(max_gap=0.1, jump_factor=5)
    for gap in (0.01, 0.012, 0.011, 0.09):
        check.canary(gap, step=0)
    check.canary(None, step=1)  # no canary gap this step (e.g. no fresh sample)
    check.canary(0.09, step=2)  # a jump again, but not on the next checked step: runs on


def test_the_canary_is_off_when_sampling_truncates_the_distribution():
    check = WeightCheck(WeightCheckConfig(), _Engine(0), asynchronous=False, trainer_dtype="float32",
                        checkpoint_dtype="float32", collectives=Collectives(), truncated_sampling=True)
    check.canary(0.5, step=0)  # μ of a top-p distribution, π_old of the full one: not a stale engine


def test_synchronous_samples_must_carry_the_last_syncs_version():
    engine = _Engine(0)
    check = _check(engine=engine)
    assert check.versions(_scored([0, 0]), step=5, n=2).oldest == 0  # set up at step 5: version 0
    engine.version = 2
    assert check.versions(_scored([2, 2]), step=7, n=2).dropped == 0
    with pytest.raises(StaleWeightsError, match=r"step 8: samples were drawn by weight version \[2\] of _Engine "
                                                r"\(a test engine\), but the trainer synced version 3 after step 7"):
        check.versions(_scored([2, 2, 3, 3]), step=8, n=2)


def test_drop_masks_the_groups_of_stale_samples_and_counts_them():
    check = _check(on_stale="drop")
    check.versions(_scored([0, 0]), step=0, n=2)
    scored = _scored([1, 1, 0, 1, 1, 1])  # group 1 holds a sample of version 0 at step 1
    report = check.versions(scored, step=1, n=2)
    assert (report.oldest, report.dropped) == (0, 2)
    assert scored.keep.tolist() == [True, True, False, False, True, True]


def test_asynchronous_stale_drops_are_an_error_only_when_asked():
    assert _check(asynchronous=True).versions(_scored([3, 4]), step=6, n=2, stale_dropped=2).dropped == 2
    with pytest.raises(StaleWeightsError, match=r"samples were sampled by weights more than max_staleness versions "
                                                r"old \(on this rank 2, the oldest version 3\)"):
        _check(on_stale="error", asynchronous=True).versions(_scored([3, 4]), step=6, n=2, stale_dropped=2)


def test_the_canary_stops_a_gap_above_the_limit_or_a_jump():
    check = _check()
    for gap in (1e-7, 2e-7, 1e-7):
        check.canary(gap, step=0)
    check.canary(5e-4, step=3)  # 5000× the median, but below 0.01 / 10: noise
    with pytest.raises(StaleWeightsError, match=r"step 4: the log-probs of _Engine \(a test engine\) differ from "
                                                r"the trainer's by 0.15 per token \(rollout/canary_gap\), above the limit 0.01"):
        check.canary(0.15, step=4)
    bf16 = _check(max_gap=0.1, jump_factor=5)
    for gap in (0.01, 0.012, 0.011):
        bf16.canary(gap, step=0)
    bf16.canary(0.09, step=5)  # below the limit 0.1, but 0.09 / median 0.011 = 8.2 > 5: one spike is tolerated
    with pytest.raises(StaleWeightsError, match=r"by 0.08 per token .* 7× the median of the previous 4 steps .* for a "
                                                r"second step in a row"):
        bf16.canary(0.08, step=6)  # 0.08 / median 0.0115 = 7 > 5 again: stopped
    spiky = _check(max_gap=0.1, jump_factor=5)
    for gap in (0.01, 0.012, 0.011, 0.09, 0.011, 0.09):  # spikes apart from each other run on
        spiky.canary(gap, step=0)
    with pytest.raises(StaleWeightsError):
        _check().canary(math.nan, step=1)


def test_nonfinite_parameters_are_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert nonfinite_parameters(model, Collectives()) == (0, [])
    with torch.no_grad():
        model[1].bias[0] = math.inf
        model[0].weight[1, 0] = math.nan
    assert nonfinite_parameters(model, Collectives()) == (2, ["0.weight", "1.bias"])
    model[0].weight.requires_grad_(False)  # frozen parameters are not the update's
    assert nonfinite_parameters(model, Collectives()) == (1, ["1.bias"])


# ---------------------------------------------------------------------------------- the runs

def _vllm_run(tmp_path, model_dir, monkeypatch, sync: dict) -> None:
    override = override_file(tmp_path, max_steps=4, every=10, callbacks=[sync])
    in_process(tmp_path, args(model_dir, override, config=QUICKSTART_VLLM), monkeypatch)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_skipped_sync_stops_the_run_at_the_next_step_naming_the_engine(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    skip = {"class_path": "fault_probe.SkipWeightSync", "init_args": {"step": 1}}
    with pytest.raises(StaleWeightsError, match=r"step 2: samples were drawn by weight version \[1\] of VLLMEngine "
                                                r"\(the in-process vLLM engine\), but the trainer synced version 2"):
        _vllm_run(tmp_path, tiny_model_dir, monkeypatch, skip)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_sync_that_leaves_the_old_weights_is_stopped_by_the_canary(tiny_model_dir, tmp_path, monkeypatch):
    """The version advances (2 at step 2), the weights do not: the engine samples with the weights the
    actor had before step 1. Healthy steps measured a gap near 1e-7 (float32); the stale one is far
    above the float32 limit 0.01."""
    pytest.importorskip("vllm")
    stale = {"class_path": "fault_probe.StaleWeightSync", "init_args": {"step": 1}}
    with pytest.raises(StaleWeightsError, match=r"step 2: the log-probs of VLLMEngine \(the in-process vLLM engine\) "
                                                r"differ from the trainer's by .* above the limit 0.01") as error:
        _vllm_run(tmp_path, tiny_model_dir, monkeypatch, stale)
    print(error.value)


@pytest.mark.slow
def test_an_update_that_leaves_inf_in_the_weights_stops_before_they_are_saved(tiny_model_dir, tmp_path, monkeypatch):
    """Step 1's optimizer step runs with an infinite learning rate: AdamW's update lr · m̂ / (√v̂ + ε)
    writes ±inf into every weight (NaN where m̂ = 0), as an overflowing update would (gradients and
    loss stay finite, so the skipped-step rule does not see it). The run stops at step 1 with one
    line; the last checkpoint is step 0's (global step 1), finite."""
    overflow = {"class_path": "fault_probe.LearningRateAtStep", "init_args": {"step": 1, "lr": math.inf}}
    override = override_file(tmp_path, max_steps=3, every=1, callbacks=[overflow])
    with pytest.raises(SystemExit) as error:
        in_process(tmp_path, args(tiny_model_dir, override), monkeypatch)
    message = str(error.value)
    assert "\n" not in message and "step 1: the optimizer step left an inf or a NaN in" in message, message
    assert "neither checkpointed nor synced to the engine" in message
    state = torch.load(tmp_path / RUN / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 1
    assert all(torch.isfinite(value).all() for key, value in state["state_dict"].items() if key.startswith("actor."))
