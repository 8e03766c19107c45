"""The actor: the policy model, how reference log-probs are obtained, and the two verbs of an RL step.

verl's split (``DataParallelPPOActor``): the trainer sequences rollout → reward → advantage → actor,
and the actor owns the model and two verbs:

- :meth:`Actor.logprobs` — per-token log-probs and entropies of a rollout's responses under the
  policy (or the frozen reference), without gradient, over a micro-batch plan;
- :meth:`Actor.update` — one RL step's optimizer steps: ``ppo_epochs`` passes over the batch in
  global mini-batches (:func:`archer.micro_batches.plan_update`), each a gradient accumulation over
  micro-batches with the gradient synchronised across ranks only on the last one, then clipping and
  the skipped-step rules; it returns the step's statistics.

**Exact accumulation.** Each micro-batch's loss divides by the unit count of its whole mini-batch on
all ranks (``PolicyLoss.minibatch_context``; for some losses it also needs a no-grad forward over
the mini-batch), times the world size because DDP and FSDP2 average gradients over ranks. So the
update is the same for every micro-batch size and number of ranks, for every loss and aggregation
(two exceptions: Clip-Cov's random token choice, drawn per rank, and batch-scope perplexity
shaping, a per-rank statistic).

**Skipped optimizer steps.** A step whose loss or gradient norm is non-finite on any rank, or whose
mini-batch has no token to learn from on any rank (every group dropped by dynamic sampling), sets
the gradients to None, which AdamW skips (no momentum, no weight decay). The step still counts in
the plan, so skips never shift the RL step count, the checkpoint or validation cadence, or the
learning-rate schedule.

Nothing here imports Lightning: the strategy's specifics come in as small objects — a
:class:`~archer.distributed.Collectives`, a :class:`~archer.distributed.GradientSync` and the
``backward`` function — so the component runs and is tested on one process.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from archer.algorithms import STAT_KEYS, Ratio, token_logprobs_and_entropy
from archer.config import UpdateConfig
from archer.distributed import Collectives, GradientSync
from archer.experience import Experience
from archer.lora import adapters_disabled, has_adapters
from archer.losses import PolicyLoss
from archer.micro_batches import informative_global_groups, plan_update
from archer.rollout.batch import RolloutBatch
from archer.seeding import Seeds, derive_seed

__all__ = ["Actor", "UpdateResult", "add_stats", "no_stats", "response_logprobs"]


@dataclass
class UpdateResult:
    """What one RL step's update did."""

    stats: dict[str, Ratio]
    """The loss statistics summed over the optimizer steps taken (``STAT_KEYS`` and ``grad_norm``)."""
    steps_taken: int
    """Optimizer steps that moved the weights."""
    empty_steps: int
    """Optimizer steps skipped: their mini-batch had no token to learn from on any rank."""
    nonfinite_steps: int
    """Optimizer steps skipped: a non-finite loss or gradient norm on some rank."""
    computed_tokens: Ratio
    """Real / computed token positions of the update's forward passes (``perf/pad_fraction``)."""
    first_entropy: tuple[Tensor, Tensor] | None
    """The per-token entropies ``[B, R]`` of the first micro-batch this rank computed in the step, and
    its rows ``[B]`` (the token view's samples); None when this rank computed no row."""
    old_logprob: Tensor | None
    """``[N, R]`` π_old taken from the update's own forward (detached), when the experience left it to
    the update (an on-policy step, :func:`archer.experience.old_logprob_pass_reason`); else None."""


class Actor:
    """The policy model (and the frozen reference) with the log-prob and update verbs.

    Args:
        model: The policy, a Hugging Face causal LM (possibly FSDP2-sharded).
        reference: The frozen reference model; ``model`` itself for a LoRA actor whose reference is its
            base model (its adapters switched off for the reference passes); None when nothing needs
            reference log-probs.
        loss: The policy loss of the update.
        update: Epochs, mini- and micro-batch sizes, token budgets.
        group_size: ``n``, samples per prompt (a rollout's groups are ``n`` consecutive rows).
        temperature: The sampling temperature (log-probs and entropies are of ``logits / τ``).
        max_new_tokens: The longest response (the ``norm_len`` of the losses' length normalisations).
        max_grad_norm: The global gradient-norm clip.
        packed: Run micro-batches packed (``UpdateConfig.packing``).
        device: Where the forward passes run.
        collectives: Sums, maxima and gathers over the data-parallel ranks.
        gradient_sync: Pauses the backward's gradient reduction (DDP ``no_sync``, FSDP2).
        backward: ``loss ↦ loss.backward()`` as the strategy wants it (Lightning's ``manual_backward``).
        rank: This rank's index among ``collectives.world_size`` ranks.
    """

    def __init__(
        self, model: nn.Module, reference: nn.Module | None, loss: PolicyLoss, *, update: UpdateConfig,
        group_size: int, temperature: float, max_new_tokens: int, max_grad_norm: float, packed: bool, device: torch.device,
        collectives: Collectives, gradient_sync: GradientSync, backward: Callable[[Tensor], None] | None = None,
        rank: int = 0,
    ) -> None:
        if reference is model and not has_adapters(model):
            raise ValueError("the actor is its own reference only with LoRA adapters to switch off; this one has none")
        self.model = model
        self.reference = reference
        self.loss = loss
        self.config = update
        self.group_size = group_size
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.max_grad_norm = max_grad_norm
        self.packed = packed
        self.device = device
        self.collectives = collectives
        self.gradient_sync = gradient_sync
        self.backward = backward or Tensor.backward
        self.rank = rank
        self._computed_tokens = Ratio.of(0, 0)
        self.forward_passes: Counter[str] = Counter()
        """Forward passes run per model (``actor``, ``reference``), rollouts excluded; the caller resets it."""

    @property
    def world_size(self) -> int:
        return self.collectives.world_size

    def pop_computed_tokens(self) -> Ratio:
        """Real / computed token positions of the forward passes since the last call."""
        counted, self._computed_tokens = self._computed_tokens, Ratio.of(0, 0)
        return counted

    # ------------------------------------------------------------------------------- log-probs
    def _forward(self, model: nn.Module, mb: RolloutBatch, *, entropy_grad: bool = False,
                 reference: bool = False) -> tuple[Tensor, Tensor]:
        self.forward_passes["reference" if reference else "actor"] += 1
        logprob, entropy, computed = response_logprobs(
            model, mb, self.temperature, packed=self.packed, chunk_size=self.config.logprob_chunk_size,
            entropy_grad=entropy_grad,
        )
        self._computed_tokens += computed
        return logprob, entropy

    @torch.no_grad()
    def logprobs(self, rollout: RolloutBatch, micro_batches: list[Tensor], *, reference: bool = False,
                 by_row: bool = True) -> tuple[Tensor, Tensor]:
        """No-grad log-probs and entropies of the policy (or the ``reference``), one forward per
        micro-batch of ``micro_batches`` (local row indices; empty ones are placeholders that keep the
        ranks in lockstep), zero past each response.

        ``by_row``: ``[N, R]`` indexed like the rollout's rows (zero for rows no micro-batch holds);
        else ``[rows, R]`` for the micro-batches' rows, concatenated in order.
        """
        model = self.reference if reference else self.model
        # A LoRA actor is its own reference: its base model, adapters off.
        base = adapters_disabled(self.model) if reference and self.reference is self.model else contextlib.nullcontext()
        rows = torch.cat(micro_batches)
        logprob = torch.zeros(len(rows), rollout.response_ids.shape[1], device=self.device)
        entropy = torch.zeros_like(logprob)
        start = 0
        with base:
            for micro in micro_batches:
                lp, ent = self._forward(model, self._micro_batch(rollout, micro), reference=reference)
                part, r = slice(start, start + len(micro)), lp.shape[1]
                logprob[part, :r], entropy[part, :r] = lp[: len(micro)], ent[: len(micro)]
                start += len(micro)
        if not by_row:
            return logprob, entropy
        full = torch.zeros(rollout.num_sequences, rollout.response_ids.shape[1], device=self.device)
        full_entropy = torch.zeros_like(full)
        full[rows], full_entropy[rows] = logprob, entropy
        return full, full_entropy

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

    # ---------------------------------------------------------------------------------- update
    def update(self, exp: Experience, optimizer: torch.optim.Optimizer, *, seeds: Seeds, step: int,
               last_step: Callable[[], object] | None = None) -> UpdateResult:
        """One RL step's optimizer steps over ``exp`` (module docstring).

        Args:
            exp: The step's experience.
            optimizer: Stepped once per planned optimizer step (AdamW skips parameters without a gradient).
            seeds: This run's seeds (the epochs' shuffles are the same on every rank; the mini-batch
                contexts' draws are per rank).
            step: The RL step (``global_step``), which the seeds are derived from.
            last_step: Steps the optimizer for the plan's last step instead of ``optimizer.step``
                (Lightning's wrapper counts it as the RL step's one global step).
        """
        plan = self.plan(exp, seeds, step)
        if exp.old_logprob is None and (len(plan) != 1 or self.loss.needs_minibatch_forward):
            raise RuntimeError(
                f"the experience left π_old to the update, but the update is {len(plan)} optimizer steps"
                + (" with a mini-batch pre-pass" if self.loss.needs_minibatch_forward else "")
                + ": π_old must come from a separate pass (archer.experience.old_logprob_pass_reason)"
            )
        self.pop_computed_tokens()
        stats, taken, empty, nonfinite = no_stats(), 0, 0, 0
        first_entropy = None
        # π_old left to the update (one optimizer step): each row's detached log-probs, as computed.
        captured = None if exp.old_logprob is not None else torch.zeros_like(exp.advantages)
        for k, micro_batches in enumerate(plan):
            optimizer.zero_grad(set_to_none=True)
            outcome = self._accumulate_gradients(exp, micro_batches, seed=seeds("minibatch", step, k), captured=captured)
            if outcome is None:
                empty += 1
            elif outcome["finite"]:
                stats = add_stats(stats, outcome["stats"])
                taken += 1
            else:
                nonfinite += 1
            if outcome is None or not outcome["finite"]:
                optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
            if first_entropy is None and outcome is not None:
                first_entropy = outcome["first_entropy"]
            (last_step if last_step is not None and k == len(plan) - 1 else optimizer.step)()
        optimizer.zero_grad(set_to_none=True)
        return UpdateResult(stats, taken, empty, nonfinite, self.pop_computed_tokens(), first_entropy, captured)

    def plan(self, exp: Experience, seeds: Seeds, step: int) -> list[list[Tensor]]:
        """This rank's micro-batches for each optimizer step of the RL step (:func:`plan_update`)."""
        seeds_per_epoch = [
            derive_seed(seeds.base, "shuffle", step, epoch) if self.config.shuffle else None
            for epoch in range(self.config.ppo_epochs)
        ]
        informative = informative_global_groups(exp.ranks, self.group_size)
        return plan_update(
            informative, [rows[:, :2] for rows in exp.ranks], rank=self.rank, group_size=self.group_size,
            groups_per_minibatch=self.config.mini_batch_size or len(informative), epoch_seeds=seeds_per_epoch,
            max_sequences=self.config.micro_batch_size, max_tokens=self.config.micro_batch_tokens, packed=self.packed,
        )

    def _accumulate_gradients(self, exp: Experience, micro_batches: list[Tensor], *, seed: int,
                              captured: Tensor | None = None) -> dict | None:
        """Forward/backward over the micro-batches of one optimizer step, then clip the gradient norm.

        Without ``exp.old_logprob`` (on-policy), π_old is the forward's own detached log-probs (the
        ratio is exactly 1, its gradient that of the policy gradient), written into ``captured``.

        Returns None when the mini-batch has no valid token on any rank (nothing to learn: skip the
        step), else ``{"finite": bool, "stats": {key: Ratio}, "first_entropy": ...}`` — ``finite`` is
        one verdict for all ranks (a rank that stepped alone would leave the replicas apart).
        """
        rollout, loss_fn = exp.rollout, self.loss
        rows = torch.cat(micro_batches)  # this rank's rows of the mini-batch, micro-batch after micro-batch
        mask = rollout.response_mask[rows].to(self.device)
        if float(self.collectives.sum(mask.sum())) == 0:
            return None
        forward = {}
        if loss_fn.needs_minibatch_forward:  # the current policy over the whole mini-batch, first
            logprob, entropy = self.logprobs(rollout, micro_batches, by_row=False)
            forward = {"logprob": logprob, "entropy": entropy, "old_logprob": exp.old_logprob[rows],
                       "advantages": exp.advantages[rows]}
        context = loss_fn.minibatch_context(mask, self.collectives, seed=seed, **forward)
        world = self.world_size
        stats = no_stats()
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        first_entropy = None
        start = 0
        for j, micro in enumerate(micro_batches):
            mb = self._micro_batch(rollout, micro)
            with self.gradient_sync.enabled(j == len(micro_batches) - 1):
                logprob, entropy = self._forward(self.model, mb, entropy_grad=loss_fn.needs_entropy_grad)
                if len(micro) == 0:  # a placeholder: a forward/backward that contributes nothing
                    loss = 0.0 * logprob.sum()
                else:
                    positions, r = slice(start, start + len(micro)), mb.response_ids.shape[1]
                    if forward:  # type tokens with the entropies the context counted (keeping any gradient)
                        entropy = forward["entropy"][positions, :r] + (entropy - entropy.detach())
                    if captured is None:
                        old_logprob = exp.old_logprob[micro, :r]
                    else:
                        old_logprob = captured[micro, :r] = logprob.detach()
                    loss, loss_stats = loss_fn(
                        logprob,
                        old_logprob,
                        None if exp.ref_logprob is None else exp.ref_logprob[micro, :r],
                        exp.advantages[micro, :r],
                        entropy,
                        mb.response_mask,
                        norm_len=self.max_new_tokens,
                        pg_weight=None if exp.pg_weight is None else exp.pg_weight[micro, :r],
                        context=loss_fn.micro_batch_context(context, positions),
                    )
                    stats = add_stats(stats, loss_stats)
                    if first_entropy is None:
                        first_entropy = (entropy.detach(), micro)
                # DDP and FSDP2 average gradients over ranks; the loss is already a share of the global mean.
                self.backward(loss * world)
            finite &= torch.isfinite(loss)
            start += len(micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        finite &= torch.isfinite(grad_norm)
        # The norm is global (the same on every rank): each rank adds 1/world of it and of one step.
        stats["grad_norm"] = Ratio.of(grad_norm / world, 1.0 / world)
        return {"finite": bool(self.collectives.min(finite.to(torch.float32)) > 0), "stats": stats,
                "first_entropy": first_entropy}


def response_logprobs(
    model: nn.Module, mb: RolloutBatch, temperature: float, *, packed: bool = False, chunk_size: int = 1024,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor, Ratio]:
    """Per-token log-probs (with grad) and entropies (detached unless ``entropy_grad``) ``[n, r]`` of
    the response tokens of ``mb``, zero where ``mb.response_mask`` is 0, and the real / computed token
    positions of the forward.

    The decoder runs on the padded rows, or — when ``packed`` — on the rows' real tokens concatenated
    into one sequence (position ids restart per sequence, so attention stays within each; no compute
    on padding). Only the hidden states of the valid response tokens go through the vocabulary
    projection, in chunks of ``chunk_size`` rows: the ``[B, T, V]`` logits never exist.
    """
    cells = mb.response_mask > 0
    if not cells.any():
        # Nothing to score (a placeholder): score one cell anyway, so that every parameter takes part
        # in the backward as on the other ranks (DDP reduces them all); the loss masks it out.
        cells = torch.zeros_like(cells)
        cells[0, 0] = True
    rows, cols = cells.nonzero(as_tuple=True)
    grid = rows * mb.input_ids.shape[1] + mb.prompt_len - 1 + cols  # the position that predicts each token
    if packed:
        real = mb.attention_mask.flatten() > 0
        hidden = _decoder_hidden(model, input_ids=mb.input_ids.flatten()[real][None],
                                 position_ids=mb.position_ids.flatten()[real][None])
        grid = (real.cumsum(0) - 1)[grid]
    else:
        hidden = _decoder_hidden(model, input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                 position_ids=mb.position_ids)
    computed = Ratio.of(mb.attention_mask.sum(), hidden.shape[0] * hidden.shape[1])
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
        chunk_size=chunk_size,
        lm_head_bias=getattr(head, "bias", None),
        entropy_grad=entropy_grad,
    )
    shape = mb.response_mask.shape
    return (
        torch.zeros(shape, dtype=logprob.dtype, device=logprob.device).index_put((rows, cols), logprob[0]),
        torch.zeros(shape, dtype=entropy.dtype, device=entropy.device).index_put((rows, cols), entropy[0]),
        computed,
    )


def _decoder_hidden(model: nn.Module, **inputs: Tensor) -> Tensor:
    """The decoder's last hidden states ``[B, T, H]`` (after its final norm), through the model's own
    forward, so FSDP2's root hooks run, but without keeping every layer's output
    (``output_hidden_states``) or projecting any position to the vocabulary (``logits_to_keep`` an
    empty index tensor: transformers' convention for the positions to keep, here none).

    Not ``logits_to_keep=1``: that projects each row's last position, a strided ``[B, 1, H]`` slice,
    and PyTorch's CPU bfloat16 matmul without grad is ~85× slower on a strided input (2 s instead of
    24 ms at a 151,936-token vocabulary): 83% of the realistic-shape log-prob phase was that unused
    projection (benchmarks/RESULTS.md)."""
    captured: list[Tensor] = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
    no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    try:
        model(**inputs, logits_to_keep=no_position, use_cache=False)
    finally:
        hook.remove()
    return captured[0]


def no_stats() -> dict[str, Ratio]:
    """The statistics of an update that measured nothing yet: every key a loss reports (``STAT_KEYS``)
    and ``grad_norm``, at 0 / 0. Starting from the full key set keeps it the same on every rank, also
    on a rank whose micro-batches of a step were all placeholders (its loss never ran)."""
    return {key: Ratio.of(0.0, 0.0) for key in (*STAT_KEYS, "grad_norm")}


def add_stats(total: dict[str, Ratio], part: dict[str, Ratio]) -> dict[str, Ratio]:
    return {key: total.get(key, Ratio.of(0.0, 0.0)) + part.get(key, Ratio.of(0.0, 0.0)) for key in total.keys() | part.keys()}
