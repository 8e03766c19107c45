"""ArcherModule: the RL loop in Lightning's hooks — one RL step = rollout → experience → update.

The module wires components and sequences them; it holds no math (``docs/architecture.md``)::

    prompts ─ GroupSampler (engine → n completions, rewards, dynamic sampling) ──▶ ScoredGroups
            │   or AsyncSampler (the same on a producer thread, ahead of the trainer)
            ├ ExperienceMaker (π_old / reference log-probs through the actor, advantages,
            │   shaping, rollout correction) ──▶ Experience
            ├ Actor.update (ppo_epochs × mini-batches × micro-batches: loss, backward,
            │   one gradient sync per optimizer step, clip, AdamW; skipped-step rules)
            └ step_metrics (every key of the step, reduced over ranks) ──▶ the logger

**One unit of progress: the RL step.** ``trainer.max_steps``, ``global_step``, the checkpoint
interval (``every_n_train_steps``), the validation interval (``val_check_interval``, in train
batches) and the LR schedule (warmup, cosine) all count RL steps (``training_step`` calls), as in
verl, where the scheduler steps once per actor update. Each RL step runs ``ppo_epochs`` × mini-batches
optimizer steps; the last goes through Lightning's optimizer wrapper, which counts one global step,
the others through the torch optimizer directly (:meth:`archer.actor.Actor.update`).
"""

from __future__ import annotations

import time
from dataclasses import replace

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, AutoTokenizer

from archer.actor import Actor
from archer.algorithms import AdvantageEstimator
from archer.async_rollout import AsyncSampler
from archer.checkpoint_io import guard_checkpoints
from archer.config import (
    AsyncRolloutConfig,
    DynamicSamplingConfig,
    KLRewardConfig,
    LoraConfig,
    OptimConfig,
    OverlongConfig,
    RolloutCorrectionConfig,
    UpdateConfig,
    WatchdogConfig,
    WeightCheckConfig,
)
from archer.data.shard import FILLER_KEY
from archer.data.stream import STREAM_INDEX_KEY
from archer.distributed import Collectives, DDPGradientSync, FSDP2GradientSync, GradientSync
from archer.checkpoint_state import ModelPathState
from archer.experience import ExperienceMaker, has_dropout, old_logprob_pass_reason
from archer.lora import MergedWeights
from archer.losses import ArcherLoss, PolicyLoss
from archer.metrics import PassAtK
from archer.models import DTYPES, load_actor_and_reference, runs_packed
from archer.nonfinite import check_finite_parameters, check_nonfinite_steps, count_skipped
from archer.optim import build_optimizer, use_fused
from archer.preemption import CheckpointOnSigterm
from archer.rewards import Reward, RewardRunner
from archer.rewards.failures import check_failed_reward_steps, failed_reward_steps
from archer.rollout import HFEngine, RolloutEngine, SamplingConfig
from archer.rollout_view import notify_rollout_end
from archer.sampling import GroupSampler
from archer.seeding import Seeds
from archer.shaping import AdvantageShaping
from archer.step_logging import StepLog
from archer.step_metrics import StepTimes, reset_peak_memory, step_metrics
from archer.token_view import pick_samples
from archer.watchdog import Watchdog
from archer.weight_check import WeightCheck

__all__ = ["FSDP2_HINT", "ArcherModule"]

FSDP2_HINT = (
    "use FSDP2: trainer.strategy: {class_path: lightning.pytorch.strategies.ModelParallelStrategy, "
    "init_args: {data_parallel_size: <number of GPUs>, tensor_parallel_size: 1}} (docs/scaling.md)"
)
"""What to use instead of Lightning's FSDP1 strategy, in the words of the error that refuses it."""


class ArcherModule(ModelPathState, L.LightningModule):
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
        max_failed_reward_steps: Stop (``RewardsFailedError``) after this many RL steps in a row in which
            every reward call failed (raised, returned a non-number or timed out): a broken reward, or rows
            without what it reads. 0 never stops.
        pass_k: The k of the validation pass@k metrics.
        dtype: Parameter dtype of actor and reference (keep float32 master weights for small learning rates:
            a 1e-6 update is below bfloat16's resolution).
        fsdp_compute_dtype: Under ``ModelParallelStrategy`` (FSDP2): run forward/backward in this dtype
            (e.g. ``bfloat16``) while parameters and gradient reduction stay in float32.
        gradient_checkpointing: Recompute activations in the backward pass (saves memory at ~30% compute).
        lora: Train LoRA adapters on the frozen actor instead of all its weights (``docs/lora.md``); the
            reference is then the actor with its adapters off (``lora.reference``). None: full fine-tuning.
        attn_implementation: The actor's attention kernel (``sdpa``, ``eager``, ``flash_attention_2``,
            ``flex_attention``, ...); None: transformers' default. Varlen/flex kernels enable packing
            (``update.packing: auto``).
        token_view_samples: Responses kept from each step (with per-token entropy) for the token view.
        watchdog: Deadlines of each phase of a step, and a heartbeat in the log (``docs/reliability.md``);
            None: no deadline.
        weight_check: The checks that the engine samples with the trainer's weights: sample versions and the
            log-prob canary (``docs/reliability.md``).
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
        max_failed_reward_steps: int = 3,
        pass_k: list[int] | None = None,
        dtype: str = "float32",
        fsdp_compute_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraConfig | None = None,
        attn_implementation: str | None = None,
        token_view_samples: int = 8,
        watchdog: WatchdogConfig | None = WatchdogConfig(),
        weight_check: WeightCheckConfig = WeightCheckConfig(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "reward", "rollout", "advantage_shaping"])
        self.automatic_optimization = False
        self.model_path = model_path
        self.loss = loss if loss is not None else ArcherLoss()
        self.reward, self.rollout, self.sampling = reward, rollout, sampling
        self.val_sampling = val_sampling or sampling
        self.optim, self.update = optim, update
        self.advantage, self.advantage_shaping = advantage, advantage_shaping or []
        self.overlong, self.dynamic_sampling = overlong, dynamic_sampling
        self.rollout_correction, self.kl_in_reward, self.async_rollout = rollout_correction, kl_in_reward, async_rollout
        self.reward_timeout_s, self.reward_workers = reward_timeout_s, reward_workers
        self.max_failed_reward_steps = max_failed_reward_steps
        self.pass_k = sorted(pass_k or [1])
        self.dtype_name, self.fsdp_compute_dtype = dtype, fsdp_compute_dtype
        _check_settings(self)
        self.gradient_checkpointing, self.attn_implementation = gradient_checkpointing, attn_implementation
        self.lora = lora
        self.token_view_samples = token_view_samples
        self.watchdog, self.weight_check = Watchdog(watchdog), weight_check
        self._weight_check: WeightCheck | None = None
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.actor: torch.nn.Module | None = None
        """The policy model (its trainable parameters are what is trained and checkpointed; its weights,
        LoRA adapters merged, are what engines load)."""
        self.reference: torch.nn.Module | None = None
        self.policy: Actor | None = None
        """The actor component over ``actor`` and ``reference``: log-probs and the update (:mod:`archer.actor`)."""
        self.experience: ExperienceMaker | None = None
        self.reward_runner: RewardRunner | None = None
        self.collectives = Collectives()
        self.val_metrics = torch.nn.ModuleDict()
        self.last_rollout_samples: list[dict] = []
        self._engine_ready = False
        self._sampler: GroupSampler | None = None
        self._async: AsyncSampler | None = None
        self._seeds: Seeds | None = None
        self._step_log = StepLog()
        self._counters = {"nonfinite_steps": 0, "empty_steps": 0, "nonfinite_in_a_row": 0,
                          "failed_rewards_in_a_row": 0}
        """Running totals, stored in checkpoints: optimizer steps skipped for a non-finite loss or gradient
        norm, and for a mini-batch without any token to learn from (every group dropped); RL steps in a
        row with a skipped non-finite optimizer step, and with every reward call failed."""

    # ----------------------------------------------------------------------------------- setup
    @property
    def needs_reference(self) -> bool:
        """Whether a KL term needs reference log-probs."""
        return self.loss.needs_reference or self.kl_in_reward is not None

    def configure_model(self) -> None:
        """Load actor (trainable, or frozen with LoRA adapters) and reference (frozen, only if a KL term
        needs it and it is not the LoRA actor with its adapters off).

        Called by Lightning before the strategy wraps the modules, so FSDP2 can shard both.
        """
        if self.actor is not None:
            return
        self.actor, self.reference = load_actor_and_reference(
            self.model_path, self.dtype_name, lora=self.lora, needs_reference=self.needs_reference,
            attn_implementation=self.attn_implementation, gradient_checkpointing=self.gradient_checkpointing,
            mesh=None if self.device_mesh is None else self.device_mesh["data_parallel"],
            compute_dtype=self.fsdp_compute_dtype,
        )
        self._frozen_actor_keys = {f"actor.{name}" for name, param in self.actor.named_parameters(remove_duplicate=False)
                                   if not param.requires_grad}

    def setup(self, stage: str) -> None:
        _check_trainer(self)
        if self._seeds is None:
            # After `seed_everything`, so a resumed run derives the same seeds.
            base = self.sampling.seed if self.sampling.seed is not None else torch.initial_seed()
            self._seeds = Seeds(base, self.global_rank)
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
            self.reward_runner = RewardRunner(self.reward, timeout_s=self.reward_timeout_s, num_workers=self.reward_workers)
        if self.async_rollout is not None and self._async is None and stage == "fit":
            _check_async(self)
            # The producer's own reward workers, forked here, before any thread runs (see RewardRunner).
            rewards = RewardRunner(self.reward, timeout_s=self.reward_timeout_s, num_workers=self.reward_workers)
            self._async = AsyncSampler(self._group_sampler(rewards, Collectives(local=True)), self.rollout,
                                       lambda index: self.trainer.datamodule.stream.batch(index), self.async_rollout)
        for name in getattr(datamodule, "val_dataset_names", []) or []:
            if name not in self.val_metrics:
                self.val_metrics[name] = torch.nn.ModuleDict({f"pass@{k}": PassAtK(k) for k in self.pass_k})
        guard_checkpoints(self.trainer.strategy, self.watchdog)  # timed, FSDP2 folders atomic, checked at resume
        self.watchdog.start(self.global_rank, lambda: self.global_step, self.trainer.world_size)  # after the forks

    def _group_sampler(self, rewards: RewardRunner, collectives: Collectives) -> GroupSampler:
        return GroupSampler(
            self.rollout, self.tokenizer, rewards, self.sampling, dynamic_sampling=self.dynamic_sampling,
            draw_batch=lambda: self.trainer.datamodule.draw_train_batch(), collectives=collectives,
            seeds=self._seeds,
        )

    def on_fit_start(self) -> None:
        """Build the actor component and the experience maker over the (wrapped, placed) models."""
        if self.trainer.world_size == 1:
            sync = GradientSync()
        elif self.device_mesh is not None:
            sync = FSDP2GradientSync(self.actor)
        else:
            sync = DDPGradientSync(self.trainer.strategy.block_backward_sync)
        # A LoRA actor without a separate reference is its own: the Actor switches its adapters off.
        base_is_reference = self.needs_reference and self.reference is None and self.lora is not None
        self.policy = Actor(
            self.actor, self.actor if base_is_reference else self.reference, self.loss, update=self.update,
            group_size=self.sampling.n,
            temperature=self.sampling.temperature, max_new_tokens=self.sampling.max_new_tokens,
            max_grad_norm=self.optim.max_grad_norm, packed=runs_packed(self.actor, self.update.packing),
            device=self.device, collectives=self.collectives, gradient_sync=sync, backward=self.manual_backward,
            rank=self.global_rank,
        )
        behaviour = self.async_rollout is not None and self.async_rollout.off_policy == "behaviour"
        matches = getattr(self.rollout, "logprobs_match_trainer", False)
        reason = old_logprob_pass_reason(
            self.update, batch_size=getattr(self.trainer.datamodule, "batch_size", None), loss=self.loss,
            advantage_shaping=self.advantage_shaping, kl_in_reward=self.kl_in_reward is not None,
            asynchronous=self.async_rollout is not None, correction_applied=self.rollout_correction.applied(matches),
            dropout=has_dropout(self.actor),
        )
        rank_zero_info("π_old: " + ("the update's own forward (an on-policy step: one PPO epoch, one mini-batch; "
                                    "docs/scaling.md)" if reason is None else f"a separate no-grad pass ({reason})"))
        self.experience = ExperienceMaker(
            self.policy, pad_token_id=self.tokenizer.pad_token_id, max_new_tokens=self.sampling.max_new_tokens,
            advantage=self.advantage, advantage_shaping=self.advantage_shaping, overlong=self.overlong,
            kl_in_reward=self.kl_in_reward, rollout_correction=self.rollout_correction,
            engine_matches_trainer=matches, behaviour_ratio=behaviour, old_logprob_from_update=reason is None,
        )
        self._weight_check = WeightCheck(
            self.weight_check, self.rollout, asynchronous=self.async_rollout is not None, collectives=self.collectives,
            trainer_dtype=self.fsdp_compute_dtype or self.dtype_name,
            checkpoint_dtype=str(AutoConfig.from_pretrained(self.model_path).dtype or "float32"),  # as saved, not loaded
            truncated_sampling=self.sampling.top_p < 1 or self.sampling.top_k > 0,
        )

    def configure_callbacks(self) -> list[L.Callback]:
        # Lightning's exception path skips teardown: stop the threads there too. A preempted step
        # exits before the module's on_train_batch_end, which writes the step's row: write it first.
        return [_StopThreadsOnException(), CheckpointOnSigterm(before_exit=lambda: self._step_log.write(self.trainer, last=True))]

    def stop_threads(self) -> None:
        """Stop the watchdog and the asynchronous rollout producer, if any (idempotent)."""
        self.watchdog.stop()
        if self._async is not None:
            self._async.stop()

    def teardown(self, stage: str) -> None:
        self.stop_threads()
        for runner in (self.reward_runner, self._async and self._async.sampler.rewards):
            if runner is not None:
                runner.close()
        self.reward_runner, self._async, self._sampler = None, None, None
        close = getattr(self.rollout, "close", None)  # engines holding processes or memory release them
        if close is not None and self._engine_ready:
            close()
            self._engine_ready = False

    def configure_optimizers(self):
        # trainer.max_steps counts RL steps, and so does the schedule (stepped once per training_step).
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        optimizer, scheduler = build_optimizer(self.actor.parameters(), self.optim, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        use_fused(self.optimizers().optimizer, self.optim.fused)  # after a resumed run's optimizer state is loaded

    # ------------------------------------------------------------------------ checkpoint hooks
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["archer"] = dict(self._counters)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("archer", {})
        self._counters = {key: saved.get(key, 0) for key in self._counters}

    # ------------------------------------------------------------------------------------ step
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        reset_peak_memory(self.device)
        self._step_log.discard()
        self.policy.forward_passes.clear()
        step, t0 = self.global_step, time.perf_counter()
        self.actor.eval()  # rollout and old log-probs without dropout
        with self.watchdog.phase("rollout", getattr(self.rollout, "endpoint", None)):
            if self._async is None:  # 1. sample n completions per prompt and score them
                scored, stale = self._rollouts().collect(batch, step), None
            else:
                self._rollouts()  # the engine is set up on the training thread
                scored, stale = self._async.collect(batch[0][STREAM_INDEX_KEY], step)
        versions = self._weight_check.versions(scored, step, self.sampling.n, stale.dropped if stale else 0)
        t1 = time.perf_counter()
        with self.watchdog.phase("old log-probs"):  # 2. old / reference log-probs, advantages, correction
            exp = self.experience.make(scored)
        logprob_tokens = float(self.policy.pop_computed_tokens().num)
        t2 = time.perf_counter()
        self.actor.train()  # 3. ppo_epochs × mini-batches of optimizer steps
        lr = self.lr_schedulers().get_last_lr()[0]
        optimizer = self.optimizers()
        with self.watchdog.phase("update"):
            result = self.policy.update(exp, optimizer.optimizer, seeds=self._seeds, step=step, last_step=optimizer.step)
            self.lr_schedulers().step()  # once per RL step (verl's convention): warmup and cosine count RL steps
            self.experience.complete(exp, result.old_logprob)  # on-policy: π_old came from the update's forward
            check_finite_parameters(self.actor, self.collectives, step)  # before it is checkpointed or synced
        t3 = time.perf_counter()
        count_skipped(self._counters, result.empty_steps, result.nonfinite_steps)  # 4. the skipped-step rules
        self._counters["failed_rewards_in_a_row"] = failed_reward_steps(
            self._counters["failed_rewards_in_a_row"], scored.rewards, self.collectives)
        metrics = step_metrics(  # 5. every metric of the step, reduced over ranks
            scored, exp, result, StepTimes(t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t0, logprob_tokens),
            group_size=self.sampling.n, lr=lr, counters=self._counters, batch_index=batch[0][STREAM_INDEX_KEY],
            dynamic_sampling=self.dynamic_sampling is not None, stale=stale, forward_passes=self.policy.forward_passes,
            collectives=self.collectives, device=self.device, versions=versions,
        )
        self._step_log.add(self.trainer, metrics)  # not self.log_dict: ~0.35 ms a key (archer/step_logging.py)
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, on_step=True, logger=False, batch_size=len(batch))
        self._keep_samples(exp, scored.scores, result.first_entropy)  # 6. the token view's samples
        notify_rollout_end(self, scored, exp, step)  # 7. callbacks' on_rollout_end (archer/rollout_view.py)
        self._weight_check.canary(metrics.get("rollout/canary_gap"), step)
        check_nonfinite_steps(self._counters, self.update.max_nonfinite_steps)
        check_failed_reward_steps(self._counters["failed_rewards_in_a_row"], self.max_failed_reward_steps,
                                  scored.rewards, self.reward_timeout_s)

    def log_step_metric(self, name: str, value: float) -> None:
        """Add ``name: value`` to this RL step's row of metrics (from a callback's ``on_train_batch_end``;
        written once with the step's other metrics at the step's end, archer/step_logging.py)."""
        self._step_log.add(self.trainer, {name: value})

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._step_log.write(self.trainer)  # after every callback's on_train_batch_end: one row per step

    def _rollouts(self) -> GroupSampler:
        """The training thread's sampler, built (and the engine bound to the actor) at first use."""
        if not self._engine_ready:
            # An engine with its own copy of the weights loads a LoRA actor's merged weights.
            merged = self.lora is not None and not isinstance(self.rollout, HFEngine)
            self.rollout.setup(MergedWeights(self.actor) if merged else self.actor, self.tokenizer, self.model_path)
            self._engine_ready = True
        if self._sampler is None:
            self._sampler = self._group_sampler(self.reward_runner, self.collectives)
        return self._sampler

    def _keep_samples(self, exp, scores: torch.Tensor, first_entropy) -> None:
        """Keep a few responses of this step with their per-token entropy (training forward) for the token view."""
        if self.token_view_samples <= 0:
            return
        if first_entropy is None:  # this rank computed no row this step: nothing of this step to show
            self.last_rollout_samples = []
            return
        entropy, rows = first_entropy
        self.last_rollout_samples = pick_samples(exp.rollout, scores, entropy, rows, self.tokenizer,
                                                 group_size=self.sampling.n, count=self.token_view_samples,
                                                 step=int(self.global_step))

    # ------------------------------------------------------------------------------ validation
    def validation_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        names = list(self.val_metrics.keys())
        if not names:
            return
        self.actor.eval()
        # A fixed seed per batch: successive validations of the same policy agree.
        sampling = replace(self.val_sampling, seed=self._seeds("val", dataloader_idx, batch_idx))
        with self.watchdog.phase("validation", getattr(self.rollout, "endpoint", None)):
            samples = self._rollouts().sample(batch, sampling)
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


class _StopThreadsOnException(L.Callback):
    """Stops the watchdog and the asynchronous rollout producer when training ends with an exception."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        pl_module.stop_threads()


def _check_settings(module: ArcherModule) -> None:
    """Refuse, with the fix in the message, settings that contradict each other (before any model loads)."""
    for name, value in (("dtype", module.dtype_name), ("fsdp_compute_dtype", module.fsdp_compute_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"model.{name} must be one of {sorted(DTYPES)}, got {value!r}")
    update = module.update
    if update.ppo_epochs < 1 or update.micro_batch_size < 1 or update.mini_batch_size < 0:
        raise ValueError(f"update needs ppo_epochs >= 1, micro_batch_size >= 1, mini_batch_size >= 0: {update}")
    if module.kl_in_reward is not None and module.loss.needs_reference:
        raise ValueError(
            f"model.kl_in_reward replaces the loss's KL term, but {type(module.loss).__name__} has one too "
            "(set its KL coefficients to 0, e.g. knowledge_kl: 0.0 / kl_coef: 0.0): the KL would count twice"
        )
    sampling = module.dynamic_sampling
    if module.async_rollout is not None and sampling is not None and sampling.refill:
        raise ValueError(
            "model.async_rollout with model.dynamic_sampling.refill: true is not supported: the producer would "
            "draw refill prompts ahead of the trainer, and a resumed run would draw different ones; use "
            "dynamic_sampling: {refill: false} (drop only, Archer's recipe)"
        )
    if module.val_sampling.n < module.pass_k[-1]:
        raise ValueError(f"val_sampling.n = {module.val_sampling.n} < largest pass_k = {module.pass_k[-1]}")


def _check_trainer(module: ArcherModule) -> None:
    """Refuse, with the fix in the message, the settings the module cannot train correctly with."""
    trainer = module.trainer
    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(f"Lightning's FSDPStrategy (FSDP1, `strategy: fsdp`) is not supported; {FSDP2_HINT}")
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"trainer.precision={trainer.precision!r} uses a gradient scaler, which the RL update does not "
            "drive; keep trainer.precision at 32-true and set model.fsdp_compute_dtype: bfloat16 (FSDP2)"
        )
    world, mesh = trainer.world_size, module.device_mesh
    if mesh is not None and mesh["data_parallel"].size() != world:
        # ModelParallelStrategy's defaults make the GPUs of a node one tensor-parallel group, which
        # Archer does not use: the gradients would then never be averaged across ranks.
        raise ValueError(
            f"ModelParallelStrategy has data_parallel_size = {mesh['data_parallel'].size()} of "
            f"{world} ranks; Archer shards data-parallel only: {FSDP2_HINT}"
        )
    mini = module.update.mini_batch_size
    if mini % world:
        raise ValueError(
            f"update.mini_batch_size = {mini} prompts (global) does not split evenly over {world} ranks; "
            f"use a multiple of {world}"
        )
    batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if batch_size is not None and mini > batch_size:
        raise ValueError(f"update.mini_batch_size = {mini} is larger than data.batch_size = {batch_size} prompts")


def _check_async(module: ArcherModule) -> None:
    from archer.callbacks import WeightSyncCallback

    if not getattr(module.rollout, "serves_during_sync", False):  # VLLMEngine counts versions, but is one engine
        raise ValueError(                                            # the trainer's thread reloads in place
            f"model.async_rollout needs an engine that serves while its weights are replaced and counts "
            f"weight versions (archer.rollout.RemoteVLLMEngine); {type(module.rollout).__name__} does not"
        )
    if not any(isinstance(callback, WeightSyncCallback) for callback in module.trainer.callbacks):
        raise ValueError("model.async_rollout needs archer.callbacks.WeightSyncCallback in trainer.callbacks "
                         "(the producer waits for the weight versions it brings)")
