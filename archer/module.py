"""ArcherModule: one RL step = rollout -> rewards -> advantages -> PPO-style update.

The module orchestrates; the formulas live in ``archer.algorithms`` (log-probs/entropy, advantages,
aggregation units) and in the policy loss chosen in YAML (``archer.losses``). One training step::

    prompts --engine.generate--> n completions per prompt --reward--> scores (0/1)
        --compute_advantages (per group)--> A_i  --shaping (optional)--> A_{i,t}
        --no_grad forward--> old log-probs (and reference log-probs when a KL beta > 0)
        --ppo_epochs x mini-batches x micro-batches--> loss.backward, clip, AdamW step
        --> one LR-schedule step

**One unit of progress: the RL step.** ``trainer.max_steps``, ``global_step``, the checkpoint
interval (``every_n_train_steps``), the validation interval (``val_check_interval``, in train
batches) and the LR schedule (warmup, cosine) all count RL steps (``training_step`` calls), as in
verl, where the scheduler steps once per actor update. Each RL step runs ``ppo_epochs`` × mini-batches
optimizer steps; the last goes through Lightning's optimizer wrapper, which counts one global step,
the others through the torch optimizer directly. A skipped optimizer step (a non-finite loss or
gradient norm, or a mini-batch whose groups were all dropped) sets the gradients to None, which
AdamW skips (no momentum, no weight decay), so skips never shift the step count, the checkpoint or
validation cadence, or the schedule.

**Exact accumulation.** Each micro-batch's loss divides by the unit count of its whole mini-batch on
all ranks (``PolicyLoss.minibatch_context``; for some losses it also needs a no-grad forward over
the mini-batch), times the world size because DDP and FSDP2 average gradients over ranks. So the
update is the same for every micro-batch size and number of ranks, for every loss and aggregation
(two exceptions: Clip-Cov's random token choice, drawn per rank, and batch-scope perplexity
shaping, a per-rank statistic).
Gradients are synchronised across ranks once per optimizer step (on its last micro-batch). Loss
statistics are numerator/denominator pairs (:class:`~archer.algorithms.stats.Ratio`), summed over
micro-batches and ranks and read once per step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from archer.algorithms import (
    STAT_KEYS,
    AdvantageEstimator,
    Ratio,
    compute_advantages,
    kl_in_reward,
    masked_ratio,
    overlong_penalty,
    rollout_correction_weights,
    rollout_mismatch_stats,
    token_logprobs_and_entropy,
)
from archer.async_rollout import ProducedBatch, RolloutProducer, staleness
from archer.config import (
    AsyncRolloutConfig,
    DynamicSamplingConfig,
    KLRewardConfig,
    OptimConfig,
    OverlongConfig,
    RolloutCorrectionConfig,
    UpdateConfig,
)
from archer.data.shard import FILLER_KEY
from archer.data.stream import STREAM_INDEX_KEY
from archer.distributed import Collectives
from archer.experience import Experience, Samples, ScoredGroups, collect_groups
from archer.losses import ArcherLoss, PolicyLoss
from archer.metrics import PassAtK
from archer.micro_batches import lockstep, plan_update, split_rows
from archer.rewards import Reward, RewardRunner
from archer.rollout import HFEngine, RolloutEngine, SamplingConfig
from archer.rollout.batch import RolloutBatch, collate_rollout
from archer.seeding import derive_seed, rank_seed
from archer.shaping import AdvantageShaping

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FSDP2_HINT = (
    "use FSDP2: trainer.strategy: {class_path: lightning.pytorch.strategies.ModelParallelStrategy, "
    "init_args: {data_parallel_size: <number of GPUs>, tensor_parallel_size: 1}} (docs/scaling.md)"
)
"""What to use instead of Lightning's FSDP1 strategy, in the words of the error that refuses it."""


class ArcherModule(L.LightningModule):
    """Actor + frozen reference, trained with a verifiable reward by a clipped policy loss.

    Args:
        model_path: Local Hugging Face folder of the actor (and of the reference, its initial copy).
        loss: The policy loss (``ArcherLoss``, ``DAPOLoss``, ``GRPOLoss``, ``HighEntropyMaskLoss``, ``GSPOLoss``,
            ``CISPOLoss``, ``ClipCovLoss``, ``KLCovLoss`` or your own); None: ``ArcherLoss`` with the
            paper's defaults. (Not a class default: jsonargparse would carry a default instance's
            settings, e.g. its ``loss_agg``, into a loss that a config names.)
        reward: Scores a response against its dataset row. ``None``: the datamodule's synthetic task.
        rollout: The rollout engine (``HFEngine`` on CPU; ``VLLMEngine`` with ``WeightSyncCallback``).
        sampling: Training rollout sampling (``n`` is the group size).
        val_sampling: Validation sampling; ``n`` must be >= the largest of ``pass_k``. ``None``: ``sampling``.
        optim: AdamW and learning-rate schedule (its steps are RL steps).
        update: PPO epochs, mini- and micro-batch sizes.
        advantage: Advantage estimator: ``grpo`` (group mean/std), ``drgrpo`` (no std), ``rloo`` or
            ``reinforce_pp_baseline`` (group mean, batch std over all ranks).
        advantage_shaping: Applied in order after the advantages (perplexity / position shaping).
        overlong: DAPO overlong reward shaping; ``None`` disables it.
        dynamic_sampling: Drop groups whose rewards are all equal (optionally refilling); ``None`` keeps all.
        rollout_correction: Importance weights for the engine–trainer probability gap (on by default
            with vLLM, off with ``HFEngine``); logged either way as ``rollout/mismatch_kl`` etc.
        kl_in_reward: KL to the reference as a reward penalty (an alternative to a loss's KL term);
            ``None`` disables it.
        async_rollout: Roll out the next batches on a background thread while training (bounded
            staleness, off-policy correction); ``None``: rollout and update take turns.
        reward_timeout_s: A reward call that takes longer scores 0 and is counted.
        reward_workers: Worker processes that score rewards.
        pass_k: The k of the validation pass@k metrics.
        dtype: Parameter dtype of actor and reference (keep float32 master weights for small learning rates:
            a 1e-6 update is below bfloat16's resolution).
        fsdp_compute_dtype: Under ``ModelParallelStrategy`` (FSDP2): run forward/backward in this dtype
            (e.g. ``bfloat16``) while parameters and gradient reduction stay in float32.
        gradient_checkpointing: Recompute activations in the backward pass (saves memory at ~30% compute).
        attn_implementation: The actor's attention kernel (``sdpa``, ``eager``, ``flash_attention_2``,
            ``flex_attention``, ...); None: transformers' default. Varlen/flex kernels enable packing
            (``update.packing: auto``).
        token_view_samples: Responses kept from each step (with per-token entropy) for the token view.
    """

    def __init__(
        self,
        model_path: str,
        loss: PolicyLoss | None = None,
        reward: Reward | None = None,
        rollout: RolloutEngine = lazy_instance(HFEngine),
        sampling: SamplingConfig = SamplingConfig(),
        val_sampling: SamplingConfig | None = None,
        optim: OptimConfig = OptimConfig(),
        update: UpdateConfig = UpdateConfig(),
        advantage: AdvantageEstimator = "grpo",
        advantage_shaping: list[AdvantageShaping] | None = None,
        overlong: OverlongConfig | None = None,
        dynamic_sampling: DynamicSamplingConfig | None = None,
        rollout_correction: RolloutCorrectionConfig = RolloutCorrectionConfig(),
        kl_in_reward: KLRewardConfig | None = None,
        async_rollout: AsyncRolloutConfig | None = None,
        reward_timeout_s: float = 10.0,
        reward_workers: int = 2,
        pass_k: list[int] | None = None,
        dtype: str = "float32",
        fsdp_compute_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        token_view_samples: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "reward", "rollout", "advantage_shaping"])
        self.automatic_optimization = False
        for name, value in (("dtype", dtype), ("fsdp_compute_dtype", fsdp_compute_dtype)):
            if value is not None and value not in _DTYPES:
                raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {value!r}")
        if update.ppo_epochs < 1 or update.micro_batch_size < 1 or update.mini_batch_size < 0:
            raise ValueError(f"update needs ppo_epochs >= 1, micro_batch_size >= 1, mini_batch_size >= 0: {update}")
        self.model_path = model_path
        self.loss = loss if loss is not None else ArcherLoss()
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
        self.rollout_correction = rollout_correction
        self.kl_in_reward = kl_in_reward
        if kl_in_reward is not None and self.loss.needs_reference:
            raise ValueError(
                f"model.kl_in_reward replaces the loss's KL term, but {type(self.loss).__name__} has one too "
                "(set its KL coefficients to 0, e.g. knowledge_kl: 0.0 / kl_coef: 0.0): the KL would count twice"
            )
        self.async_rollout = async_rollout
        self._producer: RolloutProducer | None = None
        self._producer_rewards: RewardRunner | None = None
        """The producer thread's own reward workers (a runner serves one thread)."""
        self.reward_timeout_s = reward_timeout_s
        self.reward_workers = reward_workers
        self.pass_k = sorted(pass_k or [1])
        if self.val_sampling.n < self.pass_k[-1]:
            raise ValueError(f"val_sampling.n = {self.val_sampling.n} < largest pass_k = {self.pass_k[-1]}")
        self.dtype_name = dtype
        self.fsdp_compute_dtype = fsdp_compute_dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = attn_implementation
        self.packed = False
        """Micro-batches run packed (``update.packing``, decided when the actor is built)."""
        self._computed_tokens = Ratio.of(0, 0)
        """Real / computed token positions of the forward passes since the last reset (``perf/pad_fraction``)."""
        self.token_view_samples = token_view_samples
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.actor: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.reward_runner: RewardRunner | None = None
        self.collectives = Collectives()
        self.val_metrics = torch.nn.ModuleDict()
        self.last_rollout_samples: list[dict] = []
        self._rollout_ready = False
        self._base_seed: int | None = None
        self._counters = {"nonfinite_steps": 0, "empty_steps": 0}
        """Running totals, stored in checkpoints: optimizer steps skipped for a non-finite loss or
        gradient norm, and for a mini-batch without any token to learn from (every group dropped)."""
        self._nonfinite_in_a_row = 0
        """RL steps in a row with a skipped non-finite optimizer step."""

    # ----------------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        """Load actor (trainable) and reference (frozen, only if a KL term needs it).

        Called by Lightning before the strategy wraps the modules, so FSDP2 can shard both.
        """
        if self.actor is not None:
            return
        dtype = _DTYPES[self.dtype_name]
        kernel = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        self.actor = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype, **kernel)
        implementation = str(self.actor.config._attn_implementation)
        self.packed = self.update.packing == "on" or (
            self.update.packing == "auto" and ("flash_attention" in implementation or implementation == "flex_attention")
        )
        if self.gradient_checkpointing:
            self.actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.actor.config.use_cache = False
        if self.loss.needs_reference or self.kl_in_reward is not None:
            self.reference = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype, **kernel)
            self.reference.eval().requires_grad_(False)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            for model in (self.actor, self.reference):
                if model is not None:
                    _fully_shard_decoder(model, self.device_mesh["data_parallel"], self.fsdp_compute_dtype)

    def setup(self, stage: str) -> None:
        self._check_trainer()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.reward is None:
            task = getattr(datamodule, "task", None)
            if task is None:
                raise ValueError("model.reward is not set and the datamodule has no synthetic task to score with")
            self.reward = task
        check_sources = getattr(self.reward, "check_data_sources", None)  # RoutedReward: unknown sources fail now
        if check_sources is not None and datamodule is not None:
            items = [*datamodule.train_items, *(item for items in datamodule.val_items.values() for item in items)]
            check_sources({item["row"]["data_source"] for item in items})
        if self.reward_runner is None:
            self.reward_runner = RewardRunner(
                self.reward, timeout_s=self.reward_timeout_s, num_workers=self.reward_workers
            )
        if self.async_rollout is not None and self._producer_rewards is None and stage == "fit":
            self._check_async()
            # Forked here, before any thread runs (see RewardRunner).
            self._producer_rewards = RewardRunner(
                self.reward, timeout_s=self.reward_timeout_s, num_workers=self.reward_workers
            )
        names = list(getattr(datamodule, "val_dataset_names", []) or [])
        for name in names:
            if name not in self.val_metrics:
                self.val_metrics[name] = torch.nn.ModuleDict({f"pass@{k}": PassAtK(k) for k in self.pass_k})
        if self._base_seed is None:
            # After `seed_everything`, so a resumed run derives the same seeds (see _seed).
            self._base_seed = self.sampling.seed if self.sampling.seed is not None else torch.initial_seed()

    def _check_async(self) -> None:
        from archer.callbacks import WeightSyncCallback

        if not hasattr(self.rollout, "version"):
            raise ValueError(
                f"model.async_rollout needs an engine that serves while its weights are replaced and counts "
                f"weight versions (archer.rollout.RemoteVLLMEngine); {type(self.rollout).__name__} does not"
            )
        if not any(isinstance(callback, WeightSyncCallback) for callback in self.trainer.callbacks):
            raise ValueError("model.async_rollout needs archer.callbacks.WeightSyncCallback in trainer.callbacks "
                             "(the producer waits for the weight versions it brings)")

    def _check_trainer(self) -> None:
        """Refuse, with the fix in the message, the settings this module cannot train correctly with."""
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(f"Lightning's FSDPStrategy (FSDP1, `strategy: fsdp`) is not supported; {FSDP2_HINT}")
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"trainer.precision={self.trainer.precision!r} uses a gradient scaler, which the RL update does not "
                "drive; keep trainer.precision at 32-true and set model.fsdp_compute_dtype: bfloat16 (FSDP2)"
            )
        world = self.trainer.world_size
        if self.device_mesh is not None and self.device_mesh["data_parallel"].size() != world:
            # ModelParallelStrategy's defaults make the GPUs of a node one tensor-parallel group, which
            # Archer does not use: the gradients would then never be averaged across ranks.
            raise ValueError(
                f"ModelParallelStrategy has data_parallel_size = {self.device_mesh['data_parallel'].size()} of "
                f"{world} ranks; Archer shards data-parallel only: {FSDP2_HINT}"
            )
        mini = self.update.mini_batch_size
        if mini % world:
            raise ValueError(
                f"update.mini_batch_size = {mini} prompts (global) does not split evenly over {world} ranks; "
                f"use a multiple of {world}"
            )
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if batch_size is not None and mini > batch_size:
            raise ValueError(f"update.mini_batch_size = {mini} is larger than data.batch_size = {batch_size} prompts")

    def _seed(self, purpose: str, *indices: int) -> int:
        """The seed of one random draw of this rank: derived (by hashing) from the base seed, the
        draw's purpose and indices (step, draw, batch, ...), then made rank-specific.

        Independent of any global RNG state, so a run resumed from a checkpoint samples exactly
        what the uninterrupted run would have.
        """
        return rank_seed(derive_seed(self._base_seed, purpose, *indices), self.global_rank)

    def configure_callbacks(self) -> list[L.Callback]:
        # Lightning's exception path skips teardown: stop the producer thread there too.
        return [_StopProducerOnException()] if self.async_rollout is not None else []

    def stop_producer(self) -> None:
        """Stop the asynchronous rollout producer, if any (idempotent)."""
        if self._producer is not None:
            self._producer.stop()
            self._producer = None

    def teardown(self, stage: str) -> None:
        self.stop_producer()
        for runner in (self.reward_runner, self._producer_rewards):
            if runner is not None:
                runner.close()
        self.reward_runner = self._producer_rewards = None

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
        # trainer.max_steps counts RL steps, and so does the schedule (stepped once per training_step).
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor_fn(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor_fn(self, total: int | None):
        """Linear warmup to 1, then constant or cosine down to ``min_lr_ratio`` at ``total`` RL steps."""
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
        checkpoint["archer"] = {**self._counters, "nonfinite_in_a_row": self._nonfinite_in_a_row}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.reference is not None:
            state = checkpoint.setdefault("state_dict", {})
            state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
        saved = checkpoint.get("archer", {})
        self._counters = {key: saved.get(key, 0) for key in self._counters}
        self._nonfinite_in_a_row = saved.get("nonfinite_in_a_row", 0)

    # --------------------------------------------------------------------------------- rollout
    def _sample(self, rows: list[dict], sampling: SamplingConfig) -> Samples:
        """Roll out ``sampling.n`` completions for each prompt row (flattened, group-contiguous)."""
        self._ensure_rollout()
        prompts = [row["prompt_ids"] for row in rows]
        groups = self.rollout.generate(prompts, sampling)
        completions = [c for group in groups for c in group]
        return Samples(
            prompts=[p for p in prompts for _ in range(sampling.n)],
            completions=completions,
            rows=[row["row"] for row in rows for _ in range(sampling.n)],
            texts=self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True),
        )

    def _collect(self, rows: list[dict], step: int, *, background: bool = False) -> ScoredGroups:
        """The scored groups of ``rows`` for training step ``step`` (dynamic sampling included), with
        seeds derived per step and draw. ``background``: on the producer thread, with its own reward
        workers and no collectives (a refill decision is then this rank's own; generation on remote
        servers is not collective)."""
        runner = self._producer_rewards if background else self.reward_runner
        scored = collect_groups(
            rows,
            self.sampling.n,
            generate=lambda batch, draw: self._sample(batch, replace(self.sampling, seed=self._seed("train", step, draw))),
            score=lambda samples: runner.score(samples.texts, samples.rows),
            dynamic_sampling=self.dynamic_sampling,
            draw_batch=lambda: self.trainer.datamodule.draw_train_batch(),
            collectives=Collectives(local=True) if background else self.collectives,
        )
        rewards = scored.rewards
        if rewards.num_errors == len(rewards.scores) and rewards.errors and self.global_rank == 0:
            # Training on all-zero rewards teaches nothing; say loudly why (a wrong answer_key, a reward bug).
            log.warning("every reward of step %d failed; the first error:\n%s", step, rewards.errors[0])
        return scored

    def _take_produced(self, batch: list[dict]) -> tuple[ScoredGroups, dict[str, float]]:
        """This step's batch from the asynchronous producer (started at the first step, or after a resume),
        with samples staler than ``max_staleness`` dropped; and the staleness / idle-time metrics."""
        index = batch[0][STREAM_INDEX_KEY]
        if self._producer is None:
            self._ensure_rollout()
            offset = self.global_step - self.rollout.version  # the servers now serve this step's weights
            stream = self.trainer.datamodule.stream
            self._producer = RolloutProducer(
                lambda i, step: self._collect(stream.batch(i), step, background=True),
                served_step=lambda: self.rollout.version + offset,
                max_staleness=self.async_rollout.max_staleness,
            )
            self._version_offset = offset
            self._producer.start(index, self.global_step)
        produced, trainer_idle = self._producer.take(index)
        return self._drop_stale(produced), {"time/trainer_idle_s": trainer_idle,
                                            "time/producer_idle_s": produced.producer_idle_s}

    def _drop_stale(self, produced: ProducedBatch) -> ScoredGroups:
        """Mask out the groups with a sample staler than ``max_staleness``; record the samples' staleness."""
        scored, n = produced.scored, self.sampling.n
        lag = staleness(produced, self.global_step, self._version_offset)
        fresh = (lag <= self.async_rollout.max_staleness).view(-1, n).all(-1).repeat_interleave(n)
        self._staleness = Ratio.of(lag.sum(), len(lag)), float(lag.max()), int((~fresh).sum())
        scored.keep = scored.keep & fresh
        return scored

    # ------------------------------------------------------------------------------- log-probs
    def _logprobs(self, model: torch.nn.Module, mb: RolloutBatch, temperature: float, *, entropy_grad: bool = False):
        """Per-token log-probs (with grad) and entropies (detached unless ``entropy_grad``) ``[n, r]`` of
        the response tokens of ``mb``, zero where ``mb.response_mask`` is 0.

        The decoder runs on the padded rows, or — when ``self.packed`` — on the rows' real tokens
        concatenated into one sequence (position ids restart per sequence, so attention stays within
        each; no compute on padding). Only the hidden states of the valid response tokens go through
        the vocabulary projection, in chunks: the ``[B, T, V]`` logits never exist.
        """
        cells = mb.response_mask > 0
        if not cells.any():
            # Nothing to score (a placeholder): score one cell anyway, so that every parameter takes part
            # in the backward as on the other ranks (DDP reduces them all); the loss masks it out.
            cells = torch.zeros_like(cells)
            cells[0, 0] = True
        rows, cols = cells.nonzero(as_tuple=True)
        grid = rows * mb.input_ids.shape[1] + mb.prompt_len - 1 + cols  # the position that predicts each token
        if self.packed:
            real = mb.attention_mask.flatten() > 0
            hidden = _decoder_hidden(model, input_ids=mb.input_ids.flatten()[real][None],
                                     position_ids=mb.position_ids.flatten()[real][None])
            grid = (real.cumsum(0) - 1)[grid]
        else:
            hidden = _decoder_hidden(model, input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                     position_ids=mb.position_ids)
        self._computed_tokens += Ratio.of(mb.attention_mask.sum(), hidden.shape[0] * hidden.shape[1])
        head = model.get_output_embeddings()
        weight = head.weight
        if isinstance(weight, DTensor):
            # Only reached without gradients: the FSDP2 root keeps its parameters unsharded after its
            # forward, and full_tensor()'s backward would not sum the shards' gradients over ranks.
            if torch.is_grad_enabled():
                raise RuntimeError("the output head is still sharded after the forward; cannot take its gradient")
            weight = weight.full_tensor()
        logprob, entropy = token_logprobs_and_entropy(
            hidden.reshape(-1, hidden.shape[-1])[grid][None],
            weight,
            mb.response_ids[rows, cols][None],
            temperature=temperature,
            chunk_size=self.update.logprob_chunk_size,
            lm_head_bias=getattr(head, "bias", None),
            entropy_grad=entropy_grad,
        )
        shape = mb.response_mask.shape
        return (
            torch.zeros(shape, dtype=logprob.dtype, device=logprob.device).index_put((rows, cols), logprob[0]),
            torch.zeros(shape, dtype=entropy.dtype, device=entropy.device).index_put((rows, cols), entropy[0]),
        )

    def _micro_batch(self, rollout: RolloutBatch, rows: Tensor) -> RolloutBatch:
        """Rows of the (CPU) rollout as a micro-batch on the device, padded to its own longest sequence.

        No rows: a placeholder micro-batch (row 0, fully masked) for a rank that holds none of a
        mini-batch but must still run the forward/backward the other ranks run (plan docstring).
        """
        if len(rows) == 0:
            placeholder = rollout.select(torch.zeros(1, dtype=torch.long))
            placeholder.response_mask = torch.zeros_like(placeholder.response_mask)
            return placeholder.trimmed().to(self.device)
        return rollout.select(rows).trimmed().to(self.device)

    @torch.no_grad()
    def _logprobs_by_row(self, model: torch.nn.Module, rollout: RolloutBatch, micro_batches: list[Tensor]) -> Tensor:
        """No-grad log-probs ``[N, R]`` of every row of the rollout (zero for rows no micro-batch holds)."""
        rows = torch.cat(micro_batches)
        logprob = torch.zeros(rollout.num_sequences, rollout.response_ids.shape[1], device=self.device)
        logprob[rows] = self._logprobs_no_grad(model, rollout, micro_batches)[0]
        return logprob

    @torch.no_grad()
    def _logprobs_no_grad(
        self, model: torch.nn.Module, rollout: RolloutBatch, micro_batches: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Log-probs and entropies ``[rows, R]`` of the rows of ``micro_batches`` (concatenated), one
        forward per micro-batch (placeholders included), zero past each response."""
        rows = torch.cat(micro_batches)
        logprob = torch.zeros(len(rows), rollout.response_ids.shape[1], device=self.device)
        entropy = torch.zeros_like(logprob)
        start = 0
        for micro in micro_batches:
            lp, ent = self._logprobs(model, self._micro_batch(rollout, micro), self.sampling.temperature)
            part, r = slice(start, start + len(micro)), lp.shape[1]
            logprob[part, :r], entropy[part, :r] = lp[: len(micro)], ent[: len(micro)]
            start += len(micro)
        return logprob, entropy

    # ------------------------------------------------------------------------------------ step
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        _reset_peak_memory(self.device)
        t0 = time.perf_counter()
        self.actor.eval()  # rollout and old log-probs without dropout
        if self.async_rollout is None:
            scored, overlap = self._collect(batch, self.global_step), {}
        else:
            scored, overlap = self._take_produced(batch)
        t_rollout = time.perf_counter() - t0

        t1 = time.perf_counter()
        self._computed_tokens = Ratio.of(0, 0)
        exp = self._experience(scored)
        logprob_tokens = self._computed_tokens.num
        t_logprob = time.perf_counter() - t1

        t2 = time.perf_counter()
        self.actor.train()
        lr = self.lr_schedulers().get_last_lr()[0]
        plan = self._plan_update(exp.ranks)
        self._computed_tokens = Ratio.of(0, 0)
        update_stats, grad_norm_steps = self._update(exp, plan)
        update_tokens = self._computed_tokens
        self.lr_schedulers().step()  # once per RL step (verl's convention): warmup and cosine count RL steps
        t_update = time.perf_counter() - t2

        n, scores, keep = self.sampling.n, scored.scores, scored.keep
        mask = exp.rollout.response_mask.to(self.device).bool()
        ratios = {
            "train/reward_mean": Ratio.of(scores.sum(), len(scores)),
            "train/solve_rate": Ratio.of((scores.view(-1, n) >= 1.0).any(-1).sum(), len(scores) // n),
            "train/response_length_mean": Ratio.of(exp.response_lengths.sum(), len(scores)),
            "train/response_clip_ratio": Ratio.of(exp.rollout.truncated.sum(), len(scores)),
            "train/advantage_abs_mean": masked_ratio(exp.advantages.abs(), mask),
            "train/kept_groups_fraction": Ratio.of(keep.sum(), len(scores)),
            "reward/error_fraction": Ratio.of(scored.rewards.num_errors, len(scored.rewards.scores)),
            # Share of the token positions the update's forward passes computed that were padding.
            "perf/pad_fraction": Ratio(update_tokens.den - update_tokens.num, update_tokens.den),
            **{f"train/{key}": value for key, value in update_stats.items()},
            **{f"rollout/{key}": value for key, value in exp.mismatch.items()},
        }
        if self.async_rollout is not None:
            ratios["rollout/staleness_mean"] = self._staleness[0]
        totals = {  # summed over ranks; the phases' tokens/s divide them by this rank's (lockstep) time
            "reward/errors": scored.rewards.num_errors,
            "reward/timeouts": scored.rewards.num_timeouts,
            # Asynchronous: t_rollout is the trainer's wait, not generation (see time/producer_idle_s).
            **({} if overlap else {"perf/rollout_tokens_per_s": float(exp.response_lengths.sum()) / t_rollout}),
            "perf/logprob_tokens_per_s": float(logprob_tokens) / t_logprob,
            "perf/update_tokens_per_s": float(update_tokens.num) / t_update,
            "perf/tokens": float(exp.rollout.attention_mask.sum()),  # prompt + response tokens of the step
        }
        if self.dynamic_sampling is not None:
            totals["rollout/extra_batches"] = scored.extra_batches
        if self.async_rollout is not None:
            totals["rollout/stale_dropped"] = self._staleness[2]
        metrics = self._global_values(ratios, totals)
        if self.async_rollout is not None:
            metrics["rollout/staleness_max"] = float(self.collectives.max(torch.tensor(self._staleness[1])))
        metrics.update(
            {
                "train/lr": lr,
                "train/optimizer_steps": float(grad_norm_steps),
                "train/nonfinite_steps": float(self._counters["nonfinite_steps"]),
                "train/empty_steps": float(self._counters["empty_steps"]),
                "time/rollout_s": t_rollout,
                "time/logprob_s": t_logprob,
                "time/update_s": t_update,
                "perf/tokens_per_s": metrics.pop("perf/tokens") / (time.perf_counter() - t0),
                "rollout/batch_index": float(batch[0][STREAM_INDEX_KEY]),
                **overlap,
                "perf/peak_memory_gb": float(self.collectives.max(torch.tensor(_peak_memory_gb(self.device)))),
            }
        )
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, on_step=True, logger=False, batch_size=len(batch))
        self._keep_samples(exp.rollout, scores)
        self._check_nonfinite()

    def _experience(self, scored: ScoredGroups) -> Experience:
        """The update's inputs: padded rollout, old and reference log-probs, rewards → advantages, and
        the rollout-correction weights (with the engine–trainer mismatch statistics)."""
        n = self.sampling.n
        rollout = collate_rollout(scored.samples.prompts, scored.samples.completions, self.tokenizer.pad_token_id)
        response_lengths = rollout.response_lengths  # before dropped groups are masked out
        rollout.response_mask = rollout.response_mask * scored.keep[:, None].to(rollout.response_mask.dtype)
        mask = rollout.response_mask.to(self.device)
        ranks = self._rows_of_every_rank(rollout, scored.keep)
        passes = self._plan_forward(ranks, self.update.logprob_micro_batch_tokens or self.update.micro_batch_tokens)
        behaviour = self.async_rollout is not None and self.async_rollout.off_policy == "behaviour"
        if behaviour:  # the ratio's denominator is the engine's μ itself: nothing to recompute
            old_logprob = rollout.engine_logprobs.to(self.device) * mask
        else:
            old_logprob = self._logprobs_by_row(self.actor, rollout, passes)
        ref_logprob = None if self.reference is None else self._logprobs_by_row(self.reference, rollout, passes)

        rewards = scored.scores.to(self.device)
        if self.overlong is not None:
            rewards = rewards + overlong_penalty(
                response_lengths.to(self.device),
                max_len=self.sampling.max_new_tokens,
                buffer=self.overlong.buffer,
                penalty=self.overlong.penalty,
            )
        if self.kl_in_reward is not None:
            rewards = kl_in_reward(rewards, old_logprob, ref_logprob, mask, beta=self.kl_in_reward.beta,
                                   estimator=self.kl_in_reward.estimator)
        advantages = compute_advantages(rewards, n, estimator=self.advantage, sum_over_ranks=self.collectives.sum,
                                        valid=scored.keep.to(self.device))
        advantages = advantages[:, None].expand_as(mask).contiguous()  # [N, R]
        for shaping in self.advantage_shaping:
            advantages = shaping(advantages, old_logprob, mask, n)

        pg_weight, mismatch = None, {}
        if rollout.engine_logprobs is not None and not behaviour:
            correction = self.rollout_correction
            engine = rollout.engine_logprobs.to(self.device)
            options = dict(level=correction.level, mode=correction.mode, upper=correction.upper)
            weights = rollout_correction_weights(old_logprob, engine, mask, lower=correction.lower, **options)
            mismatch = rollout_mismatch_stats(old_logprob, engine, mask, weights, **options)
            mismatch["logprob_diff"] = masked_ratio((engine - old_logprob).abs(), mask.bool())
            apply = correction.apply == "always" or (
                correction.apply == "auto" and not getattr(self.rollout, "logprobs_match_trainer", False)
            )
            pg_weight = weights if apply else None
        return Experience(rollout, response_lengths, old_logprob, ref_logprob, advantages, pg_weight, mismatch, ranks)

    def _global_values(self, ratios: dict[str, Ratio], totals: dict[str, float]) -> dict[str, float]:
        """Ratios (numerators and denominators summed over ranks, then divided) and totals (summed
        over ranks), in one all-reduce and one host read. Ratios with nothing measured are left out."""
        # Every rank must reduce the same keys in the same order: sorted, and losses report a fixed key set.
        ratios, totals = dict(sorted(ratios.items())), dict(sorted(totals.items()))
        parts = [torch.stack([r.num.to(self.device), r.den.to(self.device)]) for r in ratios.values()]
        parts.append(torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device).view(-1, 1).expand(-1, 2))
        reduced = self.collectives.sum(torch.cat([p.reshape(-1, 2) for p in parts])).tolist()
        values = {key: num / den for key, (num, den) in zip(ratios, reduced) if den > 0}
        values.update({key: num for key, (num, _) in zip(totals, reduced[len(ratios):])})
        return values

    def _rows_of_every_rank(self, rollout: RolloutBatch, keep: Tensor) -> list[Tensor]:
        """Per rank ``q``, its ``[N, 3]`` (prompt length, response length, kept) rows: what the
        micro-batch planner needs to cut every rank's rows the same way on all of them (one all-gather).
        ``keep`` ``[N]``: this rank's rows that dynamic sampling kept."""
        prompt = rollout.attention_mask[:, : rollout.prompt_len].sum(-1)
        response = rollout.response_mask.sum(-1).long()  # 0 for the groups dynamic sampling dropped
        kept = keep.long()
        local = torch.stack([prompt, response, kept], -1).to(self.device)
        return list(self.collectives.cat(local.flatten()).view(self.trainer.world_size, -1, 3).cpu())

    def _plan_forward(self, ranks: list[Tensor], max_tokens: int) -> list[Tensor]:
        """This rank's micro-batches over its kept rows, for a no-grad pass (in lockstep with the other ranks)."""
        kept = [rows[:, 2].nonzero().flatten() for rows in ranks]
        per_rank = [
            split_rows(index, rows[index, :2], max_sequences=self.update.micro_batch_size, max_tokens=max_tokens,
                       packed=self.packed)
            for index, rows in zip(kept, ranks)
        ]
        return lockstep(per_rank, self.global_rank)

    def _plan_update(self, ranks: list[Tensor]) -> list[list[Tensor]]:
        """This rank's micro-batches for each optimizer step (:func:`archer.micro_batches.plan_update`);
        ``ranks`` from :meth:`_rows_of_every_rank`."""
        n = self.sampling.n
        # Global group j·W + r is rank r's local group j.
        informative = torch.stack([rows[::n, 2] > 0 for rows in ranks]).t().reshape(-1)
        seeds = [
            derive_seed(self._base_seed, "shuffle", self.global_step, epoch) if self.update.shuffle else None
            for epoch in range(self.update.ppo_epochs)
        ]
        return plan_update(
            informative, [rows[:, :2] for rows in ranks], rank=self.global_rank, group_size=n,
            groups_per_minibatch=self.update.mini_batch_size or len(informative), epoch_seeds=seeds,
            max_sequences=self.update.micro_batch_size, max_tokens=self.update.micro_batch_tokens, packed=self.packed,
        )

    def _update(self, exp: Experience, plan: list[list[Tensor]]):
        """One optimizer step per entry of ``plan`` (``ppo_epochs`` passes over the mini-batches).

        Returns the loss statistics summed over the steps taken (a :class:`Ratio` per key, plus
        ``grad_norm``) and the number of optimizer steps taken.
        """
        optimizer = self.optimizers()
        stats = _no_stats()
        taken = 0
        nonfinite = False
        for step, micro_batches in enumerate(plan):
            optimizer.zero_grad(set_to_none=True)
            step_stats = self._accumulate_gradients(exp, micro_batches, step)
            if step_stats is None:
                self._counters["empty_steps"] += 1
            elif step_stats["finite"]:
                stats = _add_stats(stats, step_stats["stats"])
                taken += 1
            else:
                nonfinite = True
                self._counters["nonfinite_steps"] += 1
            if step_stats is None or not step_stats["finite"]:
                optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
            # Lightning counts the RL step's last optimizer step as its one global step (module docstring).
            (optimizer.step if step == len(plan) - 1 else optimizer.optimizer.step)()
        optimizer.zero_grad(set_to_none=True)
        self._nonfinite_in_a_row = self._nonfinite_in_a_row + 1 if nonfinite else 0
        return stats, taken

    def _accumulate_gradients(self, exp: Experience, micro_batches: list[Tensor], step: int) -> dict | None:
        """Forward/backward over the micro-batches of optimizer step ``step``, then clip the gradient norm.

        Returns None when the mini-batch has no valid token on any rank (nothing to learn: skip the
        step), else ``{"finite": bool, "stats": {key: Ratio}}`` — ``finite`` is one verdict for all
        ranks (a rank that stepped alone would leave the replicas apart).
        """
        rollout = exp.rollout
        rows = torch.cat(micro_batches)  # this rank's rows of the mini-batch, micro-batch after micro-batch
        mask = rollout.response_mask[rows].to(self.device)
        if float(self.collectives.sum(mask.sum())) == 0:
            return None
        forward = {}
        if self.loss.needs_minibatch_forward:  # the current policy over the whole mini-batch, first
            logprob, entropy = self._logprobs_no_grad(self.actor, rollout, micro_batches)
            forward = {"logprob": logprob, "entropy": entropy, "old_logprob": exp.old_logprob[rows],
                       "advantages": exp.advantages[rows]}
        context = self.loss.minibatch_context(
            mask, self.collectives, seed=self._seed("minibatch", self.global_step, step), **forward
        )
        world = self.trainer.world_size
        stats = _no_stats()
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        start = 0
        for j, micro in enumerate(micro_batches):
            mb = self._micro_batch(rollout, micro)
            with self._gradient_sync(j == len(micro_batches) - 1):
                logprob, entropy = self._logprobs(
                    self.actor, mb, self.sampling.temperature, entropy_grad=self.loss.needs_entropy_grad
                )
                if len(micro) == 0:  # a placeholder: a forward/backward that contributes nothing
                    loss = 0.0 * logprob.sum()
                else:
                    positions, r = slice(start, start + len(micro)), mb.response_ids.shape[1]
                    if forward:  # type tokens with the entropies the context counted (keeping any gradient)
                        entropy = forward["entropy"][positions, :r] + (entropy - entropy.detach())
                    loss, loss_stats = self.loss(
                        logprob,
                        exp.old_logprob[micro, :r],
                        None if exp.ref_logprob is None else exp.ref_logprob[micro, :r],
                        exp.advantages[micro, :r],
                        entropy,
                        mb.response_mask,
                        norm_len=self.sampling.max_new_tokens,
                        pg_weight=None if exp.pg_weight is None else exp.pg_weight[micro, :r],
                        context=self.loss.micro_batch_context(context, positions),
                    )
                    stats = _add_stats(stats, loss_stats)
                    if step == 0 and start == 0:
                        self._first_entropy, self._first_entropy_rows = entropy.detach(), micro
                # DDP and FSDP2 average gradients over ranks; the loss is already a share of the global mean.
                self.manual_backward(loss * world)
            finite &= torch.isfinite(loss)
            start += len(micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), self.optim.max_grad_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        finite &= torch.isfinite(grad_norm)
        # The norm is global (the same on every rank): each rank adds 1/world of it and of one step.
        stats["grad_norm"] = Ratio.of(grad_norm / world, 1.0 / world)
        return {"finite": bool(self.collectives.min(finite.to(torch.float32)) > 0), "stats": stats}

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Let the backward all-reduce (DDP) / reduce-scatter (FSDP2) gradients only when ``enabled``
        (the last micro-batch of an optimizer step); earlier micro-batches accumulate locally."""
        if enabled or self.trainer.world_size == 1:
            yield
        elif self.device_mesh is not None:  # FSDP2: unsharded gradients accumulate until the last micro-batch
            self.actor.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.actor.set_requires_gradient_sync(True)
        else:
            with self.trainer.strategy.block_backward_sync():  # DDP's no_sync
                yield

    def _check_nonfinite(self) -> None:
        limit = self.update.max_nonfinite_steps
        if self._nonfinite_in_a_row >= limit:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} RL steps in a row had an optimizer step with a non-finite loss or "
                f"gradient norm (update.max_nonfinite_steps = {limit}); stopping. Those steps were skipped: the "
                "weights and the last checkpoint are from before them."
            )

    def _keep_samples(self, rollout: RolloutBatch, scores: Tensor) -> None:
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
        # A fixed seed per batch: successive validations of the same policy agree.
        sampling = replace(self.val_sampling, seed=self._seed("val", dataloader_idx, batch_idx))
        samples = self._sample(batch, sampling)
        scores = torch.tensor(self.reward_runner.score(samples.texts, samples.rows).scores)
        correct = (scores >= 1.0).view(len(batch), self.val_sampling.n)
        # Fillers only keep ranks in step (every rank runs as many batches); they are not prompts of the set.
        counted = torch.tensor([not item.get(FILLER_KEY, False) for item in batch])
        for metric in self.val_metrics[names[dataloader_idx]].values():
            metric.update(correct[counted])

    def on_validation_epoch_end(self) -> None:
        for name, metrics in self.val_metrics.items():
            for key, metric in metrics.items():
                if metric.update_called:  # compute() syncs the sums over ranks: the same value on all of them
                    self.log(f"val/{name}/{key}", metric.compute(), add_dataloader_idx=False, sync_dist=True)
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


class _StopProducerOnException(L.Callback):
    """Stops the asynchronous rollout producer when training ends with an exception."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        pl_module.stop_producer()


def _no_stats() -> dict[str, Ratio]:
    """The statistics of an update that measured nothing yet: every key a loss reports (``STAT_KEYS``)
    and ``grad_norm``, at 0 / 0. Starting from the full key set keeps it the same on every rank, also
    on a rank whose micro-batches of a step were all placeholders (its loss never ran)."""
    return {key: Ratio.of(0.0, 0.0) for key in (*STAT_KEYS, "grad_norm")}


def _add_stats(total: dict[str, Ratio], part: dict[str, Ratio]) -> dict[str, Ratio]:
    return {key: total.get(key, Ratio.of(0.0, 0.0)) + part.get(key, Ratio.of(0.0, 0.0)) for key in total.keys() | part.keys()}


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: GPU memory allocated since the step began, or (CPU) the process's peak
    resident set since it started (Linux reports it in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _decoder_hidden(model: torch.nn.Module, **inputs: Tensor) -> Tensor:
    """The decoder's last hidden states ``[B, T, H]`` (after its final norm), through the model's own
    forward, so FSDP2's root hooks run, but without keeping every layer's output
    (``output_hidden_states``) or projecting to the vocabulary (``logits_to_keep=1``)."""
    captured: list[Tensor] = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return captured[0]


def _chunks(total: int, size: int) -> list[slice]:
    size = max(1, size)
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]
