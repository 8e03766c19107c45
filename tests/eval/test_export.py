"""export_checkpoint on a checkpoint written by a real ``Trainer.fit`` (Lightning's own format): the
single file, and the sharded folder ``ModelParallelStrategy`` (FSDP2) saves by default."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from archer.cli import main
from archer.export import export_checkpoint
from archer.tiny import write_tiny_model


class TinyActorModule(L.LightningModule):
    """The layout the Archer module checkpoints: ``self.actor`` (HF LM), a frozen ``self.reference``."""

    def __init__(self, model_path: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.actor = AutoModelForCausalLM.from_pretrained(model_path).train()
        self.reference = AutoModelForCausalLM.from_pretrained(model_path).requires_grad_(False).train()

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.actor(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        # A large step so training visibly moves every weight the loss touches.
        return torch.optim.SGD(self.actor.parameters(), lr=0.5)


def train_and_checkpoint(tmp_path: Path, tie: bool) -> tuple[Path, TinyActorModule, dict[str, torch.Tensor]]:
    model_dir = write_tiny_model(tmp_path / "tiny", tie_word_embeddings=tie, hidden_size=64, num_heads=2,
                                 intermediate_size=64, num_layers=1)
    module = TinyActorModule(str(model_dir))
    initial = {k: v.clone() for k, v in module.actor.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.randint(3, 60, (4, 12), generator=torch.Generator().manual_seed(0)))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, module, initial


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_roundtrip(tmp_path: Path, tie: bool) -> None:
    ckpt, module, initial = train_and_checkpoint(tmp_path, tie)
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()

    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = module.actor.state_dict()
    assert exported.state_dict().keys() == trained.keys()
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    # Training moved the weights, so equality above is with the trained, not the initial, ones.
    assert not torch.equal(trained["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert (exported.lm_head.weight is exported.model.embed_tokens.weight) == tie

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("12+3=", return_tensors="pt")
    generated = exported.generate(**prompt, max_new_tokens=4, do_sample=False)
    prompt_length = prompt["input_ids"].shape[1]
    assert torch.equal(generated[0, :prompt_length], prompt["input_ids"][0])
    assert prompt_length < generated.shape[1] <= prompt_length + 4


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    ckpt, _, _ = train_and_checkpoint(tmp_path, tie=False)
    shutil.rmtree(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match=r"model_path = .*tiny has no config.json"):
        export_checkpoint(ckpt, tmp_path / "export")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_archer_export_reads_a_sharded_checkpoint_folder(tmp_path: Path, tie: bool, save_like_model_parallel,
                                                         capsys) -> None:
    ckpt_file, module, initial = train_and_checkpoint(tmp_path, tie)
    # The trained run's checkpoint as FSDP2 saves it: a folder of torch.distributed.checkpoint shards
    # (module state, optimizer state) and meta.pt (hyper_parameters, loop state).
    checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    meta = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer_states")}
    folder = tmp_path / "runs" / "x" / "checkpoints" / "last.ckpt"
    save_like_model_parallel(module.state_dict(), meta, folder)
    assert folder.is_dir() and (folder / ".metadata").is_file() and (folder / "meta.pt").is_file()

    main(["export", str(folder), str(tmp_path / "export")])
    out = tmp_path / "export"
    assert f"wrote {out}" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = module.actor.state_dict()
    assert exported.state_dict().keys() == trained.keys()
    for name, value in exported.state_dict().items():
        assert value.dtype == trained[name].dtype, name
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(trained["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert (exported.lm_head.weight is exported.model.embed_tokens.weight) == tie
    assert [p.name for p in folder.parent.iterdir()] == ["last.ckpt"]  # nothing consolidated left beside it


def test_a_folder_that_is_no_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither a file nor a sharded \(FSDP2\) checkpoint folder \(no"):
        export_checkpoint(tmp_path / "empty", tmp_path / "export")
    with pytest.raises(FileNotFoundError, match="it does not exist"):
        export_checkpoint(tmp_path / "missing", tmp_path / "export")
