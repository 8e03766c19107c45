"""``RLProgressBar``: Lightning's rich progress bar, labelled in RL steps.

The train data is an endless prompt stream, so Lightning's "Epoch 0/-2" label (max_epochs is -1
when only max_steps is set) says nothing; the bar's count is already RL steps out of
``trainer.max_steps``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["RLProgressBar"]


class RLProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar reads "RL steps" instead of an epoch count."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the label
        return f"{'RL steps':{len(self.validation_description)}}"
