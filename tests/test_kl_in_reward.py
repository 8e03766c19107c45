"""``model.kl_in_reward``: KL to the reference as a reward penalty, instead of a loss's KL term (the
penalty itself is tested against hand values in ``tests/algorithms/test_kl.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from archer.cli import main
from archer.config import KLRewardConfig
from archer.losses import ArcherLoss
from archer.module import ArcherModule

ROOT = Path(__file__).resolve().parents[1]


def test_a_loss_with_its_own_kl_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="the KL would count twice"):
        ArcherModule(tiny_model_dir, loss=ArcherLoss(), kl_in_reward=KLRewardConfig())


def test_dapo_with_kl_in_reward_trains(tmp_path, tiny_model_dir, monkeypatch):
    """Two RL steps of the quickstart with DAPO's loss (no KL term) and the KL in the reward: the
    reference is loaded for the penalty alone, and the steps update with finite statistics."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--model.model_path={tiny_model_dir}",
          "--model.loss.class_path=DAPOLoss", "--model.kl_in_reward.beta=0.1", "--trainer.max_steps=2",
          "--trainer.limit_val_batches=0", "--data.train_size=64", "--data.val_size=0"])
    train = pd.read_csv(next((tmp_path / "runs" / "quickstart").glob("csv/version_*/metrics.csv")))
    train = train.dropna(subset=["train/reward_mean"])
    assert len(train) == 2 and np.isfinite(train["train/pg_loss"]).all() and (train["train/optimizer_steps"] > 0).all()
