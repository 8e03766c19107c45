"""Every shipped YAML parses against the code (``--print_config``) and trains its loss preset as
written; the CPU loss configs run a step; every comparison variant resolves on the comparison base."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from archer.cli import main
from archer.compare import loss_as_run, loss_changes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))
VARIANTS = sorted(ROOT.joinpath("configs", "compare").glob("*.yaml"))
COMPARE_BASE = ROOT / "configs" / "compare_quickstart.yaml"
LOSS_QUICKSTARTS = [
    "gspo_quickstart.yaml", "cispo_quickstart.yaml", "clip_cov_quickstart.yaml", "kl_cov_quickstart.yaml",
]


def _resolve(capsys, model_dir: str, *configs: Path) -> dict:
    """``archer fit --config C1 [--config C2] --print_config``, in-process: the resolved config."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", *(a for c in configs for a in ("--config", str(c))), f"--model.model_path={model_dir}",
              "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err[-3000:]
    return yaml.safe_load(capsys.readouterr().out)


def _carried(loss: dict, *configs: Path) -> dict:
    """Settings of the resolved ``loss`` that differ from its class's defaults although no config file
    sets them: carried over from another loss class (jsonargparse keeps the settings two classes share
    when ``class_path`` changes, the module's default ArcherLoss included)."""
    written = set()
    for config in configs:
        spec = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("loss") or {}
        written |= set((spec.get("init_args") or {}) if isinstance(spec, dict) else ())
    return {key: value for key, value in loss_changes(loss).items() if key not in written}


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"quickstart.yaml", "archer_math_1.5b.yaml", "dapo_math_1.5b.yaml", *LOSS_QUICKSTARTS} <= names
    assert {v.stem for v in VARIANTS} >= {"archer", "dapo", "grpo", "80_20", "gspo", "cispo", "clip_cov", "kl_cov"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_print_config_resolves(config, tiny_model_dir, capsys):
    resolved = _resolve(capsys, tiny_model_dir, config)
    # the link from the model path to the datamodule's tokenizer holds for every config
    assert resolved["model"]["model_path"] == tiny_model_dir
    assert resolved["model"]["loss"]["class_path"].startswith("archer.losses.")


@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=lambda p: p.name,
)
def test_config_trains_its_loss_preset_as_written(config, tiny_model_dir, capsys):
    loss = _resolve(capsys, tiny_model_dir, config)["model"]["loss"]
    carried = _carried(loss, config)
    assert not carried, f"{config.name}: {loss['class_path']} got settings of another loss class: {carried}"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.stem)
def test_comparison_variant_resolves_to_its_preset(variant, tiny_model_dir, capsys):
    loss = _resolve(capsys, tiny_model_dir, COMPARE_BASE, variant)["model"]["loss"]
    assert loss["class_path"] == yaml.safe_load(variant.read_text())["model"]["loss"]["class_path"]
    assert not _carried(loss, COMPARE_BASE, variant), _carried(loss, COMPARE_BASE, variant)


@pytest.mark.parametrize("name", LOSS_QUICKSTARTS)
def test_loss_quickstart_runs_a_step(name, tmp_path, tiny_model_dir, monkeypatch):
    """One RL step (2 PPO epochs x 2 mini-batches) of the config through the CLI: a finite loss, a
    loadable checkpoint, and the loss preset the config names."""
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / name
    main(["fit", "--config", str(config), f"--model.model_path={tiny_model_dir}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0", "--data.train_size=64", "--data.val_size=0"])
    run = tmp_path / "runs" / config.stem
    train = pd.read_csv(next(run.glob("csv/version_*/metrics.csv"))).dropna(subset=["train/pg_loss"])
    assert len(train) == 1 and np.isfinite(train["train/pg_loss"]).all()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 1 and any(k.startswith("actor.") for k in state["state_dict"])
    assert loss_as_run(run) == yaml.safe_load(config.read_text())["model"]["loss"]["class_path"].split(".")[-1]


def test_the_async_paper_config_instantiates_as_written(tiny_model_dir, tmp_path, monkeypatch):
    """``configs/archer_math_1.5b_async.yaml`` with only the model and the accelerator swapped: every
    class it names is built — the remote engine over its 4 server URLs, the producer's staleness bound
    and off-policy mode, FSDP2 over 4 data-parallel ranks, the paper's update. (A step needs its 4
    servers: the asynchronous path runs end to end in ``tests/distributed/test_async.py``, and the
    synchronous paper configs run a step in ``tests/distributed/test_paper_tier.py``.)"""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from archer.cli import ArcherCLI
    from archer.data import PromptDataModule
    from archer.module import ArcherModule
    from archer.rollout import RemoteVLLMEngine

    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "archer_math_1.5b_async.yaml"
    cli = ArcherCLI(ArcherModule, PromptDataModule, run=False,
                    args=["--config", str(config), f"--model.model_path={tiny_model_dir}", "--trainer.accelerator=cpu"])
    written = yaml.safe_load(config.read_text())
    model = cli.model
    assert isinstance(model.rollout, RemoteVLLMEngine)
    assert list(model.rollout.urls) == written["model"]["rollout"]["init_args"]["urls"] and not model.rollout.launch
    assert (model.async_rollout.max_staleness, model.async_rollout.off_policy) == (1, "decoupled")
    assert isinstance(cli.trainer.strategy, ModelParallelStrategy) and cli.trainer.world_size == 4
    assert (model.update.ppo_epochs, model.update.mini_batch_size) == (3, 32)
    assert type(model.loss).__name__ == "ArcherLoss"


@pytest.mark.parametrize("overlay", sorted(ROOT.joinpath("configs", "loggers").glob("*.yaml")), ids=lambda p: p.name)
def test_a_logger_config_instantiates_on_the_quickstart(overlay, tiny_model_dir, tmp_path, monkeypatch):
    """``configs/loggers/*.yaml`` as a second ``--config``: the CSV logger first (report, compare and the
    run's log_dir read it), the other beside it, both under the run directory."""
    from archer.cli import ArcherCLI
    from archer.data import PromptDataModule
    from archer.module import ArcherModule

    if overlay.stem == "wandb":
        pytest.importorskip("wandb")  # in the test extra
        monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    cli = ArcherCLI(ArcherModule, PromptDataModule, run=False,
                    args=["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(overlay),
                          f"--model.model_path={tiny_model_dir}", "--trainer.default_root_dir=runs/x"])
    csv, other = cli.trainer.loggers
    assert type(csv).__name__ == "CSVLogger" and type(other).__name__.lower().startswith(overlay.stem)
    assert Path(cli.trainer.log_dir) == Path("runs/x/csv/version_0") and Path(other.save_dir) == Path("runs/x")
