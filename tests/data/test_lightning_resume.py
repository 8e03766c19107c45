"""Resume through a real Lightning Trainer: its one-batch prefetch must not skip a batch."""

import lightning as L
import torch

from archer.data.datamodule import PromptDataModule
from archer.data.tasks import DigitSumTask


class RecordPrompts(L.LightningModule):
    """Trains nothing useful: records the prompts of each batch it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([item["row"]["prompt"] for item in batch])
        return (self.weight**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tiny_model_dir, root, max_steps, ckpt_path=None):
    datamodule = PromptDataModule(tiny_model_dir, task=DigitSumTask(), train_size=20, batch_size=4, seed=7)
    module = RecordPrompts()
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=root, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen, trainer


def test_checkpoint_resume_continues_with_the_next_unseen_batch(tiny_model_dir, tmp_path):
    # 20 // 4 = 5 batches per epoch, so 12 steps cross two epoch boundaries.
    uninterrupted, _ = fit(tiny_model_dir, tmp_path / "a", max_steps=12)
    first, trainer = fit(tiny_model_dir, tmp_path / "b", max_steps=7)
    assert first == uninterrupted[:7]
    ckpt = tmp_path / "b" / "stop.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["PromptDataModule"]["train"]["batches_delivered"] == 7
    resumed, _ = fit(tiny_model_dir, tmp_path / "c", max_steps=12, ckpt_path=ckpt)
    assert resumed == uninterrupted[7:]
