"""What callbacks see of each RL step's rollout: the ``on_rollout_end`` hook.

After every training step, :class:`~archer.module.ArcherModule` calls

    callback.on_rollout_end(trainer, pl_module, rollout)

on each callback of the trainer that defines the method, with a :class:`RolloutView` of the step:
the prompts and completions as text, their rewards and advantages, and the dataset rows. It is
this rank's share of the step (each rank rolls out its own prompts); a callback that writes files
writes on rank 0 (``@rank_zero_only``). The view is built only when some callback asks for it, so
a run without such a callback decodes nothing more. ``archer.callbacks.CompletionLogger`` is the
shipped user: a sample table every N steps, to the loggers and a JSONL file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L

    from archer.experience import Experience
    from archer.sampling import ScoredGroups

__all__ = ["RolloutView", "notify_rollout_end", "rollout_view"]

HOOK = "on_rollout_end"


@dataclass(frozen=True)
class RolloutView:
    """One RL step's rollout on this rank, as text: ``N = prompts × group_size`` samples, group-contiguous
    (``group_size`` consecutive samples share a prompt)."""

    step: int
    """The RL step (``trainer.global_step`` when it began) these samples train."""
    group_size: int
    """Completions per prompt (``model.sampling.n``)."""
    prompts: list[str]
    """``[N]`` the prompt each sample answered, as the model saw it (chat template included)."""
    completions: list[str]
    """``[N]`` the completions, decoded as the reward read them (special tokens left out)."""
    rewards: list[float]
    """``[N]`` the reward of each completion (0 for a failed reward call)."""
    advantages: list[float]
    """``[N]`` each completion's advantage, the mean over its tokens (one value per completion for an
    outcome advantage; shaping varies it per token); 0 where dynamic sampling dropped the group."""
    kept: list[bool]
    """``[N]`` whether the sample's group is trained on (dynamic sampling keeps informative groups)."""
    rows: list[dict[str, Any]]
    """``[N]`` the dataset row of each sample's prompt (its ``answer``, ``tests``, ``data_source``, ...)."""


def rollout_view(scored: ScoredGroups, exp: Experience, tokenizer: Any, *, step: int, group_size: int) -> RolloutView:
    """The view of one step's scored groups and experience (prompts decoded once per group)."""
    samples = scored.samples
    firsts = tokenizer.batch_decode(samples.prompts[::group_size], skip_special_tokens=False)
    mask = exp.rollout.response_mask.float()
    advantages = (exp.advantages.float().cpu() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return RolloutView(
        step=step,
        group_size=group_size,
        prompts=[text for text in firsts for _ in range(group_size)],
        completions=list(samples.texts),
        rewards=[float(score) for score in scored.scores],
        advantages=advantages.tolist(),
        kept=[bool(keep) for keep in scored.keep],
        rows=list(samples.rows),
    )


def notify_rollout_end(module: L.LightningModule, scored: ScoredGroups, exp: Experience, step: int) -> None:
    """Call ``on_rollout_end(trainer, module, view)`` on every callback of ``module.trainer`` that has it."""
    trainer = module.trainer
    callbacks = [callback for callback in trainer.callbacks if callable(getattr(callback, HOOK, None))]
    if not callbacks:
        return
    view = rollout_view(scored, exp, module.tokenizer, step=step, group_size=module.sampling.n)
    for callback in callbacks:
        getattr(callback, HOOK)(trainer, module, view)
