"""Periodically write the token-entropy view of the latest rollout to ``<log_dir>/token_view/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from archer.token_view import validate_samples, write_token_view

__all__ = ["TokenViewCallback"]


class TokenViewCallback(L.Callback):
    """Every ``every_n_steps`` RL steps (global steps), save ``num_samples`` rollout samples as JSON + HTML.

    Reads ``pl_module.last_rollout_samples`` (sample dicts ``{"prompt", "tokens", "entropy",
    "reward", "step"}``, entropy from the training forward pass) and ``pl_module.loss.rho``, and
    writes ``<trainer.log_dir>/token_view/step_{step:06d}.json`` (``{"step", "rho", "samples"}``,
    read back by ``archer report``) and ``.html`` (:func:`archer.token_view.render_token_view`).
    Only rank 0 writes.
    """

    def __init__(self, every_n_steps: int = 50, num_samples: int = 8) -> None:
        """
        Args:
            every_n_steps: write a view each time the global step crosses a multiple of this.
            num_samples: how many of the latest rollout's samples each view shows.
        """
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        # Write once the step reaches the next mark (robust to a resume that starts between marks).
        self._next_step = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step < self._next_step:
            return
        self._next_step = (step // self.every_n_steps + 1) * self.every_n_steps
        samples = getattr(pl_module, "last_rollout_samples", None)
        if samples is None:
            raise AttributeError(
                f"TokenViewCallback needs {type(pl_module).__name__}.last_rollout_samples (a list of sample dicts)"
            )
        if not samples:
            return
        samples = list(samples[: self.num_samples])
        validate_samples(samples)
        log_dir = trainer.log_dir if trainer.log_dir is not None else trainer.default_root_dir
        self._write(Path(log_dir) / "token_view", step, float(pl_module.loss.rho), samples)

    @rank_zero_only
    def _write(self, out_dir: Path, step: int, rho: float, samples: list[dict[str, Any]]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"step_{step:06d}"
        payload = {"step": step, "rho": rho, "samples": samples}
        stem.with_suffix(".json").write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        write_token_view(samples, rho, stem.with_suffix(".html"))
