"""LoRA on the actor (``archer/lora.py``, ``archer.models.add_lora``), on one process: the reference as
the actor with its adapters off, the merged weights engines load, and one RL step's update of the
adapters against a float64 computation by hand (a plain model with merged weights ``W + s·B·A``, the
surrogate written out, clipping and AdamW written out). Runs, checkpoints and exports are in
``tests/distributed/test_lora_runs.py``; vLLM after a sync in ``tests/rollout/test_vllm_lora.py``."""

from __future__ import annotations

import math

import pytest
import torch

from archer.actor import Actor
from archer.config import LoraConfig, OptimConfig, UpdateConfig
from archer.distributed import Collectives, GradientSync
from archer.experience import Experience
from archer.lora import adapters_disabled, merged_named_tensors
from archer.losses import GRPOLoss
from archer.micro_batches import plan_passes
from archer.models import add_lora, load_causal_lm
from archer.optim import build_optimizer
from archer.rollout.base import Completion
from archer.rollout.batch import collate_rollout
from archer.tiny import write_tiny_model

pytest.importorskip("peft")

TEMPERATURE = 0.7
PROMPTS = [[1, 40, 41, 42], [1, 40, 41, 42], [1, 55, 56], [1, 55, 56]]
RESPONSES = [[43, 44, 45, 2], [46, 47], [57, 58, 59], [60, 2]]


def _rollout():
    completions = [Completion(token_ids=r, logprobs=None, finish_reason="stop") for r in RESPONSES]
    return collate_rollout(PROMPTS, completions, pad_token_id=0)


def _ranks(rollout):
    prompt = rollout.attention_mask[:, : rollout.prompt_len].sum(-1)
    return [torch.stack([prompt, rollout.response_mask.sum(-1).long(), torch.ones_like(prompt)], -1)]


def _actor(model, reference, loss=None, **update) -> Actor:
    return Actor(
        model, reference, loss or GRPOLoss(), update=UpdateConfig(**{"micro_batch_size": 2, **update}), group_size=2,
        temperature=TEMPERATURE, max_new_tokens=4, max_grad_norm=1.0, packed=False, device=torch.device("cpu"),
        collectives=Collectives(), gradient_sync=GradientSync(),
    )


def _logprobs(actor: Actor, reference: bool = False) -> torch.Tensor:
    rollout = _rollout()
    return actor.logprobs(rollout, plan_passes(_ranks(rollout), 0, max_sequences=2), reference=reference)[0]


def _lora_model(path, config: LoraConfig, *, b_std: float = 0.0, seed: int = 0):
    model = add_lora(load_causal_lm(str(path), "float32"), config)
    if b_std:  # B away from its zero start: the adapters change the model, and A gets a gradient
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(b_std * torch.randn(param.shape, generator=generator))
                elif ".modules_to_save." in name:  # a trained norm: away from the original's ones
                    param.mul_(1 + 10 * b_std * torch.randn(param.shape, generator=generator))
    return model.eval()


def test_at_init_the_actor_is_the_base_model_and_adapters_off_is_a_frozen_copy(tiny_model_dir):
    """B = 0: the adapted actor's log-probs equal the base model's; the reference via switched-off
    adapters equals a separate frozen copy — exactly (CPU, float32), also once B moved away from 0,
    when the policy no longer equals the base model. The adapters stay trainable after the pass."""
    base = load_causal_lm(tiny_model_dir, "float32").eval()
    copy = load_causal_lm(tiny_model_dir, "float32", trainable=False)
    lora = _lora_model(tiny_model_dir, LoraConfig(r=4, alpha=8))
    assert torch.equal(_logprobs(_actor(lora, None)), _logprobs(_actor(base, None)))
    assert torch.equal(_logprobs(_actor(lora, lora), reference=True), _logprobs(_actor(lora, copy), reference=True))

    moved = _lora_model(tiny_model_dir, LoraConfig(r=4, alpha=8, modules_to_save=["model.norm"]), b_std=0.05)
    policy, reference = _logprobs(_actor(moved, moved)), _logprobs(_actor(moved, moved), reference=True)
    assert (policy - _logprobs(_actor(base, None))).abs().max() > 1e-3  # the adapters do change the policy
    assert torch.equal(reference, _logprobs(_actor(moved, copy), reference=True))
    # switched back on after the reference pass, the trained norm copy included (transformers' own
    # enable_adapters leaves it off)
    assert torch.equal(_logprobs(_actor(moved, moved)), policy)
    trainable = [name for name, p in moved.named_parameters() if p.requires_grad]
    assert trainable and all(any(k in name for k in (".lora_A.", ".lora_B.", "norm.modules_to_save.")) for name in trainable)
    with adapters_disabled(moved):  # peft's switch would freeze them inside: FSDP2 must not see that
        assert [name for name, p in moved.named_parameters() if p.requires_grad] == trainable


def test_an_actor_without_adapters_cannot_be_its_own_reference(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, "float32")
    with pytest.raises(ValueError, match="its own reference only with LoRA adapters"):
        _actor(model, model)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_weights_are_the_base_names_with_w_plus_scaled_ba(tmp_path, rslora):
    """Every base-model name (tied ``lm_head.weight`` too) and nothing else; adapted layers carry
    ``W + s·B·A`` with ``s = alpha / r`` (``alpha / √r`` for rsLoRA), computed here in float64, the
    final norm trained beside them its trained copy; a plain model loaded with them gives the adapted
    actor's log-probs."""
    path = write_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    r, alpha = 4, 8.0
    lora = _lora_model(path, LoraConfig(r=r, alpha=alpha, rslora=rslora, target_modules=["q_proj", "down_proj"],
                                        modules_to_save=["model.norm"]), b_std=0.05)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    merged = dict(merged_named_tensors(lora))
    plain = load_causal_lm(str(path), "float32").eval()
    assert list(merged) == [name for name, _ in plain.named_parameters(remove_duplicate=False)]
    assert "lm_head.weight" in merged
    params = dict(lora.named_parameters(remove_duplicate=False))
    adapted = 0
    for name, tensor in merged.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            a, b = params[f"{module}.lora_A.default.weight"].double(), params[f"{module}.lora_B.default.weight"].double()
            expected = params[f"{module}.base_layer.weight"].double() + scale * b @ a
            torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
            assert (tensor - params[f"{module}.base_layer.weight"]).abs().max() > 1e-3
            adapted += 1
        elif name == "model.norm.weight":  # trained in full: its copy
            assert torch.equal(tensor, params["model.norm.modules_to_save.default.weight"])
            assert not torch.equal(tensor, params["model.norm.original_module.weight"])
        else:
            key = name if name in params else f"{module}.base_layer.{name.rsplit('.', 1)[1]}"
            assert torch.equal(tensor, params[key]), name
    assert adapted == 2 * 2  # two target modules in each of the 2 layers
    plain.load_state_dict(merged)
    torch.testing.assert_close(_logprobs(_actor(plain, None)), _logprobs(_actor(lora, None)), rtol=0, atol=1e-5)


def test_config_errors_name_the_field(tiny_model_dir):
    with pytest.raises(ValueError, match=r"model.lora needs r >= 1"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match=r"model.lora.init must be one of"):
        LoraConfig(init="pissa")
    with pytest.raises(ValueError, match=r"model.lora: .*not_a_layer"):
        add_lora(load_causal_lm(tiny_model_dir, "float32"), LoraConfig(target_modules=["not_a_layer"]))
    # the head's adapters would be sampled with and merged, but the trainer's log-probs read its weight
    with pytest.raises(ValueError, match=r"adapts lm_head: only the decoder's linear layers"):
        add_lora(load_causal_lm(tiny_model_dir, "float32"), LoraConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"adapts model.embed_tokens: only the decoder's linear layers"):
        add_lora(load_causal_lm(tiny_model_dir, "float32"), LoraConfig(target_modules=["embed_tokens"]))
    # trained float32 copies of norms would feed float32 activations into a bfloat16 model's layers
    with pytest.raises(ValueError, match=r"modules_to_save \(model.norm\) needs model.dtype: float32"):
        add_lora(load_causal_lm(tiny_model_dir, "bfloat16"), LoraConfig(modules_to_save=["model.norm"]))
    # GPT-2's Conv1D stores W as [in, out]: the merge for the engines assumes [out, in]
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"adapts transformer.h.0.attn.c_attn, a Conv1D-style layer \(fan_in_fan_out\)"):
        add_lora(gpt2, LoraConfig(target_modules=["c_attn"]))


# ------------------------------------------------------------------ one update, by hand in float64
LR, WEIGHT_DECAY, BETAS, EPS, MAX_NORM, KL_COEF, CLIP = 1e-2, 0.1, (0.9, 0.999), 1e-8, 1.0, 0.1, 0.2


def _hand_update(path, start: dict[str, torch.Tensor], scale: float, old, ref, advantages, mask, steps: int,
                 optimizer: str):
    """The adapters after ``steps`` optimizer steps over the whole batch, in float64, without peft or
    the Actor: a plain model whose adapted weights are ``W + s·B·A`` (``torch.func.functional_call``),
    each response alone through it (full-vocabulary log-softmax), GRPO's token-mean surrogate with the
    k3 KL written out, the gradient-norm clip, then SGD (θ − lr·g) or AdamW (``torch.optim.AdamW``'s
    update) by hand."""
    plain = load_causal_lm(str(path), "float32").double().eval()
    weights = {name: p.detach() for name, p in plain.named_parameters()}
    theta = {name: value.double().clone().requires_grad_(True) for name, value in start.items()}
    m = {name: torch.zeros_like(value) for name, value in theta.items()}
    v = {name: torch.zeros_like(value) for name, value in theta.items()}
    for step in range(1, steps + 1):
        merged = dict(weights)
        for name in theta:
            if ".lora_A." in name:
                module = name.split(".lora_A.")[0]
                merged[f"{module}.weight"] = weights[f"{module}.weight"] + scale * theta[
                    f"{module}.lora_B.default.weight"] @ theta[name]
            elif ".modules_to_save." in name:  # the final norm, trained in full
                merged[name.replace(".modules_to_save.default", "")] = theta[name]
        terms = []
        for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
            ids = torch.tensor([prompt + response])
            logits = torch.func.functional_call(plain, merged, (ids,), {"use_cache": False}).logits
            logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1] / TEMPERATURE, -1)
            ell = logp.gather(-1, torch.tensor(response)[:, None])[:, 0]
            n = len(response)
            ratio = torch.exp(ell - old[i, :n])
            a = advantages[i, :n]
            pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP, 1 + CLIP))
            d = ref[i, :n] - ell
            terms.append(pg + KL_COEF * (torch.exp(d) - d - 1))
        loss = torch.cat(terms).sum() / mask.sum()
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        coef = min(1.0, MAX_NORM / (float(norm) + 1e-6))
        with torch.no_grad():
            for name, param in theta.items():
                g = grads[name] * coef
                if optimizer == "sgd":
                    param.sub_(LR * g)
                    continue
                param.mul_(1 - LR * WEIGHT_DECAY)
                m[name] = BETAS[0] * m[name] + (1 - BETAS[0]) * g
                v[name] = BETAS[1] * v[name] + (1 - BETAS[1]) * g * g
                m_hat, v_hat = m[name] / (1 - BETAS[0] ** step), v[name] / (1 - BETAS[1] ** step)
                param.sub_(LR * m_hat / (v_hat.sqrt() + EPS))
    return {name: value.detach() for name, value in theta.items()}


# Tolerances of float32 against float64 after 2 steps (measured 2026-12-03): SGD moves each element by
# lr·g (up to 2.4e-3 here), max |Δ| 1.4e-8; AdamW divides each gradient element by its own magnitude (√v), so a float32
# rounding in a near-zero element can flip its step: max |Δ| 4.4e-5 on one element of 1024 (the
# others below 4e-6), where each element moves by ~lr = 1e-2 per step. Plus the float32 rounding of
# each step's result (half an ulp, 6e-8 × |θ|, twice): the norm's weights are ~1.
ATOL = {"sgd": 1e-7, "adamw": 1e-4}
RTOL = 2 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_rl_step_updates_the_adapters_as_computed_by_hand_in_float64(tiny_model_dir, optimizer):
    """Two PPO epochs (2 optimizer steps, each 2 micro-batches of 2 responses) of GRPO with a KL term
    against the adapters-off reference, on adapters with B ≠ 0 (so A has a gradient and the KL is not
    0), and the final norm trained beside them, the gradient norm clipped (> 1 here): the adapters and
    the norm after ``Actor.update`` equal the float64 computation by hand (``ATOL``). Only they are in
    the optimizer and only they move."""
    config = LoraConfig(r=4, alpha=8, modules_to_save=["model.norm"])
    model = _lora_model(tiny_model_dir, config, b_std=0.05)
    loss = GRPOLoss(clip=(CLIP, CLIP), dual_clip=None, kl_coef=KL_COEF, kl_estimator="k3", loss_agg="token-mean")
    actor = _actor(model, model, loss, ppo_epochs=2)
    rollout = _rollout()
    passes = plan_passes(_ranks(rollout), 0, max_sequences=2)
    old, ref = actor.logprobs(rollout, passes)[0], actor.logprobs(rollout, passes, reference=True)[0]
    mask = rollout.response_mask
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * mask
    exp = Experience(rollout, rollout.response_lengths, old, ref, advantages, None, {}, _ranks(rollout))
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    if optimizer == "sgd":
        torch_optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    else:
        torch_optimizer, _ = build_optimizer(
            model.parameters(), OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=0), None)
        assert {id(p) for group in torch_optimizer.param_groups for p in group["params"]} == {
            id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    result = actor.update(exp, torch_optimizer, seeds=_seeds(), step=0)
    assert result.steps_taken == 2

    expected = _hand_update(tiny_model_dir, start, config.alpha / config.r, old.double(), ref.double(), advantages.double(),
                            mask, steps=2, optimizer=optimizer)
    trained = dict(model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(trained[name].detach().double(), value, rtol=RTOL, atol=ATOL[optimizer], msg=name)
    moved = {kind: max(float((trained[n].detach() - start[n]).abs().max()) for n in start if kind in n)
             for kind in ("lora_A", "lora_B", "modules_to_save")}
    assert min(moved.values()) > 100 * ATOL[optimizer], moved
    for name, value in frozen.items():
        assert torch.equal(trained[name], value), name
    # the reference pass: the base model's log-probs, computed here in float64 without peft
    base = load_causal_lm(tiny_model_dir, "float32").double().eval()
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        with torch.no_grad():
            logits = base(torch.tensor([prompt + response]), use_cache=False).logits[0, len(prompt) - 1 : -1]
        expected_ref = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        torch.testing.assert_close(ref[i, : len(response)].double(), expected_ref, rtol=0, atol=1e-5)


def _seeds():
    from archer.seeding import Seeds

    return Seeds(0, 0)
