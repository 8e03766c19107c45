"""Typed groups of training settings. jsonargparse reads the attribute docstrings as CLI help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then a constant or cosine learning rate (the paper: 1e-6, 10 warmup steps)."""

    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 10
    """RL steps (training steps) of linear warmup from 0 to ``lr``; the schedule steps once per RL step, as verl's."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate shape after warmup; cosine decays to ``min_lr_ratio * lr`` at ``trainer.max_steps`` (RL steps)."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a fraction of ``lr``."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip; a non-finite norm skips the optimizer step."""
    fused: bool = True
    """AdamW's fused kernel (``torch.optim.AdamW(fused=True)``: one kernel over all tensors, CPU and
    GPU), instead of PyTorch's default on CPU, a Python loop over the tensors: 4.9× faster on CPU at
    Qwen2.5-0.5B widths (benchmarks/RESULTS.md). The weights agree with the loop's to rounding
    (~1e-7), not bit for bit."""


@dataclass
class UpdateConfig:
    """How one rollout batch becomes optimizer steps (PPO-style epochs over mini-batches)."""

    ppo_epochs: int = 1
    """Passes over the rollout batch (the official recipe: 3)."""
    mini_batch_size: int = 0
    """Prompts (global, across ranks) per optimizer step; 0 = the whole rollout batch (one step per RL step).
    Must be a multiple of the number of data-parallel ranks."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank (gradient accumulation inside a mini-batch), when
    ``micro_batch_tokens`` is 0; also the sequences per forward of the no-grad log-prob passes then."""
    micro_batch_tokens: int = 0
    """Token budget of one update micro-batch on one rank; 0 cuts micro-batches by ``micro_batch_size``.
    Above 0, rows are grouped by length (longest first) so that each micro-batch's computed tokens —
    rows × its own longest sequence, or the sum of lengths when packed — stay within it; a longer row
    goes alone. The update is the same either way (exact accumulation)."""
    logprob_micro_batch_tokens: int = 0
    """The token budget of the no-grad old/reference log-prob passes (no activations kept, so it can be
    larger); 0 uses ``micro_batch_tokens``."""
    packing: Literal["auto", "on", "off"] = "auto"
    """Run a micro-batch's sequences concatenated, without padding (position ids restart per sequence).
    ``auto``: on when the actor's attention implementation is a varlen or flex kernel
    (``flash_attention_2``/``_3``, ``flex_attention``), whose cost stays per sequence; off for ``sdpa``
    and ``eager`` (the CPU), where the block-diagonal mask makes attention quadratic in the packed length."""
    shuffle: bool = False
    """Visit the groups in a new seeded order each epoch (the same on every rank; the official recipe does not)."""
    logprob_chunk_size: int = 1024
    """Rows of the vocabulary projection computed at once; bounds the logits' memory."""
    max_nonfinite_steps: int = 5
    """RL steps in a row with a skipped (non-finite loss or gradient norm) optimizer step before the run stops."""


@dataclass
class OverlongConfig:
    """DAPO's overlong reward shaping: a linear penalty in the last ``buffer`` tokens before the max length."""

    buffer: int = 16
    """Tokens before ``sampling.max_new_tokens`` where the penalty starts."""
    penalty: float = 1.0
    """Penalty at the max length (subtracted from the reward)."""


@dataclass
class DynamicSamplingConfig:
    """Drop groups whose rewards are all equal (they carry zero advantage), as DAPO and Archer do."""

    refill: bool = True
    """DAPO: roll out further prompt batches until the batch is full again. Archer's recipe: False (drop only)."""
    max_extra_batches: int = 3
    """Cap on extra prompt batches rolled out per step when refilling."""


@dataclass
class RolloutCorrectionConfig:
    """Importance weights for the gap between the rollout engine's and the trainer's probabilities
    (:func:`archer.algorithms.rollout_correction.rollout_correction_weights`; TIS / MIS)."""

    apply: Literal["auto", "always", "never"] = "auto"
    """``auto``: on when the engine's log-probs are not the trainer's own (vLLM), off for ``HFEngine``
    (which samples with the actor itself, so the weights would be 1)."""
    level: Literal["token", "sequence", "geometric"] = "token"
    """Ratio per token, per response (product), or per response (geometric mean)."""
    mode: Literal["truncate", "mask"] = "truncate"
    """``truncate``: w = min(ρ, upper) (TIS); ``mask``: w = ρ inside [lower, upper], else 0 (MIS / IcePop)."""
    upper: float = 2.0
    """Truncation cap / upper mask bound (verl and slime: 2.0)."""
    lower: float | None = None
    """Lower mask bound; None = 1 / upper."""

    def applied(self, engine_matches_trainer: bool) -> bool:
        """Whether the weights multiply the loss, with an engine whose log-probs are (``HFEngine``) or
        are not (vLLM) the trainer's own."""
        return self.apply == "always" or (self.apply == "auto" and not engine_matches_trainer)


@dataclass
class KLRewardConfig:
    """KL to the reference as a reward penalty: r_i − β·Σ_t k(ℓ^old_t, ℓ^ref_t), before the advantages."""

    beta: float = 0.001
    """β, the penalty per unit of summed per-token KL."""
    estimator: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    """Per-token KL estimator (see :mod:`archer.algorithms.kl`)."""


@dataclass
class AsyncRolloutConfig:
    """Asynchronous rollouts (:mod:`archer.async_rollout`): a producer thread keeps rolling out and
    scoring the next batches while the trainer trains. Needs an engine that serves while its weights
    are replaced (``RemoteVLLMEngine``) and ``WeightSyncCallback``."""

    max_staleness: int = 1
    """K: a sample may have been sampled by the weights of at most K steps before the step that trains
    on it (0: on-policy, no overlap; 1: one-step off-policy). Staler samples are dropped and counted."""
    off_policy: Literal["decoupled", "behaviour"] = "decoupled"
    """``decoupled`` (AReaL): the ratio is against π_prox, the trainer's policy at the start of the step
    (recomputed), and ``model.rollout_correction`` weights each token by π_prox / μ (μ: the engine's
    log-probs). ``behaviour``: the ratio is against μ itself (no recomputation, one forward less); the
    clip then bounds the change from the policy that sampled."""


@dataclass
class LoraConfig:
    """LoRA adapters on the actor (:mod:`archer.lora`, through ``peft``): each targeted linear layer
    ``y = x·Wᵀ`` becomes ``y = x·(W + s·B·A)ᵀ`` with ``A`` ``[r, in]``, ``B`` ``[out, r]`` and the scale
    ``s = alpha / r`` (``alpha / √r`` with ``rslora``); only ``A`` and ``B`` are trained. ``B`` starts at
    zero, so the adapted actor starts as the base model."""

    r: int = 16
    """The adapters' rank."""
    alpha: float = 32.0
    """The scale's numerator: ``s = alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapters' input (the update's forward only: rollouts and log-prob passes run in eval mode)."""
    target_modules: list[str] | str = "all-linear"
    """The linear layers that get adapters: module names (``[q_proj, k_proj, v_proj, o_proj]``) or
    ``all-linear`` (every linear layer of the decoder; never the output head)."""
    init: Literal["default", "gaussian"] = "default"
    """``A``'s initialisation (``B`` is zero either way): Kaiming-uniform (peft's default) or Gaussian
    with standard deviation 1/r. Initialisations that change the base weights (PiSSA, OLoRA, LoftQ) are
    not offered: the reference would no longer be the base model."""
    rslora: bool = False
    """Rank-stabilised LoRA: ``s = alpha / √r``."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules of the decoder trained in full beside the adapters (peft's ``modules_to_save``: a trained
    copy next to the frozen original), e.g. ``[model.norm]``, the final norm. Their copies are
    checkpointed and served with the adapters, and switched off for the reference. Not the embeddings
    or the output head."""
    reference: Literal["adapters_off", "copy"] = "adapters_off"
    """Where reference log-probs come from, when a KL term needs them: the actor itself with its
    adapters switched off (the base model; no second copy of the weights), or a separate frozen copy
    loaded from ``model_path`` (full fine-tuning's way; for comparisons)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora needs r >= 1, alpha > 0 and 0 <= dropout < 1, got r={self.r}, "
                             f"alpha={self.alpha}, dropout={self.dropout}")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: name the linear layers that get adapters, or all-linear")
        for key, value, allowed in (("init", self.init, ("default", "gaussian")),
                                    ("reference", self.reference, ("adapters_off", "copy"))):
            if value not in allowed:
                raise ValueError(f"model.lora.{key} must be one of {list(allowed)}, got {value!r}")


@dataclass
class WatchdogConfig:
    """Deadlines for every phase of a run and a heartbeat in the log (:mod:`archer.watchdog`). A phase
    that runs past its deadline — a hung collective, server, reward worker, NCCL transfer or disk —
    ends the run: every thread's stack is written to the log, then one line naming the phase, the
    step, the rank and what it waited on, and the process exits with code 124. ``0`` switches a
    deadline off. The defaults leave hours to a step of a 16k-token run; set them to a few times
    your steps' longest phases (``time/*_s`` in the metrics) to hear of a hang sooner."""

    heartbeat_s: float = 60.0
    """Seconds between two heartbeat lines in the log (rank, step, phase, seconds in it); 0: none."""
    stall_s: float = 600.0
    """In-process generation (``VLLMEngine``, ``HFEngine``) that made no progress (no engine step,
    no token) for this long ends the run, whatever the phase's deadline."""
    rollout_s: float = 7200.0
    """Sampling and scoring one step's batch (asynchronous: waiting for the producer); the first
    step's includes starting the engine (loading vLLM, launching servers)."""
    reward_s: float = 3600.0
    """Scoring one batch (each call is also bounded by ``model.reward_timeout_s``)."""
    logprob_s: float = 3600.0
    """The no-grad old / reference log-prob passes of one step."""
    update_s: float = 7200.0
    """The optimizer steps of one RL step."""
    weight_sync_s: float = 1800.0
    """Pushing the weights to the engine (``WeightSyncCallback``); bounds the NCCL transfer, which
    has no timeout of its own."""
    checkpoint_s: float = 1800.0
    """Writing one checkpoint (a file, or FSDP2's folder on every rank)."""
    validation_s: float = 3600.0
    """One validation batch (sampling and scoring)."""
    idle_s: float = 3600.0
    """The trainer's own work between two phases (loading a batch, logging, Lightning's collectives)."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value >= 0:
                raise ValueError(f"model.watchdog.{name} must be >= 0 seconds (0: off), got {value}")


@dataclass
class WeightCheckConfig:
    """Never train on samples of stale weights (:mod:`archer.weight_check`): each sample's weight
    version against the one the trainer expects, and after every sync a canary comparing the
    engine's log-probs of the step's samples with the trainer's."""

    on_stale: Literal["auto", "error", "drop"] = "auto"
    """A sample sampled by other weights than expected (synchronous: not the last sync's version;
    asynchronous: more than ``max_staleness`` versions old): ``error`` stops the run naming the
    engine; ``drop`` masks its group out of the loss and counts it (``rollout/stale_dropped``).
    ``auto``: ``error`` when synchronous (a missed sync), ``drop`` when asynchronous (a server lagging)."""
    canary: bool = True
    """Check the gap between the engine's and the trainer's log-probs of each step's samples
    (``rollout/canary_gap``)."""
    max_gap: float | None = None
    """The largest canary gap accepted (token mean of |μ − π_old|); None: by dtype, 0.01 when
    engine and trainer both run float32, else 0.1."""
    jump_factor: float = 10.0
    """A gap above ``jump_factor`` × the median of the previous steps' gaps is an error too, unless it
    is below ``max_gap / jump_factor`` (rounding noise)."""
    window: int = 20
    """Steps of gaps the median is taken over (it needs 3 before a jump can count)."""

    def __post_init__(self) -> None:
        if self.on_stale not in ("auto", "error", "drop"):
            raise ValueError(f"model.weight_check.on_stale must be auto, error or drop, got {self.on_stale!r}")
        if (self.max_gap is not None and not self.max_gap > 0) or not self.jump_factor > 1 or self.window < 3:
            raise ValueError(f"model.weight_check needs max_gap > 0, jump_factor > 1 and window >= 3: {self}")
