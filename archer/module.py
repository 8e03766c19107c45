"""ArcherModule: one RL step = rollout -> rewards -> advantages -> PPO-style update.

The module orchestrates; the formulas live in ``archer.algorithms`` (log-probs/entropy, advantages,
aggregation units) and in the policy loss chosen in YAML (``archer.losses``). One training step::

    prompts --engine.generate--> n completions per prompt --reward--> scores (0/1)
        --compute_advantages (per group)--> A_i  --shaping (optional)--> A_{i,t}
        --no_grad forward--> old log-probs (and reference log-probs when a KL beta > 0)
        --ppo_epochs x mini-batches x micro-batches--> loss.backward, clip, AdamW step

Gradient accumulation and data parallelism are exact for every aggregation mode: each micro-batch's
local aggregate is scaled by ``units(micro) / units(mini-batch, all ranks) * world_size`` (units =
tokens for token-mean, sequences for seq-mean-*), see ``archer.algorithms.agg_units``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, fields, replace

import lightning as L
import torch
from jsonargparse import lazy_instance
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from archer.algorithms import agg_units, compute_advantages, overlong_penalty, token_logprobs_and_entropy
from archer.config import DynamicSamplingConfig, OptimConfig, OverlongConfig, UpdateConfig
from archer.losses import ArcherLoss, PolicyLoss
from archer.metrics import PassAtK
from archer.rewards import Reward, RewardRunner
from archer.rollout import HFEngine, RolloutEngine, SamplingConfig
from archer.rollout.base import Completion
from archer.rollout.batch import RolloutBatch, collate_rollout
from archer.shaping import AdvantageShaping

@dataclass
class _Samples:
    """Flattened rollout samples (group-contiguous: ``n`` consecutive samples share a prompt)."""

    prompts: list[list[int]]
    completions: list[Completion]
    rows: list[dict]
    texts: list[str]

    def __add__(self, other: _Samples) -> _Samples:
        return _Samples(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def select(self, index: list[int]) -> _Samples:
        return _Samples(*([getattr(self, f.name)[i] for i in index] for f in fields(self)))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ArcherModule(L.LightningModule):
    """Actor + frozen reference, trained with a verifiable reward by a clipped policy loss.

    Args:
        model_path: Local Hugging Face folder of the actor (and of the reference, its initial copy).
        loss: The policy loss (``ArcherLoss``, ``DAPOLoss``, ``GRPOLoss``, ``HighEntropyMaskLoss`` or your own).
        reward: Scores a response against its dataset row. ``None``: the datamodule's synthetic task.
        rollout: The rollout engine (``HFEngine`` on CPU; ``VLLMEngine`` with ``WeightSyncCallback``).
        sampling: Training rollout sampling (``n`` is the group size).
        val_sampling: Validation sampling; ``n`` must be >= the largest of ``pass_k``. ``None``: ``sampling``.
        optim: AdamW and learning-rate schedule.
        update: PPO epochs, mini- and micro-batch sizes.
        advantage: Group advantage estimator: ``grpo`` (mean/std), ``drgrpo`` (no std) or ``rloo``.
        advantage_shaping: Applied in order after the advantages (perplexity / position shaping).
        overlong: DAPO overlong reward shaping; ``None`` disables it.
        dynamic_sampling: Drop groups whose rewards are all equal (optionally refilling); ``None`` keeps all.
        reward_timeout_s: A reward call that takes longer scores 0 and is counted.
        reward_workers: Worker processes that score rewards.
        pass_k: The k of the validation pass@k metrics.
        dtype: Parameter dtype of actor and reference (keep float32 master weights for small learning rates:
            a 1e-6 update is below bfloat16's resolution).
        fsdp_compute_dtype: Under ``ModelParallelStrategy`` (FSDP2): run forward/backward in this dtype
            (e.g. ``bfloat16``) while parameters and gradient reduction stay in ``dtype``.
        gradient_checkpointing: Recompute activations in the backward pass (saves memory at ~30% compute).
        token_view_samples: Responses kept from each step (with per-token entropy) for the token view.
    """

    def __init__(
        self,
        model_path: str,
        loss: PolicyLoss = lazy_instance(ArcherLoss),
        reward: Reward | None = None,
        rollout: RolloutEngine = lazy_instance(HFEngine),
        sampling: SamplingConfig = SamplingConfig(),
        val_sampling: SamplingConfig | None = None,
        optim: OptimConfig = OptimConfig(),
        update: UpdateConfig = UpdateConfig(),
        advantage: str = "grpo",
        advantage_shaping: list[AdvantageShaping] | None = None,
        overlong: OverlongConfig | None = None,
        dynamic_sampling: DynamicSamplingConfig | None = None,
        reward_timeout_s: float = 10.0,
        reward_workers: int = 2,
        pass_k: list[int] | None = None,
        dtype: str = "float32",
        fsdp_compute_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        token_view_samples: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "reward", "rollout", "advantage_shaping"])
        self.automatic_optimization = False
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.model_path = model_path
        self.loss = loss
        self.reward = reward
        self.rollout = rollout
        self.sampling = sampling
        self.val_sampling = val_sampling or sampling
        self.optim = optim
        self.update = update
        self.advantage = advantage
        self.advantage_shaping = advantage_shaping or []
        self.overlong = overlong
        self.dynamic_sampling = dynamic_sampling
        self.reward_timeout_s = reward_timeout_s
        self.reward_workers = reward_workers
        self.pass_k = sorted(pass_k or [1])
        if self.val_sampling.n < self.pass_k[-1]:
            raise ValueError(f"val_sampling.n = {self.val_sampling.n} < largest pass_k = {self.pass_k[-1]}")
        self.dtype_name = dtype
        self.fsdp_compute_dtype = fsdp_compute_dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.token_view_samples = token_view_samples
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.actor: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.reward_runner: RewardRunner | None = None
        self.val_metrics = torch.nn.ModuleDict()
        self.last_rollout_samples: list[dict] = []
        self._rollout_ready = False
        self._base_seed: int | None = None
        self._nonfinite_in_a_row = 0
        self._nonfinite_total = 0

    # ----------------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        """Load actor (trainable) and reference (frozen, only if a KL term needs it).

        Called by Lightning before the strategy wraps the modules, so FSDP2 can shard both.
        """
        if self.actor is not None:
            return
        dtype = _DTYPES[self.dtype_name]
        self.actor = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        if self.gradient_checkpointing:
            self.actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.actor.config.use_cache = False
        if self.loss.needs_reference:
            self.reference = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
            self.reference.eval().requires_grad_(False)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            for model in (self.actor, self.reference):
                if model is not None:
                    _fully_shard_decoder(model, self.device_mesh["data_parallel"], self.fsdp_compute_dtype)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.reward is None:
            task = getattr(datamodule, "task", None)
            if task is None:
                raise ValueError("model.reward is not set and the datamodule has no synthetic task to score with")
            self.reward = task
        if self.reward_runner is None:
            self.reward_runner = RewardRunner(
                self.reward, timeout_s=self.reward_timeout_s, num_workers=self.reward_workers
            )
        names = list(getattr(datamodule, "val_dataset_names", []) or [])
        for name in names:
            if name not in self.val_metrics:
                self.val_metrics[name] = torch.nn.ModuleDict({f"pass@{k}": PassAtK(k) for k in self.pass_k})

        if self._base_seed is None:
            # After `seed_everything`, so a resumed run derives the same per-step seeds (see _seed).
            self._base_seed = self.sampling.seed if self.sampling.seed is not None else torch.initial_seed()

    def _seed(self, draw: int = 0) -> int:
        """The seed of this step's ``draw``-th rollout on this rank.

        Derived from (base seed, global step, rank, draw) rather than from a global RNG state, so a
        run resumed from a checkpoint samples exactly what the uninterrupted run would have.
        """
        return (self._base_seed + 1_000_003 * self.global_step + 10_007 * self.global_rank + draw) % 2**31

    def teardown(self, stage: str) -> None:
        if self.reward_runner is not None:
            self.reward_runner.close()
            self.reward_runner = None

    def _ensure_rollout(self) -> None:
        if not self._rollout_ready:
            self.rollout.setup(self.actor, self.tokenizer, self.model_path)
            self._rollout_ready = True

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            [p for p in self.actor.parameters() if p.requires_grad],
            lr=self.optim.lr,
            betas=self.optim.betas,
            weight_decay=self.optim.weight_decay,
        )
        # trainer.max_steps counts optimizer steps (Lightning's global_step under manual optimization).
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor_fn(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor_fn(self, total: int | None):
        """Linear warmup to 1, then constant or cosine down to ``min_lr_ratio`` at ``total`` steps."""
        warmup, schedule, floor = self.optim.warmup_steps, self.optim.schedule, self.optim.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if schedule == "constant" or not total:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return factor

    # ------------------------------------------------------------------------ checkpoint hooks
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The reference is the initial actor: it is reloaded from model_path, never stored.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]
        checkpoint["archer"] = {"nonfinite_total": self._nonfinite_total}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.reference is not None:
            state = checkpoint.setdefault("state_dict", {})
            state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
        self._nonfinite_total = checkpoint.get("archer", {}).get("nonfinite_total", 0)

    # --------------------------------------------------------------------------------- rollout
    def _sample(self, rows: list[dict], sampling: SamplingConfig) -> _Samples:
        """Roll out ``sampling.n`` completions for each prompt row (flattened, group-contiguous)."""
        self._ensure_rollout()
        prompts = [row["prompt_ids"] for row in rows]
        groups = self.rollout.generate(prompts, sampling)
        completions = [c for group in groups for c in group]
        return _Samples(
            prompts=[p for p in prompts for _ in range(sampling.n)],
            completions=completions,
            rows=[row["row"] for row in rows for _ in range(sampling.n)],
            texts=self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True),
        )

    def _score(self, samples: _Samples, stats: dict) -> torch.Tensor:
        result = self.reward_runner.score(samples.texts, samples.rows)
        stats["reward/errors"] += result.num_errors
        stats["reward/timeouts"] += result.num_timeouts
        return torch.tensor(result.scores, dtype=torch.float32)

    def _rollout_and_score(self, prompt_rows: list[dict], stats: dict) -> tuple[_Samples, torch.Tensor, torch.Tensor]:
        """Rollout + rewards, with DAPO/Archer dynamic sampling when configured.

        Returns the samples, their rewards ``[N]`` and a ``[N]`` keep mask. ``N`` is always
        ``len(prompt_rows) * n``, so all ranks run the same number of forward/backward passes:
        dropped groups stay in the batch, masked out of the loss.
        """
        n = self.sampling.n
        samples = self._sample(prompt_rows, replace(self.sampling, seed=self._seed()))
        scores = self._score(samples, stats)
        if self.dynamic_sampling is None:
            return samples, scores, torch.ones_like(scores, dtype=torch.bool)
        informative = _informative_groups(scores, n)
        extra_batches = 0
        while (
            self.dynamic_sampling.refill
            and informative.sum() < len(prompt_rows)
            and extra_batches < self.dynamic_sampling.max_extra_batches
        ):
            extra_rows = self.trainer.datamodule.draw_train_batch()
            extra = self._sample(extra_rows, replace(self.sampling, seed=self._seed(draw=extra_batches + 1)))
            extra_scores = self._score(extra, stats)
            samples = samples + extra
            scores = torch.cat([scores, extra_scores])
            informative = torch.cat([informative, _informative_groups(extra_scores, n)])
            extra_batches += 1
        stats["rollout/extra_batches"] = extra_batches
        # Keep exactly len(prompt_rows) groups: informative ones first, then masked-out fillers.
        groups = torch.argsort((~informative).to(torch.int8), stable=True)[: len(prompt_rows)]
        index = (groups[:, None] * n + torch.arange(n)).flatten().tolist()
        return samples.select(index), scores[index], informative[groups].repeat_interleave(n)

    # ------------------------------------------------------------------------------- log-probs
    def _logprobs(self, model: torch.nn.Module, mb: RolloutBatch, temperature: float):
        """Per-token log-probs (with grad) and entropy (detached) of the response tokens of ``mb``.

        Only the hidden states of response positions go through the vocabulary projection, and in
        chunks: the ``[B, T, V]`` logits never exist.
        """
        out = model(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            logits_to_keep=1,  # the loss projects hidden states itself, in chunks
            output_hidden_states=True,
            use_cache=False,
        )
        p, r = mb.prompt_len, mb.response_ids.shape[1]
        hidden = out.hidden_states[-1][:, p - 1 : p - 1 + r]
        head = model.get_output_embeddings()
        weight = head.weight.full_tensor() if isinstance(head.weight, DTensor) else head.weight
        bias = getattr(head, "bias", None)
        return token_logprobs_and_entropy(
            hidden,
            weight,
            mb.response_ids,
            temperature=temperature,
            chunk_size=self.update.logprob_chunk_size,
            lm_head_bias=bias,
        )

    @torch.no_grad()
    def _logprobs_no_grad(self, model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs, entropies = [], []
        for idx in _chunks(batch.num_sequences, self.update.micro_batch_size):
            lp, ent = self._logprobs(model, batch.select(idx), self.sampling.temperature)
            logprobs.append(lp)
            entropies.append(ent)
        return torch.cat(logprobs), torch.cat(entropies)

    # ------------------------------------------------------------------------------------ step
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        stats: dict = defaultdict(float)
        t0 = time.perf_counter()
        self.actor.eval()  # rollout and old log-probs without dropout
        samples, scores, keep = self._rollout_and_score(batch, stats)
        rollout = collate_rollout(samples.prompts, samples.completions, self.tokenizer.pad_token_id).to(self.device)
        scores, keep = scores.to(self.device), keep.to(self.device)
        response_lengths = rollout.response_lengths
        t_rollout = time.perf_counter() - t0

        n = self.sampling.n
        rewards = scores
        if self.overlong is not None:
            rewards = rewards + overlong_penalty(
                response_lengths,
                max_len=self.sampling.max_new_tokens,
                buffer=self.overlong.buffer,
                penalty=self.overlong.penalty,
            )
        advantages = compute_advantages(rewards, n, estimator=self.advantage)  # [N]
        rollout.response_mask = rollout.response_mask * keep[:, None].to(rollout.response_mask.dtype)
        mask = rollout.response_mask

        t1 = time.perf_counter()
        old_logprob, _ = self._logprobs_no_grad(self.actor, rollout)
        ref_logprob = self._logprobs_no_grad(self.reference, rollout)[0] if self.reference is not None else None
        advantages = advantages[:, None].expand_as(mask).contiguous()  # [N, R]
        for shaping in self.advantage_shaping:
            advantages = shaping(advantages, old_logprob, mask, n)
        t_logprob = time.perf_counter() - t1

        t2 = time.perf_counter()
        self.actor.train()
        update_stats = self._update(rollout, old_logprob, ref_logprob, advantages)
        t_update = time.perf_counter() - t2

        total_time = time.perf_counter() - t0
        tokens = rollout.attention_mask.sum().item()
        metrics = {
            "train/reward_mean": scores.mean().item(),
            "train/solve_rate": _solve_rate(scores, n),
            "train/response_length_mean": response_lengths.mean().item(),
            "train/response_clip_ratio": rollout.truncated.float().mean().item(),
            "train/advantage_abs_mean": (advantages.abs() * mask).sum().item() / max(1.0, mask.sum().item()),
            "train/kept_groups_fraction": keep.float().mean().item(),
            "train/lr": self.lr_schedulers().get_last_lr()[0],
            "train/nonfinite_steps": float(self._nonfinite_total),
            "reward/errors": stats["reward/errors"],
            "reward/timeouts": stats["reward/timeouts"],
            "time/rollout_s": t_rollout,
            "time/logprob_s": t_logprob,
            "time/update_s": t_update,
            "perf/tokens_per_s": tokens / total_time,
        }
        if self.dynamic_sampling is not None:
            metrics["rollout/extra_batches"] = float(stats["rollout/extra_batches"])
        if rollout.engine_logprobs is not None:
            valid = rollout.response_mask > 0
            diff = (rollout.engine_logprobs - old_logprob).abs()[valid]
            metrics["rollout/logprob_diff"] = diff.mean().item() if diff.numel() else 0.0
        metrics.update({f"train/{k}": v for k, v in update_stats.items()})
        self.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=self.trainer.world_size > 1, batch_size=len(batch))
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, on_step=True, logger=False, batch_size=len(batch))
        self._keep_samples(rollout, scores)

    def _update(self, rollout: RolloutBatch, old_logprob, ref_logprob, advantages) -> dict[str, float]:
        """``ppo_epochs`` passes over mini-batches; returns the mean of the loss statistics."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        n_seq = rollout.num_sequences
        world = self.trainer.world_size
        prompts_local = n_seq // self.sampling.n
        mini_prompts = (self.update.mini_batch_size // world) if self.update.mini_batch_size else prompts_local
        mini_seqs = max(1, mini_prompts) * self.sampling.n
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for epoch in range(self.update.ppo_epochs):
            if self.update.shuffle:
                generator = torch.Generator().manual_seed(self._seed(draw=1000 + epoch))
                order = torch.randperm(n_seq, generator=generator).to(self.device)
            else:
                order = torch.arange(n_seq, device=self.device)
            for mini_idx in _chunks(n_seq, mini_seqs):
                mini = order[mini_idx]
                units_local = agg_units(rollout.response_mask[mini], self.loss.loss_agg)
                units_global = self._sum_across_ranks(float(units_local))
                optimizer.zero_grad(set_to_none=True)
                finite = True
                for micro_idx in _chunks(len(mini), self.update.micro_batch_size):
                    idx = mini[micro_idx]
                    mb = rollout.select(idx)
                    logprob, entropy = self._logprobs(self.actor, mb, self.sampling.temperature)
                    loss, loss_stats = self.loss(
                        logprob,
                        old_logprob[idx],
                        None if ref_logprob is None else ref_logprob[idx],
                        advantages[idx],
                        entropy,
                        mb.response_mask,
                        norm_len=self.sampling.max_new_tokens,
                    )
                    micro_units = float(agg_units(mb.response_mask, self.loss.loss_agg))
                    scale = micro_units / units_global * world if units_global > 0 else 0.0
                    finite = finite and bool(torch.isfinite(loss))
                    self.manual_backward(loss * scale)
                    for key, value in loss_stats.items():
                        sums[key] += value
                    if epoch == 0 and micro_idx.start == 0 and mini_idx.start == 0:
                        self._first_entropy = entropy.detach()
                        self._first_entropy_rows = idx
                    count += 1
                grad_norm = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), self.optim.max_grad_norm)
                if isinstance(grad_norm, DTensor):
                    grad_norm = grad_norm.full_tensor()
                sums["grad_norm_sum"] += float(grad_norm)
                sums["optimizer_steps"] += 1
                # One verdict for all ranks: a rank that stepped alone would leave the replicas apart.
                finite = finite and bool(torch.isfinite(grad_norm))
                if self._sum_across_ranks(float(finite)) == world:
                    optimizer.step()
                    scheduler.step()  # the schedule counts optimizer steps taken, not attempted
                    self._nonfinite_in_a_row = 0
                else:
                    optimizer.zero_grad(set_to_none=True)
                    self._nonfinite_in_a_row += 1
                    self._nonfinite_total += 1
                    self._check_nonfinite()
        steps = sums.pop("optimizer_steps")
        out = {k: v / count for k, v in sums.items() if k != "grad_norm_sum"}
        out["grad_norm"] = sums["grad_norm_sum"] / steps
        return out

    def _check_nonfinite(self) -> None:
        limit = self.update.max_nonfinite_steps
        if self._nonfinite_in_a_row >= limit:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(update.max_nonfinite_steps = {limit}); stopping. The last checkpoint holds the weights "
                "from before these steps."
            )

    def _sum_across_ranks(self, value: float) -> float:
        if self.trainer.world_size == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        return float(self.trainer.strategy.reduce(tensor, reduce_op="sum"))

    def _keep_samples(self, rollout: RolloutBatch, scores: torch.Tensor) -> None:
        """Keep a few responses with their per-token entropy (training forward, first micro-batch) for the token view."""
        entropy = getattr(self, "_first_entropy", None)
        if entropy is None or self.token_view_samples <= 0:
            return
        # Spread the picks over prompts: the first response of each group, then the second, ...
        rows = self._first_entropy_rows.tolist()
        seen: dict[int, int] = defaultdict(int)
        order = []
        for j, row in enumerate(rows):
            order.append((seen[row // self.sampling.n], j))
            seen[row // self.sampling.n] += 1
        samples = []
        for _, j in sorted(order)[: self.token_view_samples]:
            row = rows[j]
            length = int(rollout.response_mask[row].sum().item())
            ids = rollout.response_ids[row, :length].tolist()
            prompt_ids = rollout.input_ids[row, : rollout.prompt_len][rollout.attention_mask[row, : rollout.prompt_len] > 0]
            samples.append(
                {
                    "prompt": self.tokenizer.decode(prompt_ids.tolist()),
                    "tokens": [self.tokenizer.decode([t]) for t in ids],
                    "entropy": entropy[j, :length].float().tolist(),
                    "reward": float(scores[row]),
                    "step": int(self.global_step),
                }
            )
        self.last_rollout_samples = samples

    # ------------------------------------------------------------------------------ validation
    def validation_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        names = list(self.val_metrics.keys())
        if not names:
            return
        self.actor.eval()
        stats: dict = defaultdict(float)
        # A fixed seed per batch: successive validations of the same policy agree.
        sampling = replace(self.val_sampling, seed=self._base_seed + 7919 * batch_idx + dataloader_idx)
        scores = self._score(self._sample(batch, sampling), stats)
        correct = (scores >= 1.0).view(len(batch), self.val_sampling.n)
        for metric in self.val_metrics[names[dataloader_idx]].values():
            metric.update(correct)

    def on_validation_epoch_end(self) -> None:
        for name, metrics in self.val_metrics.items():
            for key, metric in metrics.items():
                if metric.update_called:
                    self.log(f"val/{name}/{key}", metric.compute(), add_dataloader_idx=False)
                metric.reset()


def _fully_shard_decoder(model: torch.nn.Module, mesh, compute_dtype: str | None) -> None:
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder `layers` to shard")
    policy = MixedPrecisionPolicy()
    if compute_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=_DTYPES[compute_dtype], reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _chunks(total: int, size: int) -> list[slice]:
    size = max(1, size)
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]


def _informative_groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    """``[G]`` bool: groups whose rewards are not all equal (all-equal groups have zero advantage)."""
    groups = scores.view(-1, n)
    return (groups.max(-1).values - groups.min(-1).values) > 0


def _solve_rate(scores: torch.Tensor, n: int) -> float:
    """Fraction of prompts with at least one correct sample."""
    return (scores.view(-1, n) >= 1.0).any(-1).float().mean().item()
