"""README commands do what the README says they do."""

import re
from pathlib import Path

import pytest
import yaml

from archer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _loss(capsys, tiny_model_dir, config, *flags):
    """The loss of ``archer fit --config CONFIG FLAGS --print_config`` (in-process)."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(ROOT / "configs" / config), f"--model.model_path={tiny_model_dir}", *flags,
              "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)["model"]["loss"]


def test_the_readme_loss_swap_gives_the_dapo_settings(tiny_model_dir, capsys):
    """The README's "swap the loss" flag gives DAPO's own token-mean and clip-higher on the quickstart
    (its loss names a class only), and on the 1.5B config (which writes out loss_agg) with the extra
    flag the README gives for it."""
    readme = (ROOT / "README.md").read_text()
    swap = re.search(r"Swap the loss with `([^`]+)`", readme).group(1).split()
    extra = re.search(r"there add `([^`]+)` for DAPO", readme).group(1).split()
    for config, flags in (("quickstart.yaml", swap), ("archer_math_1.5b.yaml", swap + extra)):
        loss = _loss(capsys, tiny_model_dir, config, *flags)
        assert loss["class_path"] == "archer.losses.DAPOLoss", config
        assert loss["init_args"]["loss_agg"] == "token-mean" and loss["init_args"]["clip"] == [0.2, 0.28], config
    # Without the extra flag the 1.5B config's written-out aggregation is kept, as the README warns.
    assert _loss(capsys, tiny_model_dir, "archer_math_1.5b.yaml", *swap)["init_args"]["loss_agg"] == "seq-mean-token-mean"
