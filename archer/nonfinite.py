"""Non-finite updates: the skipped-step counters and their stop rule, and finite parameters.

Two ways an update can go non-finite, two rules:

* a micro-batch loss or the gradient norm is not finite: the actor skips that optimizer step
  (:mod:`archer.actor`); :func:`count_skipped` keeps the running totals (``train/nonfinite_steps``,
  ``train/empty_steps``, stored in checkpoints) and the RL steps in a row with such a skip, and
  :func:`check_nonfinite_steps` stops the run after ``update.max_nonfinite_steps`` of them;
* the optimizer step itself writes an inf or a NaN into the weights (finite gradients, an update too
  large for the dtype): :func:`check_finite_parameters` stops the run in the same step, before those
  weights are checkpointed or synced to the engine.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from archer.distributed import Collectives

__all__ = ["check_finite_parameters", "check_nonfinite_steps", "count_skipped", "nonfinite_parameters"]


def count_skipped(counters: dict[str, int], empty: int, nonfinite: int) -> None:
    """Add one RL step's skipped optimizer steps to ``counters`` (``empty_steps``, ``nonfinite_steps``,
    ``nonfinite_in_a_row``: RL steps in a row with a non-finite skip)."""
    counters["empty_steps"] += empty
    counters["nonfinite_steps"] += nonfinite
    counters["nonfinite_in_a_row"] = counters["nonfinite_in_a_row"] + 1 if nonfinite else 0


def check_nonfinite_steps(counters: dict[str, int], limit: int) -> None:
    """``FloatingPointError`` after ``limit`` RL steps in a row with a skipped non-finite optimizer step."""
    in_a_row = counters["nonfinite_in_a_row"]
    if in_a_row >= limit:
        raise FloatingPointError(
            f"{in_a_row} RL steps in a row had an optimizer step with a non-finite loss or "
            f"gradient norm (update.max_nonfinite_steps = {limit}); stopping. Those steps were skipped: the "
            "weights and the last checkpoint are from before them."
        )


def nonfinite_parameters(model: nn.Module, collectives: Collectives) -> tuple[int, list[str]]:
    """The number of trainable parameters holding an inf or a NaN, over all ranks (each rank checks
    its FSDP2 shards), and the names of this rank's (every rank must call it)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        return 0, []
    local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for _, p in named]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).cpu()
    names = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
    return int(collectives.sum(torch.tensor(float(len(names))))), names


def check_finite_parameters(actor: nn.Module, collectives: Collectives, step: int) -> None:
    """``FloatingPointError`` (on every rank) when the update left an inf or a NaN in a trainable
    parameter of ``actor``: before the weights are checkpointed or pushed to the engine."""
    count, names = nonfinite_parameters(actor, collectives)
    if count:
        shown = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        raise FloatingPointError(
            f"step {step}: the optimizer step left an inf or a NaN in {count} parameters{shown}; they are neither "
            "checkpointed nor synced to the engine, and the last checkpoint is from before this step. A learning "
            "rate too large (optim.lr), or an overflow in a 16-bit dtype?")
