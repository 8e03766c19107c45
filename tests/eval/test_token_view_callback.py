"""TokenViewCallback inside a real ``Trainer.fit``, then ``write_report`` picks up its newest view."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from archer.callbacks.token_view import TokenViewCallback
from archer.report import write_report


@dataclass
class LossSettings:
    rho: float


class RolloutModule(L.LightningModule):
    """Sets ``last_rollout_samples`` each step as the Archer module does (tokens + entropies)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.loss = LossSettings(rho=0.5)
        self.last_rollout_samples: list[dict] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.last_rollout_samples = [
            {"prompt": f"q{i}", "tokens": ["a", " ", "<"], "entropy": [0.1, 0.2, 0.3 + i],
             "reward": float(i), "step": self.global_step}
            for i in range(3)
        ]
        loss = self.layer(x).pow(2).mean()
        self.log("train/reward_mean", float(batch_idx))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_writes_json_and_html_every_n_steps(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(5, 2))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, logger=CSVLogger(tmp_path, name="run", version=0), log_every_n_steps=1,
        callbacks=[TokenViewCallback(every_n_steps=2, num_samples=2)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(RolloutModule(), torch.utils.data.DataLoader(data, batch_size=1))
    view_dir = tmp_path / "run" / "version_0" / "token_view"
    # global_step after batches 1..5 is 1..5: first view at once (step 1), then at steps 2 and 4.
    assert sorted(p.name for p in view_dir.iterdir()) == [
        f"step_{s:06d}.{ext}" for s in (1, 2, 4) for ext in ("html", "json")
    ]
    payload = json.loads((view_dir / "step_000004.json").read_text())
    assert payload["rho"] == 0.5 and payload["step"] == 4
    assert [s["prompt"] for s in payload["samples"]] == ["q0", "q1"]  # num_samples=2 of 3

    written = write_report(tmp_path / "run")
    html = (tmp_path / "run" / "report" / "token_view.html").read_text()
    assert (tmp_path / "run" / "report" / "token_view.html") in written
    assert "step 3" in html  # samples logged in training_step at global_step 3 (before its update)
