"""The step metrics reach the loggers and ``trainer.callback_metrics`` as ``self.log_dict`` would put
them there (archer/step_logging.py): the rows ``log_every_n_steps`` selects, numbered as Lightning
numbers them, and every step's values for callbacks that monitor a metric."""

from pathlib import Path

import lightning as L
import pandas as pd
import torch
import yaml

from archer.cli import main
from archer.step_metrics import keys_logged_when

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


class Recorder(L.Callback):
    """Adds ``test/extra`` to the second step's row (as WeightSyncCallback adds its time) and keeps a copy
    of ``trainer.callback_metrics`` after every training step."""

    seen: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:  # the optimizer has stepped: step index 1
            pl_module.log_step_metric("test/extra", 12.5)
        Recorder.seen.append(dict(trainer.callback_metrics))


def test_rows_follow_log_every_n_steps_and_callbacks_see_every_step(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "test_step_logging.Recorder"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpt", "every_n_train_steps": 1, "monitor": "train/reward_mean", "mode": "max", "save_top_k": 1,
                       "filename": "best-{step}-{train/reward_mean:.6f}", "auto_insert_metric_name": False}},
    ]}}))
    Recorder.seen = []
    main(["fit", "--config", QUICKSTART, "--config", str(callbacks), f"--model.model_path={tiny_model_dir}",
          "--data.train_size=64", "--data.val_size=0", "--trainer.max_steps=5", "--trainer.log_every_n_steps=2"])
    rows = pd.read_csv(next(Path("runs/quickstart/csv").glob("version_*/metrics.csv")))
    # Lightning logs a step when (its index + 1) is a multiple of log_every_n_steps: indices 1 and 3 of 0..4.
    assert rows["step"].tolist() == [1, 3]
    assert rows["epoch"].tolist() == [0, 0]
    # The callback's value is in its step's one row, and a later row without it does not repeat it.
    assert rows["test/extra"].tolist()[0] == 12.5 and pd.isna(rows["test/extra"].tolist()[1])
    assert set(keys_logged_when()) <= set(rows.columns)
    # Every step, logged or not, is in callback_metrics: 0-dim float32 tensors, the logged ones equal to the rows.
    assert len(Recorder.seen) == 5
    for metrics in Recorder.seen:
        assert set(keys_logged_when()) <= set(metrics)
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32 for v in metrics.values())
    for step in (1, 3):
        row = rows.set_index("step").loc[step]
        for key in keys_logged_when():
            assert float(Recorder.seen[step][key]) == row[key], (step, key)
    # ModelCheckpoint(monitor=...) read them: the kept file is the step with the highest reward (first one on ties).
    rewards = [float(m["train/reward_mean"]) for m in Recorder.seen]
    best = max(range(5), key=lambda i: (rewards[i], -i))
    assert [p.name for p in Path("ckpt").iterdir()] == [f"best-{best + 1}-{rewards[best]:.6f}.ckpt"]
