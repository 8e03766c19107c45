"""Never train on samples of stale weights: sample versions, and the log-prob canary.

**Versions.** An engine that holds its own copy of the weights counts them (``engine.version``: 0
after ``setup``, +1 per ``load_weights``), and each sample records the version that sampled it
(``Completion.weight_version``). Synchronous steps must sample with the last sync's weights: the
version expected at step ``s`` is ``s − s₀`` (``s₀``: the step at which the engine was set up,
version 0 — the first step, or the first after a resume), since one sync follows every step. A
sample of another version means a sync that did not happen (no ``WeightSyncCallback``, a callback
that skipped a step) or did not reach a server. Asynchronous steps accept up to ``max_staleness``
versions (:mod:`archer.async_rollout` drops the older ones). ``model.weight_check.on_stale`` decides
between stopping the run (:class:`StaleWeightsError`) and dropping the groups (counted in
``rollout/stale_dropped``). ``HFEngine`` samples with the live actor: its samples are always current.

**The canary.** A version says which sync the engine believes it holds, not that the weights
arrived (an engine asleep during the copy served its old weights while reporting the new version:
TRL #5312, a log-prob gap of 0.015 → 0.201). So after each sync the engine's log-probs μ of the
step's own samples are compared with the trainer's π_old of the same tokens, which the step computes
anyway (the mismatch statistics of :mod:`archer.experience`)::

    gap = Σ_{i,t} m_{i,t} |μ_{i,t} − π_old_{i,t}| / Σ m_{i,t}        (rollout/canary_gap)

over the tokens of samples drawn by the trainer's current weights (synchronous: every kept sample,
so it equals ``rollout/logprob_diff``; asynchronous: those of staleness 0). It must stay below
``max_gap`` (by dtype: 0.01 when engine and trainer run float32, where a synced engine is within
1e-6; 0.1 otherwise), and must not jump: ``gap > jump_factor · median(previous gaps)`` is an error
too on two steps in a row (one spike is tolerated), unless ``gap < max_gap / jump_factor`` (rounding
noise). Either stops the run naming the engine. Sampling with top-p < 1 or top-k turns the canary off:
μ is then of the truncated distribution, π_old of the full one. Its limits: a stale engine whose
weights differ from the trainer's by less than the limit (small learning rates in bfloat16: one step
of lr 1e-6 moves log-probs by ~1e-4) is caught only once the drift accumulates past it, and
asynchronous steps where every sample is one version stale have no staleness-0 tokens to compare
(the versions still bound them; ``RemoteVLLMEngine.verify`` compares checksums of the weights).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from archer.algorithms import Ratio, masked_ratio
from archer.config import WeightCheckConfig
from archer.distributed import Collectives
from archer.sampling import ScoredGroups

__all__ = ["StaleWeightsError", "VersionReport", "WeightCheck", "canary_limit", "canary_ratio", "is_jump"]


class StaleWeightsError(RuntimeError):
    """The engine sampled with other weights than the trainer's (a version or the canary says so)."""


@dataclass
class VersionReport:
    """The weight versions of one step's samples (this rank)."""

    oldest: int | None
    """The oldest version that sampled any of them (None: no sample carried one)."""
    dropped: int
    """Samples masked out for their version (whole groups)."""


def canary_limit(config: WeightCheckConfig, dtypes: set[str]) -> float:
    """``max_gap``, or by dtype: 0.01 when every dtype in play (trainer's compute, engine's) is
    ``float32``, else 0.1."""
    if config.max_gap is not None:
        return config.max_gap
    return 0.01 if dtypes <= {"float32"} else 0.1


def is_jump(gap: float, history: list[float], *, factor: float, floor: float) -> bool:
    """Whether ``gap > factor · median(history)`` with ``gap ≥ floor`` (at least 3 past gaps)."""
    return len(history) >= 3 and gap >= floor and gap > factor * statistics.median(history)


class WeightCheck:
    """The version check and the canary of one run (module docstring).

    Args:
        config: ``model.weight_check``.
        engine: The rollout engine (its ``version``, when it counts them, and its ``endpoint``).
        asynchronous: Rollouts come from the asynchronous producer.
        trainer_dtype: The dtype the trainer computes log-probs in.
        checkpoint_dtype: The checkpoint's dtype as saved (what a vLLM engine with ``dtype: auto`` loads,
            but float32, which vLLM runs in bfloat16 where supported).
        collectives: Over the ranks: a stale sample on any rank stops every rank.
        truncated_sampling: Training samples with top-p < 1 or top-k: the engine's μ is of the truncated,
            renormalised distribution and π_old of the full one, so their gap is not a sign of stale
            weights and the canary is off (the versions are still checked).
    """

    def __init__(self, config: WeightCheckConfig, engine, *, asynchronous: bool, trainer_dtype: str,
                 checkpoint_dtype: str, collectives: Collectives, truncated_sampling: bool = False) -> None:
        self.config = config
        self.engine = engine
        self.asynchronous = asynchronous
        self.collectives = collectives
        stale = config.on_stale if config.on_stale != "auto" else ("drop" if asynchronous else "error")
        self.stops_on_stale = stale == "error"
        self.trainer_dtype, self.checkpoint_dtype = trainer_dtype, checkpoint_dtype.removeprefix("torch.")
        self.truncated_sampling = truncated_sampling
        self.gaps: list[float] = []
        self._jumped = False  # the previous step's gap jumped: a second jump in a row stops the run
        self._first_step: int | None = None  # s₀: the step whose samples version 0 drew

    @property
    def limit(self) -> float:
        """The canary's limit (``max_gap``, or by the dtypes in play, the engine's known after its setup)."""
        return canary_limit(self.config, {self.trainer_dtype, *self._engine_dtypes()})

    def _engine_dtypes(self) -> set[str]:
        servers = getattr(self.engine, "servers", None) or []  # RemoteVLLMEngine: what each server runs
        if servers:
            return {str(server.dtype).removeprefix("torch.") for server in servers}
        loaded = getattr(self.engine, "loaded_dtype", None)  # VLLMEngine after its setup: what vLLM runs
        if loaded is not None:
            return {loaded}
        dtype = getattr(self.engine, "dtype", None)
        if dtype == "auto" and self.checkpoint_dtype == "float32":  # vLLM may run it in bfloat16 (where supported)
            return {"float32", "bfloat16"}
        return {dtype if isinstance(dtype, str) and dtype != "auto" else self.checkpoint_dtype}

    @property
    def engine_name(self) -> str:
        return f"{type(self.engine).__name__} ({getattr(self.engine, 'endpoint', 'its own weights')})"

    def versions(self, scored: ScoredGroups, step: int, n: int, stale_dropped: int = 0) -> VersionReport | None:
        """Check this step's sample versions; drop (mask out of ``scored.keep``) or refuse stale ones
        (on every rank when any rank has one). ``stale_dropped``: samples the asynchronous sampler
        dropped beyond ``max_staleness``. None when the engine counts no versions."""
        if not hasattr(self.engine, "version"):
            return None
        versions = [c.weight_version for c in scored.samples.completions]
        known = [v for v in versions if v is not None]
        oldest = min(known) if known else None
        if self.asynchronous:
            if self._stale_anywhere(stale_dropped):
                raise StaleWeightsError(
                    f"step {step}: samples were sampled by weights more than max_staleness versions old (on this "
                    f"rank {stale_dropped}, the oldest version {oldest}) by {self.engine_name}: a server that missed "
                    "syncs? (model.weight_check.on_stale: drop trains on without them)")
            return VersionReport(oldest, stale_dropped)
        if self._first_step is None:
            self._first_step = step - self.engine.version
        expected = step - self._first_step
        # An engine that counts versions labels every sample; one without a label (a server restarted from
        # its checkpoint, labelled "default") is not known to hold the synced weights.
        wrong = torch.tensor([v is None or v != expected for v in versions])
        if self._stale_anywhere(int(wrong.sum())):
            found = sorted({v for v in known if v != expected}) + (["unlabelled"] if None in versions else [])
            cause = ("the engine labelled samples with no weight version (a server restarted from its checkpoint, "
                     "or a vLLM that reports no weight_versions)" if None in versions and not known else
                     "a weight sync was missed (is archer.callbacks.WeightSyncCallback in trainer.callbacks?)")
            raise StaleWeightsError(
                f"step {step}: samples were drawn by weight version {found or '(on another rank)'} of "
                f"{self.engine_name}, but the trainer synced version {expected} after step {step - 1}: {cause}; "
                "model.weight_check.on_stale: drop trains on without them")
        if not wrong.any():
            return VersionReport(oldest, 0)
        groups = wrong.view(-1, n).any(-1).repeat_interleave(n)
        scored.keep = scored.keep & ~groups
        return VersionReport(oldest, int(groups.sum()))

    def _stale_anywhere(self, count: int) -> bool:
        """Whether the run stops on stale samples and some rank has ``count`` > 0 (a collective when
        it stops on them: every rank must call it)."""
        return self.stops_on_stale and float(self.collectives.sum(torch.tensor(float(count)))) > 0

    def canary(self, gap: float | None, step: int) -> None:
        """Stop the run when this step's canary gap (the same on every rank) is too large or jumped."""
        if gap is None or not self.config.canary or self.truncated_sampling:
            self._jumped = False  # "two steps in a row" means two consecutive checked steps
            return
        floor = self.limit / self.config.jump_factor
        why = None
        jumped = is_jump(gap, self.gaps, factor=self.config.jump_factor, floor=floor)
        if not gap <= self.limit:  # NaN too
            why = f"above the limit {self.limit:g} (model.weight_check.max_gap)"
        elif jumped and self._jumped:  # one spike (a long sequence in low precision) is not enough
            median = statistics.median(self.gaps)
            why = (f"{gap / median:.0f}× the median of the previous {len(self.gaps)} steps ({median:.3g}) for a second "
                   f"step in a row (model.weight_check.jump_factor = {self.config.jump_factor:g})")
        self._jumped = jumped
        if why is not None:
            raise StaleWeightsError(
                f"step {step}: the log-probs of {self.engine_name} differ from the trainer's by {gap:.4g} per token "
                f"(rollout/canary_gap), {why}: the engine serves other weights than the trainer's (a weight sync "
                "that did not take effect?)")
        self.gaps = [*self.gaps, gap][-self.config.window:]


def canary_ratio(engine_logprob: Tensor | None, old_logprob: Tensor | None, mask: Tensor,
                 fresh: Tensor) -> Ratio | None:
    """The canary gap Σ m·|μ − π_old| / Σ m over the tokens ``mask [N, R]`` of the rows ``fresh [N]``
    (None without both log-probs)."""
    if engine_logprob is None or old_logprob is None:
        return None
    rows = mask.bool() & fresh.to(mask.device)[:, None]
    return masked_ratio((engine_logprob.to(old_logprob.device) - old_logprob).abs(), rows.to(old_logprob.device))
