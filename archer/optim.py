"""AdamW with the learning-rate schedule of :class:`~archer.config.OptimConfig`, stepped once per RL step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from archer.config import OptimConfig

__all__ = ["build_optimizer", "lr_factor", "use_fused"]


def lr_factor(config: OptimConfig, total: int | None) -> Callable[[int], float]:
    """The schedule's factor of ``lr`` at RL step ``s``, ``W`` = ``warmup_steps``, ``T`` = ``total``:
    ``(s + 1) / W`` during the warmup, then 1 (constant, or no ``total``) or the cosine
    ``f + (1 − f)·½·(1 + cos(π·min(1, (s − W) / max(1, T − W))))`` down to the floor ``f`` = ``min_lr_ratio``."""
    warmup, schedule, floor = config.warmup_steps, config.schedule, config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or not total:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(parameters: Iterable[torch.nn.Parameter], config: OptimConfig, total: int | None):
    """AdamW over the trainable ``parameters`` and its ``LambdaLR`` schedule over ``total`` RL steps
    (None: no horizon, the cosine stays at 1)."""
    optimizer = torch.optim.AdamW(
        [p for p in parameters if p.requires_grad], lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
        fused=config.fused,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total))


def use_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Make every parameter group take (or not) AdamW's fused kernel, whatever a loaded checkpoint said.

    ``load_state_dict`` brings back the saved groups' flags, so a run resumed from a checkpoint of a
    non-fused AdamW would stay on the slow loop (and ``optim.fused: false`` would not switch a fused
    one off). The fused kernel keeps each ``step`` count as a float32 tensor on the parameter's device,
    the loop on the CPU: the counts move accordingly.
    """
    for group in optimizer.param_groups:
        group["fused"] = fused
        if fused:
            group["foreach"] = None  # AdamW refuses fused and foreach both set
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                device = param.device if fused or group.get("capturable") else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
