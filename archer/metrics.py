"""Sampling metrics for verifiable tasks: pass@k (unbiased) and avg@k, as torchmetrics ``Metric``s.

For one prompt with ``n`` sampled responses of which ``c`` are correct, the unbiased estimator of
the probability that at least one of ``k`` responses drawn without replacement is correct
(Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1) is::

    pass@k = 1 − C(n − c, k) / C(n, k)

``C(n, k)`` overflows float64 for n ≳ 1030, so it is evaluated as a product of ratios that stay in
[0, 1]::

    C(n − c, k) / C(n, k) = ∏_{i = n − c + 1}^{n} (1 − k / i)        (= 0 when n − c < k)

The dataset-level value is the mean over prompts. avg@k is the mean correctness over k samples
per prompt (an estimate of pass@1 with less variance than a single sample), the paper's headline
metric (avg@64 on AIME).

Each ``Metric`` keeps the SUM of per-prompt values and the prompt COUNT as states reduced with
``dist_reduce_fx="sum"``, so ranks holding different numbers of prompts still give the exact
global mean after torchmetrics syncs them.

One metric object per (dataset, k); the module holds them e.g. as::

    self.val_metrics = torch.nn.ModuleDict({
        name: torchmetrics.MetricCollection({f"pass@{k}": PassAtK(k) for k in (1, 8)}
                                            | {f"avg@{n}": AvgAtK(n)}, prefix=f"val/{name}/")
        for name in val_files
    })
    # validation_step: self.val_metrics[name].update(correct)   # correct: bool [prompts, n]
    # on_validation_epoch_end: self.log_dict(self.val_metrics[name].compute()); .reset()

(``MetricCollection`` passes the same ``correct`` tensor to every member.) ``ModuleDict`` keys
may not contain "." — use dataset names without dots.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["pass_at_k", "PassAtK", "AvgAtK"]


def pass_at_k(num_samples: int, num_correct: Tensor, k: int) -> Tensor:
    """Unbiased per-prompt pass@k, ``1 − C(n − c, k) / C(n, k)``, in float64.

    Args:
        num_samples: ``n``, responses sampled per prompt (the same for every prompt).
        num_correct: ``c`` per prompt, integer ``[num_prompts]``, each in ``[0, n]``.
        k: responses drawn; ``1 ≤ k ≤ n``.

    Returns:
        float64 ``[num_prompts]``: ``1 − ∏_{i=n−c+1}^{n} (1 − k/i)``, which is exactly 1 when
        ``n − c < k`` (every draw of k responses contains a correct one).
    """
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if num_samples < k:
        raise ValueError(f"pass@k needs at least k samples per prompt: got n={num_samples} samples, k={k}")
    c = num_correct.to(device="cpu", dtype=torch.int64)
    i = torch.arange(1, num_samples + 1, dtype=torch.float64)  # [n]
    # Factor (1 − k/i) for i in (n − c, n]; 1 elsewhere. [num_prompts, n]
    in_range = i.unsqueeze(0) > (num_samples - c).unsqueeze(1)
    factors = torch.where(in_range, 1.0 - k / i, torch.ones((), dtype=torch.float64))
    ratio = factors.prod(dim=1)
    return torch.where(num_samples - c < k, torch.ones((), dtype=torch.float64), 1.0 - ratio)


class _MeanOverPrompts(Metric):
    """A per-prompt value averaged over prompts; states are (sum, count) so ranks sync exactly.

    Subclasses give ``_per_prompt(correct) -> float64 [num_prompts]``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"{type(self).__name__} needs k >= 1, got k={k}")
        self.k = k
        self.add_state("value_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_prompts", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    @property
    def _name(self) -> str:
        return f"{type(self).__name__}(k={self.k})"

    def _per_prompt(self, correct: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, correct: Tensor) -> None:
        if correct.dim() != 2:
            raise ValueError(
                f"{self._name}.update expects correct of shape [num_prompts, n], got shape {tuple(correct.shape)}"
            )
        if correct.dtype != torch.bool:
            raise TypeError(f"{self._name}.update expects a bool tensor, got dtype {correct.dtype}")
        self.value_sum += self._per_prompt(correct).sum().to(self.value_sum.device)
        self.num_prompts += correct.shape[0]

    def compute(self) -> Tensor:
        if self.num_prompts == 0:
            raise RuntimeError(f"{self._name}.compute() called before any update")
        return self.value_sum / self.num_prompts


class PassAtK(_MeanOverPrompts):
    """Mean over prompts of the unbiased pass@k estimator (see the module docstring).

    ``update(correct)`` takes a bool tensor ``[num_prompts, n]`` (``n ≥ k`` samples per prompt);
    ``compute()`` returns a float64 scalar.
    """

    def _per_prompt(self, correct: Tensor) -> Tensor:
        n = correct.shape[1]
        if n < self.k:
            raise ValueError(f"{self._name} needs at least k samples per prompt, got n={n} (k={self.k})")
        return pass_at_k(n, correct.sum(dim=1), self.k)


class AvgAtK(_MeanOverPrompts):
    """Mean correctness over exactly ``k`` samples per prompt, averaged over prompts (avg@k).

    ``update(correct)`` takes a bool tensor ``[num_prompts, k]``; anything other than ``k``
    columns is an error, so a logged ``avg@64`` always means 64 samples.
    """

    def _per_prompt(self, correct: Tensor) -> Tensor:
        n = correct.shape[1]
        if n != self.k:
            raise ValueError(f"{self._name} needs exactly k samples per prompt, got n={n} (k={self.k})")
        return correct.to(torch.float64).mean(dim=1)
